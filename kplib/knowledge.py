"""Knowledge bases (KBs): the per-class visual descriptions of KPL's stage 0 — schema, I/O, validation, importers.

A KB is a JSON file (schema v1, see ARCHITECTURE.md) holding, for every class of a dataset, a list of short visual
descriptions that stage 1 (TPO) scores and averages into text proxies. This module

* loads and saves KBs strictly (every malformed file raises :class:`~kplib.errors.KnowledgeBaseError` naming the
  file and the class),
* aligns a KB with a dataset's class list **exactly** (a near-match such as ``Normal`` vs ``normal`` is an error that
  says how to fix it, never a silent re-alignment),
* validates a KB (coverage, counts, duplicates, CLIP token length inside the KPL prompt, descriptions naming another
  class), and
* imports the published descriptor files in ``$KPL_DESCRIPTORS_ROOT`` (read at run time, never copied).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import importlib.resources
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import config
from .errors import KnowledgeBaseError, KPLInputError

log = logging.getLogger("kplib")

SCHEMA_VERSION = 1
KPL_TEMPLATE = "a photo of a {class_name}, which has {description}"
METHODS = ("curated", "imported", "generated", "merged")
CURATED_MIN_COUNT = 40
CONTEXT_LENGTH = 77
NEAR_DUPLICATE_RATIO = 0.92

_TOP_FIELDS = ("schema_version", "kb_id", "dataset", "modality", "created", "method", "authors", "generator",
               "source", "classes")
_CLASS_FIELDS = ("name", "display_name", "references", "descriptions")
_GENERATOR_FIELDS = ("model", "base_url_host", "prompt", "date")
_SOURCE_FIELDS = ("file", "citation", "licence")


# ----------------------------------------------------------------------------------------------------------------
# data model
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Description:
    """One visual description of a class; ``source`` says where it came from (a KB id, a file, a reference)."""

    text: str
    source: str | None = None


@dataclass
class KBClass:
    """One class of a KB. ``name`` must equal the image-folder name; ``display_name`` goes into the prompt."""

    name: str
    display_name: str
    descriptions: list[Description]
    references: list[str] = field(default_factory=list)

    @property
    def texts(self) -> list[str]:
        return [d.text for d in self.descriptions]


@dataclass
class KnowledgeBase:
    """A knowledge base (schema v1). ``origin`` is the file it was loaded from (not part of the schema)."""

    schema_version: int
    kb_id: str
    dataset: str | None
    modality: str | None
    created: str
    method: str
    authors: str | None
    generator: dict | None
    source: dict | None
    classes: list[KBClass]
    origin: str | None = field(default=None, compare=False, repr=False)

    # -- convenience -------------------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def display_names(self) -> list[str]:
        return [c.display_name for c in self.classes]

    def descriptions(self) -> list[list[str]]:
        """Description texts per class, in class order (what ``experiment.embed_knowledge`` encodes)."""
        return [c.texts for c in self.classes]

    def get(self, name: str) -> KBClass:
        for c in self.classes:
            if c.name == name:
                return c
        raise KnowledgeBaseError(f"class {name!r} is not in knowledge base {self._where()}; "
                                 f"its classes are {self.class_names}.")

    def select(self, class_names: Sequence[str]) -> "KnowledgeBase":
        """Reorder/subset the classes to ``class_names`` (the dataset's order); see :func:`select`."""
        return select(self, class_names)

    def to_dict(self) -> dict:
        """The schema-v1 JSON object, keys in schema order."""
        return {
            "schema_version": self.schema_version,
            "kb_id": self.kb_id,
            "dataset": self.dataset,
            "modality": self.modality,
            "created": self.created,
            "method": self.method,
            "authors": self.authors,
            "generator": self.generator,
            "source": self.source,
            "classes": [
                {"name": c.name, "display_name": c.display_name, "references": list(c.references),
                 "descriptions": [{"text": d.text, "source": d.source} for d in c.descriptions]}
                for c in self.classes
            ],
        }

    def _where(self) -> str:
        return f"{self.kb_id!r} ({self.origin})" if self.origin else repr(self.kb_id)


# ----------------------------------------------------------------------------------------------------------------
# parsing / loading / saving
# ----------------------------------------------------------------------------------------------------------------
def _kb_error(where: str, msg: str, cls: str | None = None) -> KnowledgeBaseError:
    loc = f"{where}, class {cls!r}" if cls is not None else where
    return KnowledgeBaseError(f"knowledge base {loc}: {msg}")


def from_dict(data: Any, origin: str | None = None) -> KnowledgeBase:
    """Build a :class:`KnowledgeBase` from a parsed schema-v1 object, checking every field strictly."""
    where = origin or "<in-memory>"
    if not isinstance(data, dict):
        raise _kb_error(where, f"the top level must be a JSON object, got {type(data).__name__}.")
    version = data.get("schema_version")
    if "schema_version" not in data:
        raise _kb_error(where, "missing field 'schema_version' (expected 1).")
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise _kb_error(where, f"schema_version is {version!r}; this kplib reads schema_version {SCHEMA_VERSION} "
                               "only. Convert the file to schema v1 (see ARCHITECTURE.md).")
    missing = [k for k in _TOP_FIELDS if k not in data]
    if missing:
        raise _kb_error(where, f"missing field(s) {missing}; a schema-v1 KB has {list(_TOP_FIELDS)}.")
    unknown = sorted(set(data) - set(_TOP_FIELDS))
    if unknown:
        raise _kb_error(where, f"unknown field(s) {unknown} (typo?); allowed: {list(_TOP_FIELDS)}.")
    for key in ("kb_id", "created", "method"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise _kb_error(where, f"field {key!r} must be a non-empty string, got {data[key]!r}.")
    for key in ("dataset", "modality", "authors"):
        if data[key] is not None and not isinstance(data[key], str):
            raise _kb_error(where, f"field {key!r} must be a string or null, got {data[key]!r}.")
    try:
        _dt.date.fromisoformat(data["created"])
    except ValueError:
        raise _kb_error(where, f"field 'created' must be an ISO date YYYY-MM-DD, got {data['created']!r}.") from None
    method = data["method"]
    if method not in METHODS:
        raise _kb_error(where, f"field 'method' is {method!r}; use one of {list(METHODS)}.")
    for key, required, needed_when in (("generator", _GENERATOR_FIELDS, "generated"),
                                       ("source", _SOURCE_FIELDS, "imported")):
        value = data[key]
        if value is not None and not isinstance(value, dict):
            raise _kb_error(where, f"field {key!r} must be an object or null, got {type(value).__name__}.")
        if method == needed_when:
            if value is None:
                raise _kb_error(where, f"method is {method!r} but {key!r} is null; record {list(required)}.")
            lacking = [k for k in required if k not in value]
            if lacking:
                raise _kb_error(where, f"{key!r} lacks {lacking}; a {method} KB records {list(required)}.")
    classes_raw = data["classes"]
    if not isinstance(classes_raw, list) or not classes_raw:
        raise _kb_error(where, "field 'classes' must be a non-empty list of class objects.")
    classes: list[KBClass] = []
    seen: set[str] = set()
    for i, c in enumerate(classes_raw):
        if not isinstance(c, dict):
            raise _kb_error(where, f"classes[{i}] must be an object, got {type(c).__name__}.")
        cname = c.get("name")
        if not isinstance(cname, str) or not cname.strip():
            raise _kb_error(where, f"classes[{i}] has no valid 'name' (got {cname!r}).")
        missing = [k for k in _CLASS_FIELDS if k not in c]
        if missing:
            raise _kb_error(where, f"missing field(s) {missing}; each class has {list(_CLASS_FIELDS)}.", cname)
        unknown = sorted(set(c) - set(_CLASS_FIELDS))
        if unknown:
            raise _kb_error(where, f"unknown field(s) {unknown}; allowed: {list(_CLASS_FIELDS)}.", cname)
        if cname in seen:
            raise _kb_error(where, "duplicate class; each class may appear once (merge their descriptions).", cname)
        seen.add(cname)
        if cname != cname.strip():
            raise _kb_error(where, "class name has leading/trailing spaces; it must equal the image-folder name.",
                            cname)
        dname = c["display_name"]
        if not isinstance(dname, str) or not dname.strip():
            raise _kb_error(where, f"'display_name' must be a non-empty string, got {dname!r}.", cname)
        refs = c["references"]
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise _kb_error(where, "'references' must be a list of strings.", cname)
        descs_raw = c["descriptions"]
        if not isinstance(descs_raw, list) or not descs_raw:
            raise _kb_error(where, "'descriptions' must be a non-empty list (an empty class cannot be scored).",
                            cname)
        descs = []
        for j, d in enumerate(descs_raw):
            if not isinstance(d, dict) or "text" not in d:
                raise _kb_error(where, f"descriptions[{j}] must be an object with 'text' (and 'source'), "
                                       f"got {d!r:.80}.", cname)
            extra = sorted(set(d) - {"text", "source"})
            if extra:
                raise _kb_error(where, f"descriptions[{j}] has unknown field(s) {extra}.", cname)
            text, src = d["text"], d.get("source")
            if not isinstance(text, str) or not text.strip():
                raise _kb_error(where, f"descriptions[{j}] is empty; remove it or write the description.", cname)
            if src is not None and not isinstance(src, str):
                raise _kb_error(where, f"descriptions[{j}].source must be a string or null, got {src!r}.", cname)
            descs.append(Description(text=text, source=src))
        classes.append(KBClass(name=cname, display_name=dname, descriptions=descs, references=list(refs)))
    return KnowledgeBase(schema_version=SCHEMA_VERSION, kb_id=data["kb_id"], dataset=data["dataset"],
                         modality=data["modality"], created=data["created"], method=method,
                         authors=data["authors"], generator=data["generator"], source=data["source"],
                         classes=classes, origin=origin)


def _read_json(path: Path, what: str = "knowledge base") -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KnowledgeBaseError(f"{what} file {path} does not exist.") from None
    except OSError as e:
        raise KnowledgeBaseError(f"cannot read {what} file {path}: {e.strerror or e}.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KnowledgeBaseError(f"{what} file {path} is not valid UTF-8 (byte {e.start}: {e.reason}); "
                                 "re-save it as UTF-8.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise KnowledgeBaseError(f"{what} file {path} is not valid JSON: {e.msg} at line {e.lineno}, "
                                 f"column {e.colno}.") from None


def _curated_dir():
    return importlib.resources.files("kplib") / "kbs"


def list_curated() -> list[str]:
    """Names (= dataset names) of the curated KBs shipped in ``kplib/kbs``."""
    return sorted(p.name[:-5] for p in _curated_dir().iterdir() if p.name.endswith(".json"))


def _looks_like_path(s: str) -> bool:
    return s.endswith(".json") or "/" in s or os.sep in s


def load_kb(path_or_name: str | os.PathLike) -> KnowledgeBase:
    """Load a KB from a file path, or by name from ``kplib/kbs/<name>.json`` (a curated KB)."""
    if isinstance(path_or_name, os.PathLike) or (isinstance(path_or_name, str) and _looks_like_path(path_or_name)):
        path = Path(path_or_name)
        return from_dict(_read_json(path), origin=str(path))
    if not isinstance(path_or_name, str) or not path_or_name:
        raise KnowledgeBaseError(f"load_kb: expected a path or a curated KB name, got {path_or_name!r}.")
    res = _curated_dir() / f"{path_or_name}.json"
    if not res.is_file():
        raise KnowledgeBaseError(f"no curated knowledge base named {path_or_name!r} (looked for "
                                 f"kplib/kbs/{path_or_name}.json); available: {list_curated()}. Pass a file path "
                                 "to load any other KB.")
    with importlib.resources.as_file(res) as p:
        return from_dict(_read_json(Path(p)), origin=f"kplib/kbs/{path_or_name}.json")


def curated_kb(dataset: str) -> KnowledgeBase:
    """The project's curated KB for ``dataset`` (checks that it is curated and written for that dataset)."""
    kb = load_kb(dataset)
    if kb.method != "curated":
        raise _kb_error(kb.origin or dataset, f"method is {kb.method!r}, expected 'curated'.")
    if kb.dataset != dataset:
        raise _kb_error(kb.origin or dataset, f"field 'dataset' is {kb.dataset!r}, expected {dataset!r}.")
    return kb


def save_kb(kb: KnowledgeBase, path: str | os.PathLike) -> Path:
    """Write ``kb`` as pretty UTF-8 JSON (schema key order, deterministic), atomically (temp file + rename)."""
    path = Path(path)
    data = kb.to_dict()
    from_dict(data, origin=str(path))  # never write a file load_kb would refuse
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if not path.parent.is_dir():
        raise KnowledgeBaseError(f"cannot save knowledge base to {path}: folder {path.parent} does not exist.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ----------------------------------------------------------------------------------------------------------------
# class alignment, select, merge
# ----------------------------------------------------------------------------------------------------------------
def _name_key(name: str) -> str:
    """Case/spacing/underscore/hyphen-insensitive key used only to *detect* near-matches (never to align)."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower()).strip()


def _near_match_hint(wanted: str, available: Iterable[str]) -> str | None:
    key = _name_key(wanted)
    for a in available:
        if a != wanted and _name_key(a) == key:
            return a
    return None


def select(kb: KnowledgeBase, class_names: Sequence[str]) -> KnowledgeBase:
    """Return a copy of ``kb`` with exactly ``class_names`` in that order (the dataset's class order).

    Matching is exact on the image-folder name. A class missing from the KB raises
    :class:`KnowledgeBaseError` naming the class and the KB file; if the KB has it under a case/spacing/underscore
    variant, the message names that variant and says to rename it (no silent alignment).
    """
    class_names = list(class_names)
    if not class_names:
        raise KnowledgeBaseError("select: class_names is empty; pass the dataset's class names.")
    dupes = sorted({c for c in class_names if class_names.count(c) > 1})
    if dupes:
        raise KnowledgeBaseError(f"select: class_names contains duplicates {dupes}.")
    by_name = {c.name: c for c in kb.classes}
    chosen = []
    for name in class_names:
        if name in by_name:
            chosen.append(dataclasses.replace(by_name[name], descriptions=list(by_name[name].descriptions),
                                              references=list(by_name[name].references)))
            continue
        near = _near_match_hint(name, by_name)
        if near is not None:
            raise KnowledgeBaseError(
                f"dataset class {name!r} is not in knowledge base {kb._where()}, which has {near!r} — they differ "
                f"only in case/spacing/underscores. Class names must equal the image-folder names exactly: rename "
                f"{near!r} to {name!r} in the KB (put the readable form in display_name), or import with an "
                f"explicit class_map {{{near!r}: {name!r}}}.")
        raise KnowledgeBaseError(f"dataset class {name!r} is not in knowledge base {kb._where()}; the KB has "
                                 f"{kb.class_names}. Add descriptions for {name!r} or use a KB for this dataset.")
    return dataclasses.replace(kb, classes=chosen)


def merge(kbs: Sequence[KnowledgeBase], kb_id: str | None = None) -> KnowledgeBase:
    """Union of several KBs' descriptions per class, exact duplicates removed, provenance kept.

    Each description keeps its ``source``; one without a source gets the ``kb_id`` it came from. Classes keep the
    first KB's order, new classes are appended. KBs written for different datasets cannot be merged.
    """
    kbs = list(kbs)
    if not kbs:
        raise KnowledgeBaseError("merge: no knowledge bases given.")
    datasets = sorted({k.dataset for k in kbs if k.dataset is not None})
    if len(datasets) > 1:
        raise KnowledgeBaseError(f"merge: the KBs are for different datasets {datasets} "
                                 f"({[k.kb_id for k in kbs]}); merge KBs of one dataset only.")
    modalities = [k.modality for k in kbs if k.modality]
    merged: dict[str, KBClass] = {}
    seen_text: dict[str, set[str]] = {}
    for k in kbs:
        for c in k.classes:
            if c.name not in merged:
                merged[c.name] = KBClass(c.name, c.display_name, [], [])
                seen_text[c.name] = set()
            elif merged[c.name].display_name != c.display_name:
                log.info("merge: class %r has display_name %r in %s and %r earlier; keeping %r", c.name,
                         c.display_name, k.kb_id, merged[c.name].display_name, merged[c.name].display_name)
            target = merged[c.name]
            for r in c.references:
                if r not in target.references:
                    target.references.append(r)
            for d in c.descriptions:
                key = d.text.strip()
                if key in seen_text[c.name]:
                    continue
                seen_text[c.name].add(key)
                target.descriptions.append(Description(d.text, d.source if d.source is not None else k.kb_id))
    ids = [k.kb_id for k in kbs]
    return KnowledgeBase(
        schema_version=SCHEMA_VERSION, kb_id=kb_id or "merged:" + "+".join(ids),
        dataset=datasets[0] if datasets else None, modality=modalities[0] if modalities else None,
        created=_dt.date.today().isoformat(), method="merged",
        authors="; ".join(dict.fromkeys(k.authors for k in kbs if k.authors)) or None,
        generator=None, source={"merged": ids}, classes=list(merged.values()))


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    """One validation finding. ``index`` is the description's position in its class (None: class/KB level)."""

    severity: str            # "error" | "warning"
    check: str               # coverage | count | duplicate | near_duplicate | token_length | names_other_class | ...
    cls: str | None
    index: int | None
    message: str


@dataclass
class ValidationReport:
    """Result of :func:`validate`: findings plus a per-class table (counts, token lengths)."""

    kb_id: str
    origin: str | None
    findings: list[Finding]
    class_stats: list[dict]
    params: dict

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no finding of severity ``error`` (warnings allowed)."""
        return not self.errors

    def to_frame(self):
        """Findings as a pandas DataFrame (columns severity, check, class, index, message)."""
        import pandas as pd
        return pd.DataFrame([{"severity": f.severity, "check": f.check, "class": f.cls, "index": f.index,
                              "message": f.message} for f in self.findings],
                            columns=["severity", "check", "class", "index", "message"])

    def counts_frame(self):
        """Per-class table: descriptions, max/mean token length of the prompt, errors, warnings."""
        import pandas as pd
        return pd.DataFrame(self.class_stats)

    def to_text(self, max_findings: int | None = 50) -> str:
        where = f" ({self.origin})" if self.origin else ""
        lines = [f"knowledge base {self.kb_id}{where}: "
                 f"{'OK' if self.ok else 'FAILED'} — {len(self.errors)} error(s), {len(self.warnings)} warning(s)",
                 f"checks: min_count={self.params.get('min_count')}, template={self.params.get('template')!r}, "
                 f"context_length={self.params.get('context_length')}, "
                 f"token check={'on' if self.params.get('token_check') else 'off'}"]
        if self.class_stats:
            w = max(len(str(s["class"])) for s in self.class_stats)
            lines.append(f"  {'class':<{w}}  descriptions  max_tokens  errors  warnings")
            for s in self.class_stats:
                mt = "-" if s["max_tokens"] is None else str(s["max_tokens"])
                lines.append(f"  {s['class']:<{w}}  {s['descriptions']:>12}  {mt:>10}  {s['errors']:>6}  "
                             f"{s['warnings']:>8}")
        shown = self.findings if max_findings is None else self.findings[:max_findings]
        for f in shown:
            loc = ""
            if f.cls is not None:
                loc = f" [{f.cls}" + (f" #{f.index}" if f.index is not None else "") + "]"
            lines.append(f"{f.severity.upper():7} {f.check}{loc}: {f.message}")
        if len(shown) < len(self.findings):
            lines.append(f"... {len(self.findings) - len(shown)} more finding(s) (use to_frame() to see all)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


_TOKENIZER_CACHE: dict[str, Any] = {}


def default_tokenizer():
    """The CLIP BPE tokenizer from ``config.tokenizer_dir()`` (``$KPL_TOKENIZER_DIR``), loaded once."""
    path = str(config.tokenizer_dir())
    if path not in _TOKENIZER_CACHE:
        from transformers import CLIPTokenizer
        _TOKENIZER_CACHE[path] = CLIPTokenizer.from_pretrained(path)
    return _TOKENIZER_CACHE[path]


def _norm_text(s: str) -> str:
    s = s.lower()
    s = re.sub(r"[^\w\s]", " ", s)
    return re.sub(r"\s+", " ", s).strip()


def _mention_pattern(phrase: str) -> re.Pattern:
    words = [re.escape(w) for w in re.split(r"[\s_]+", phrase.strip()) if w]
    return re.compile(r"(?<!\w)" + r"[\s_\-]+".join(words) + r"(?!\w)", re.IGNORECASE)


def _token_lengths(tokenizer, texts: list[str]) -> list[int]:
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    return [len(x) for x in ids]


def validate(kb: KnowledgeBase, class_names: Sequence[str] | None = None, tokenizer: Any = None,
             template: str = KPL_TEMPLATE, context_length: int = CONTEXT_LENGTH, min_count: int | None = None,
             check_tokens: bool = True, near_duplicate_ratio: float = NEAR_DUPLICATE_RATIO) -> ValidationReport:
    """Check a KB (against a dataset's ``class_names`` when given) and return every finding.

    Errors (``report.ok`` is False): missing dataset classes (with the near-match named), fewer than ``min_count``
    descriptions in a class (default 40 for curated KBs — the paper's LLM asked for ≥ 50 — else 1), empty entries,
    exact duplicates within a class, a prompt ``template.format(class_name=display_name, description=text)`` longer
    than ``context_length`` CLIP tokens including BOS/EOS (CLIP would silently truncate it), and a description that
    names another class of the dataset (whole word, case-insensitive, folder name with ``_`` read as a space, or
    display name) — that leaks the other class's text direction into this class's proxy.

    Warnings: KB classes the dataset does not have, near-duplicates within a class, the same text in two classes,
    a curated class without references, full-sentence prompts (CuPL) inside the "which has" template.

    Near-duplicate rule (chosen and documented): two descriptions of one class are near-duplicates when their
    normalised texts (lower-case, punctuation → space, whitespace collapsed) are equal, or when
    ``difflib.SequenceMatcher`` ratio of the normalised texts is ≥ ``near_duplicate_ratio`` (0.92). The ratio
    catches plural/typo/one-word variants of longer descriptions; a token-set Jaccard ≥ 0.9 would only fire on
    identical word sets for the short (4–8 word) descriptions KBs hold, so it is not used.

    ``tokenizer``: any callable HF tokenizer; ``None`` loads the CLIP tokenizer from ``$KPL_TOKENIZER_DIR``.
    ``check_tokens=False`` skips the length check (it is then reported as off).
    """
    if min_count is None:
        min_count = CURATED_MIN_COUNT if kb.method == "curated" else 1
    if "{class_name}" not in template or "{description}" not in template:
        raise KnowledgeBaseError(f"validate: template {template!r} must contain '{{class_name}}' and "
                                 "'{description}'.")
    findings: list[Finding] = []

    def add(sev, check, cls, idx, msg):
        findings.append(Finding(sev, check, cls, idx, msg))

    kb_names = kb.class_names
    dup_classes = sorted({n for n in kb_names if kb_names.count(n) > 1})
    for n in dup_classes:
        add("error", "duplicate_class", n, None, "class appears more than once in the KB.")

    # coverage vs dataset
    dataset_names = list(class_names) if class_names is not None else None
    if dataset_names is not None:
        for name in dataset_names:
            if name in kb_names:
                continue
            near = _near_match_hint(name, kb_names)
            if near is not None:
                add("error", "coverage", name, None,
                    f"dataset class {name!r} is missing; the KB has {near!r}, which differs only in "
                    f"case/spacing/underscores. Rename it to {name!r} (the image-folder name) and keep the readable "
                    f"form in display_name.")
            else:
                add("error", "coverage", name, None, f"dataset class {name!r} has no entry in the KB.")
        for name in kb_names:
            if name not in dataset_names and _near_match_hint(name, dataset_names) is None:
                add("warning", "coverage", name, None,
                    f"KB class {name!r} is not a class of the dataset {dataset_names}; select() will drop it.")

    # mention patterns of every class (dataset classes when given, else KB classes)
    phrases: dict[str, set[str]] = {}
    by_name = {c.name: c for c in kb.classes}
    for name in (dataset_names if dataset_names is not None else kb_names):
        ps = {name.replace("_", " ").strip()}
        if name in by_name:
            ps.add(by_name[name].display_name.strip())
        phrases[name] = {p for p in ps if p}
    patterns = {n: [(p, _mention_pattern(p)) for p in sorted(ps)] for n, ps in phrases.items()}
    # index by the phrase's first word: a whole-word match implies that word is a \w+ token of the text, so only
    # classes whose first word occurs need their regex run (exact, and fast for 1000-class KBs)
    class_order = {n: i for i, n in enumerate(patterns)}
    by_first: dict[str, set[str]] = {}
    always: set[str] = set()
    for n, ps in phrases.items():
        for p in ps:
            words = re.findall(r"\w+", p.lower())
            if words and re.match(r"\w", p):
                by_first.setdefault(words[0], set()).add(n)
            else:
                always.add(n)

    tok = None
    if check_tokens:
        tok = tokenizer if tokenizer is not None else default_tokenizer()

    if kb.source and kb.source.get("kind") == "prompts" and "which has" in template:
        add("warning", "prompt_style", None, None,
            "this KB holds full-sentence prompts (CuPL style), not short features; inside the template "
            f"{template!r} they read badly — encode them with template '{{description}}' instead.")

    text_owner: dict[str, str] = {}
    class_stats = []
    for c in kb.classes:
        n_before = len(findings)
        texts = c.texts
        count_ok = len(texts) >= min_count
        if not count_ok:
            add("error", "count", c.name, None,
                f"{len(texts)} description(s), fewer than min_count={min_count}.")
        if kb.method == "curated" and not c.references:
            add("warning", "references", c.name, None, "curated class lists no references.")
        seen: dict[str, int] = {}
        seen_norm: dict[str, int] = {}
        norms: list[str] = []
        for j, t in enumerate(texts):
            if not t.strip():
                add("error", "empty", c.name, j, "empty description.")
                norms.append("")
                continue
            key = t.strip()
            if key in seen:
                add("error", "duplicate", c.name, j, f"exact duplicate of #{seen[key]}: {t!r}.")
            else:
                seen[key] = j
                nk = _norm_text(t)
                if nk in seen_norm:
                    add("warning", "near_duplicate", c.name, j,
                        f"same text as #{seen_norm[nk]} up to case/punctuation: {t!r}.")
                else:
                    seen_norm[nk] = j
            norms.append(_norm_text(t))
            lower = key.lower()
            if lower in text_owner and text_owner[lower] != c.name:
                add("warning", "shared_text", c.name, j, f"the same text is also a description of class "
                                                         f"{text_owner[lower]!r}: {t!r}.")
            else:
                text_owner.setdefault(lower, c.name)
            candidates = set(always)
            for w in set(re.findall(r"\w+", lower)):
                candidates |= by_first.get(w, set())
            candidates.discard(c.name)
            for other in sorted(candidates, key=class_order.__getitem__):
                for phrase, pat in patterns[other]:
                    if pat.search(t):
                        add("error", "names_other_class", c.name, j,
                            f"mentions {phrase!r}, the name of class {other!r}: {t!r}. Rephrase without naming "
                            f"another class (its words pull this class's proxy towards that class).")
                        break
        # near duplicates by difflib ratio (pairs not already equal after normalisation)
        for a in range(len(norms)):
            if not norms[a]:
                continue
            for b in range(a + 1, len(norms)):
                if not norms[b] or norms[a] == norms[b]:
                    continue
                sm = difflib.SequenceMatcher(None, norms[a], norms[b], autojunk=False)
                if sm.real_quick_ratio() < near_duplicate_ratio or sm.quick_ratio() < near_duplicate_ratio:
                    continue
                r = sm.ratio()
                if r >= near_duplicate_ratio:
                    add("warning", "near_duplicate", c.name, b,
                        f"near-duplicate of #{a} (similarity {r:.2f}): {texts[b]!r} ~ {texts[a]!r}.")
        max_tokens = mean_tokens = None
        if tok is not None:
            prompts = [template.format(class_name=c.display_name, description=t) for t in texts]
            lengths = _token_lengths(tok, prompts)
            if lengths:
                max_tokens = max(lengths)
                mean_tokens = round(sum(lengths) / len(lengths), 1)
            for j, n in enumerate(lengths):
                if n > context_length:
                    add("error", "token_length", c.name, j,
                        f"prompt is {n} CLIP tokens (incl. BOS/EOS) > {context_length}; CLIP would truncate it. "
                        f"Shorten: {texts[j]!r}.")
        mine = findings[n_before:]
        class_stats.append({"class": c.name, "display_name": c.display_name, "descriptions": len(texts),
                            "max_tokens": max_tokens, "mean_tokens": mean_tokens,
                            "errors": sum(f.severity == "error" for f in mine),
                            "warnings": sum(f.severity == "warning" for f in mine)})
    params = {"class_names": dataset_names, "min_count": min_count, "template": template,
              "context_length": context_length, "token_check": tok is not None,
              "near_duplicate_ratio": near_duplicate_ratio}
    return ValidationReport(kb_id=kb.kb_id, origin=kb.origin, findings=findings, class_stats=class_stats,
                            params=params)


# ----------------------------------------------------------------------------------------------------------------
# importers of published descriptor files
# ----------------------------------------------------------------------------------------------------------------
#: Known pairings of a published descriptor set with one of our datasets (file, subset, class_map file→folder).
PUBLISHED_MATCHES: dict[str, list[tuple[str, str | None, dict[str, str]]]] = {
    "tb_cxr_nitrd_da": [("zero_shot_unseen_pulmonary/dk4o_descriptors.json", "disease_descriptors_NLM",
                         {"No Finding": "normal", "Tuberculosis": "tuberculosis"})],
    "chest_xray_pneumonia": [("zero_shot_unseen_pulmonary/multixpert_descriptors.json",
                              "disease_descriptors_Pneumonia", {"Normal": "NORMAL", "Pneumonia": "PNEUMONIA"})],
}


def _readme_provenance(folder: Path) -> dict[str, str | None]:
    """Citation (the README title), licence and source lines of a descriptor folder's README."""
    readme = folder / "README.md"
    out: dict[str, str | None] = {"citation": None, "licence": None, "origin": None}
    if not readme.is_file():
        return out
    text = readme.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        if line.startswith("# ") and out["citation"] is None:
            out["citation"] = line[2:].strip()
        m = re.match(r"\s*-\s*\*\*Licen[cs]e\*\*:\s*(.*)", line)
        if m and out["licence"] is None:
            out["licence"] = m.group(1).strip()
        m = re.match(r"\s*-\s*\*\*Sources?\*\*:?\s*(.*)", line)
        if m and out["origin"] is None:
            out["origin"] = m.group(1).strip() or None
    return out


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _detect_format(data: Any) -> tuple[str, Any]:
    """Return (format, payload) for a descriptor file's parsed JSON, or raise KnowledgeBaseError."""
    if isinstance(data, dict) and data and all(_is_str_list(v) for v in data.values()):
        return "class_map", data
    if isinstance(data, dict):
        crit = [k for k in data if k.startswith("per_class_criteria")]
        if crit:
            table = data[crit[0]]
            if isinstance(table, dict) and all(isinstance(v, dict) and all(isinstance(s, str) for s in v.values())
                                               for v in table.values()):
                return "criteria_table", table
        if data and all(isinstance(v, dict) and v and all(_is_str_list(x) for x in v.values())
                        for v in data.values()):
            return "nested", data
    raise KnowledgeBaseError("unrecognised descriptor-file structure (expected {class: [text]}, "
                             "{set: {class: [text]}} or an Explicd criteria table).")


def _looks_like_prompts(classes: Mapping[str, list[str]]) -> bool:
    """CuPL-style full sentences (capitalised, ending with '.') rather than short features."""
    texts = [t.strip() for v in classes.values() for t in v if t.strip()]
    if not texts:
        return False
    sentences = sum(1 for t in texts if t.endswith(".") and len(t.split()) >= 5)
    return sentences / len(texts) >= 0.6


def _resolve_dataset_classes(dataset: str) -> tuple[list[str], list[str] | None, str | None]:
    """(class_names, display_names, modality) of a registered dataset through kplib.data."""
    try:
        from . import data as _data  # written by the data/encoders issue
    except ImportError as e:
        raise KnowledgeBaseError(f"dataset {dataset!r}: kplib.data is not available ({e}); pass class_names "
                                 "explicitly instead.") from None
    ds = _data.get_dataset(dataset)
    info = getattr(_data, "DATASETS", {}).get(dataset)
    modality = getattr(info, "modality", None)
    return list(ds.class_names), list(getattr(ds, "display_names", None) or []) or None, modality


def import_descriptor_file(path: str | os.PathLike, class_map: Mapping[str, str] | None = None,
                           dataset: str | None = None, class_names: Sequence[str] | None = None,
                           subset: str | None = None, drop_empty_classes: bool = False) -> KnowledgeBase:
    """Import one published descriptor file into a KB (method ``imported``), with provenance.

    Formats (detected from the structure): ``{class: [text]}`` (classify_by_description, WaffleCLIP; CuPL prompt
    files have the same shape and are flagged ``kind: "prompts"``), ``{set: {class: [text]}}`` (Xplainer,
    zero_shot_unseen_pulmonary — choose the set with ``subset``), and Explicd's criteria table (one description
    ``"<axis>: <criterion>"`` per concept axis).

    Class matching is explicit. Without a dataset every class of the file is kept under its own name. With
    ``dataset`` (resolved through ``kplib.data``) or ``class_names``, each dataset class must be a key of the file
    (exactly) or the image of a key under ``class_map`` (``{file class: dataset class}``); otherwise
    :class:`KnowledgeBaseError` names it (and a case/spacing near-match, with the class_map that would fix it).
    File classes that the dataset does not use are left out and listed in ``source["unused_classes"]``.

    Cleaning, recorded in ``source["cleaning"]``: surrounding whitespace stripped, empty strings and exact
    duplicates within a class dropped. A class left with no descriptions is an error unless
    ``drop_empty_classes=True`` (then it is left out and listed in ``source["dropped_empty_classes"]``).
    """
    path = Path(path)
    try:
        root: Path | None = config.descriptors_root()
    except KPLInputError:  # no descriptors root here: provenance records the path as given
        root = None
    rel = str(path.resolve().relative_to(root.resolve())) if root and path.resolve().is_relative_to(
        root.resolve()) else str(path)
    data = _read_json(path, what="descriptor")
    try:
        fmt, payload = _detect_format(data)
    except KnowledgeBaseError as e:
        raise KnowledgeBaseError(f"descriptor file {rel}: {e}") from None

    if fmt == "nested":
        sets = list(payload)
        if subset is None:
            if len(sets) == 1:
                subset = sets[0]
            else:
                raise KnowledgeBaseError(f"descriptor file {rel} holds several descriptor sets {sets}; choose one "
                                         "with subset=... (CLI: --subset).")
        if subset not in payload:
            raise KnowledgeBaseError(f"descriptor file {rel} has no set {subset!r}; its sets are {sets}.")
        raw = payload[subset]
    elif subset is not None:
        raise KnowledgeBaseError(f"descriptor file {rel} has a single set of classes; do not pass subset "
                                 f"({subset!r}).")
    elif fmt == "criteria_table":
        raw = {cls: [f"{axis}: {crit}" for axis, crit in axes.items()] for cls, axes in payload.items()}
    else:
        raw = payload
    kind = "prompts" if _looks_like_prompts(raw) else "descriptors"

    # clean
    cleaned: dict[str, list[str]] = {}
    n_empty = n_dup = 0
    for cls, texts in raw.items():
        out, seen = [], set()
        for t in texts:
            s = t.strip()
            if not s:
                n_empty += 1
                continue
            if s in seen:
                n_dup += 1
                continue
            seen.add(s)
            out.append(s)
        cleaned[cls] = out
    empty_classes = [c for c, v in cleaned.items() if not v]

    # align classes
    display: dict[str, str] = {}
    modality = None
    if dataset is not None and class_names is None:
        class_names, dnames, modality = _resolve_dataset_classes(dataset)
        if dnames:
            display = dict(zip(class_names, dnames))
    class_map = dict(class_map or {})
    for k in class_map:
        if k not in cleaned:
            near = _near_match_hint(k, cleaned)
            hint = f" (did you mean {near!r}?)" if near else ""
            raise KnowledgeBaseError(f"class_map key {k!r} is not a class of descriptor file {rel}{hint}; "
                                     f"its classes are {sorted(cleaned)[:20]}.")
    if class_names is not None:
        class_names = list(class_names)
        targets = list(class_map.values())
        bad = sorted({t for t in targets if t not in class_names})
        if bad:
            raise KnowledgeBaseError(f"class_map maps onto {bad}, which are not classes of the dataset "
                                     f"{class_names}.")
        twice = sorted({t for t in targets if targets.count(t) > 1})
        if twice:
            raise KnowledgeBaseError(f"class_map maps several file classes onto {twice}; map one file class per "
                                     "dataset class.")
        inverse = {v: k for k, v in class_map.items()}
        mapping: dict[str, str] = {}   # dataset class -> file class
        for name in class_names:
            if name in inverse:
                mapping[name] = inverse[name]
            elif name in cleaned:
                mapping[name] = name
            else:
                near = _near_match_hint(name, cleaned)
                if near is not None:
                    raise KnowledgeBaseError(
                        f"dataset class {name!r} is not a class of descriptor file {rel}; the file has {near!r}, "
                        f"which differs only in case/spacing/underscores. Classes are never aligned silently: pass "
                        f"class_map={{{near!r}: {name!r}}} (CLI: --class-map '{{\"{near}\": \"{name}\"}}').")
                raise KnowledgeBaseError(f"dataset class {name!r} cannot be matched to descriptor file {rel} "
                                         f"(classes: {sorted(cleaned)[:20]}{' ...' if len(cleaned) > 20 else ''}); "
                                         "pass an explicit class_map {file class: dataset class}.")
    else:
        if class_map:
            mapping = {class_map.get(k, k): k for k in cleaned}
            if len(mapping) != len(cleaned):
                raise KnowledgeBaseError(f"class_map {class_map} maps two classes of {rel} onto one name.")
        else:
            mapping = {k: k for k in cleaned}
    used_file_classes = set(mapping.values())
    unused = [k for k in cleaned if k not in used_file_classes]
    empty_used = [mapping_k for mapping_k, fk in mapping.items() if fk in empty_classes]
    dropped_empty: list[str] = []
    if empty_used:
        if not drop_empty_classes:
            raise KnowledgeBaseError(
                f"descriptor file {rel}: class(es) {empty_used[:10]}{' ...' if len(empty_used) > 10 else ''} "
                f"({len(empty_used)} in all) have no non-empty descriptions. Pass drop_empty_classes=True to leave "
                "them out (they are then listed in the KB's provenance).")
        dropped_empty = empty_used
        mapping = {k: v for k, v in mapping.items() if k not in empty_used}

    prov = _readme_provenance(path.parent)
    importer = f"kplib.knowledge.import_descriptor_file[{fmt}]"
    src_tag = rel + (f"#{subset}" if subset else "")
    classes = [KBClass(name=name, display_name=display.get(name) or fk,
                       descriptions=[Description(t, src_tag) for t in cleaned[fk]], references=[])
               for name, fk in mapping.items()]
    if not classes:
        raise KnowledgeBaseError(f"descriptor file {rel}: no class left to import.")
    source = {"file": rel, "citation": prov["citation"], "licence": prov["licence"], "origin": prov["origin"],
              "importer": importer, "format": fmt, "kind": kind, "subset": subset,
              "class_map": {fk: name for name, fk in mapping.items() if fk != name} or None,
              "unused_classes": unused or None, "dropped_empty_classes": dropped_empty or None,
              "cleaning": {"dropped_empty_strings": n_empty, "dropped_exact_duplicates": n_dup}}
    stem = path.stem + (f"-{subset}" if subset else "")
    kb = KnowledgeBase(schema_version=SCHEMA_VERSION,
                       kb_id=f"{dataset + '-' if dataset else ''}imported-{stem}",
                       dataset=dataset, modality=modality, created=_dt.date.today().isoformat(),
                       method="imported", authors=prov["citation"], generator=None, source=source,
                       classes=classes, origin=str(path))
    if n_empty or n_dup or unused or dropped_empty:
        log.info("imported %s: dropped %d empty string(s), %d duplicate(s); unused classes %d; empty classes "
                 "dropped %d", src_tag, n_empty, n_dup, len(unused), len(dropped_empty))
    return kb


def published_descriptor_files(root: str | os.PathLike | None = None) -> list[Path]:
    """Every ``*.json`` under the descriptors root (``$KPL_DESCRIPTORS_ROOT``), sorted."""
    root = Path(root) if root is not None else config.descriptors_root()
    return sorted(p for p in root.rglob("*.json") if p.is_file())


def import_all_published(root: str | os.PathLike | None = None
                         ) -> list[tuple[str, KnowledgeBase | str]]:
    """Try to import every published descriptor file as-is (no dataset); multi-set files give one entry per set.

    Returns ``[(name, KB or rejection reason)]`` where ``name`` is the file relative to the root, with
    ``#<set>`` for a set of a multi-set file. Strict defaults are used, so files with empty classes are rejected
    with the reason (pass ``drop_empty_classes=True`` to :func:`import_descriptor_file` to import them anyway).
    """
    root = Path(root) if root is not None else config.descriptors_root()
    out: list[tuple[str, KnowledgeBase | str]] = []
    for p in published_descriptor_files(root):
        rel = str(p.relative_to(root))
        try:
            data = _read_json(p, what="descriptor")
            fmt, payload = _detect_format(data)
        except KnowledgeBaseError as e:
            out.append((rel, str(e)))
            continue
        subsets = list(payload) if fmt == "nested" and len(payload) > 1 else [None]
        for s in subsets:
            name = rel + (f"#{s}" if s else "")
            try:
                out.append((name, import_descriptor_file(p, subset=s)))
            except KnowledgeBaseError as e:
                out.append((name, str(e)))
    return out


def import_for_dataset(dataset: str, class_names: Sequence[str] | None = None,
                       root: str | os.PathLike | None = None) -> list[KnowledgeBase]:
    """The published descriptor sets known to match ``dataset`` (see :data:`PUBLISHED_MATCHES`), imported."""
    root = Path(root) if root is not None else config.descriptors_root()
    if dataset not in PUBLISHED_MATCHES:
        raise KnowledgeBaseError(f"no published descriptor set is paired with dataset {dataset!r}; paired datasets: "
                                 f"{sorted(PUBLISHED_MATCHES)}. Use import_descriptor_file with a class_map.")
    return [import_descriptor_file(root / f, class_map=cmap, dataset=dataset,
                                   class_names=class_names, subset=s)
            for f, s, cmap in PUBLISHED_MATCHES[dataset]]


# ----------------------------------------------------------------------------------------------------------------
# ImageNet-1k: the published DCLIP descriptors aligned with WordNet-id folders
# ----------------------------------------------------------------------------------------------------------------
#: The DCLIP ImageNet descriptor file, relative to ``$KPL_DESCRIPTORS_ROOT``.
DCLIP_IMAGENET_FILE = "classify_by_description/descriptors_imagenet.json"
DCLIP_CITATION = ("S. Menon and C. Vondrick, 'Visual Classification via Description from Large Language Models', "
                  "ICLR 2023 (DCLIP)")
_WNID = re.compile(r"^n\d{8}$")


def _json_keys_in_order(path: Path) -> list[str]:
    """Top-level keys of a JSON object in file order, duplicates kept (``json.load`` would silently merge them)."""
    try:
        pairs = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=lambda p: p)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KnowledgeBaseError(f"cannot read descriptor file {path}: {e}") from None
    if not isinstance(pairs, list):
        raise KnowledgeBaseError(f"descriptor file {path} must hold a JSON object {{class name: [descriptions]}}.")
    return [k for k, _ in pairs]


def imagenet_class_map(file_classes: Sequence[str], wnid_names: Mapping[str, str], file: str = "descriptor file",
                       min_anchored: float = 0.5) -> dict[str, str]:
    """``{file class: wnid}`` for an ImageNet-1k descriptor file whose keys follow the standard class index order.

    ImageNet descriptor files (DCLIP, CuPL) are keyed by CLIP-cleaned class names ("crane bird", "construction
    crane", "rooster"), which differ from the WordNet names of ``class_names.json`` for ~300 classes and are
    ambiguous there ("crane" and "maillot" name two wnids each). Their key order is the standard ImageNet-1k index
    order, i.e. the sorted wnids, so key ``i`` is aligned with the ``i``-th sorted wnid. The alignment is verified,
    never assumed: the file must have exactly one unique key per wnid; every key that equals a WordNet name (up to
    case/spacing/hyphens) must sit at the position of a wnid with that name; and at least ``min_anchored`` of the
    keys must be such anchors (else the order cannot be checked). Any violation raises
    :class:`KnowledgeBaseError` naming the classes.
    """
    keys = list(file_classes)
    wnids = sorted(wnid_names)
    bad = [w for w in wnids if not _WNID.match(str(w))]
    if bad:
        raise KnowledgeBaseError(f"ImageNet class names: {bad[:10]} are not WordNet ids (n + 8 digits); pass the "
                                 "{wnid: class name} mapping of the dataset's class_names.json.")
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise KnowledgeBaseError(f"{file}: class key(s) {dup} occur more than once, so classes cannot be aligned "
                                 "one-to-one with the ImageNet wnids.")
    if len(keys) != len(wnids):
        raise KnowledgeBaseError(f"{file} has {len(keys)} classes but the dataset has {len(wnids)} wnids; aligning "
                                 "by ImageNet index order needs exactly one key per wnid.")
    by_name: dict[str, list[str]] = {}
    for w in wnids:
        by_name.setdefault(_name_key(str(wnid_names[w])), []).append(w)
    anchored, conflicts = 0, []
    for i, (key, w) in enumerate(zip(keys, wnids)):
        owners = by_name.get(_name_key(key))
        if owners is None:
            continue
        anchored += 1
        if w not in owners:
            conflicts.append(f"key {i} {key!r} sits at {w} ({wnid_names[w]!r}) but names {owners}")
    if conflicts:
        raise KnowledgeBaseError(f"{file}: key order does not follow the sorted wnids — {len(conflicts)} class(es) "
                                 f"contradict it: {'; '.join(conflicts[:10])}{' ...' if len(conflicts) > 10 else ''}. "
                                 "Pass an explicit class_map {file class: wnid} instead.")
    if anchored < min_anchored * len(keys):
        raise KnowledgeBaseError(f"{file}: only {anchored} of {len(keys)} keys equal a WordNet class name, too few "
                                 "to verify that the key order is the ImageNet index order; pass an explicit "
                                 "class_map {file class: wnid}.")
    log.info("%s: aligned %d classes by ImageNet index order (%d verified by name)", file, len(keys), anchored)
    return dict(zip(keys, wnids))


def dclip_imagenet_kb(wnid_names: Mapping[str, str] | None = None, path: str | os.PathLike | None = None,
                      dataset: str = "imagenet_sample") -> KnowledgeBase:
    """The published DCLIP ImageNet descriptors (Menon & Vondrick 2023) as a KB over WordNet-id class folders.

    ``wnid_names``: ``{wnid: WordNet class name}`` (default: the registered dataset's ``class_names.json``);
    ``path``: the descriptor file (default ``$KPL_DESCRIPTORS_ROOT/`` :data:`DCLIP_IMAGENET_FILE`, read at run
    time). Classes are aligned by :func:`imagenet_class_map` (verified index order, explicit map recorded in the
    provenance). The prompt's display name is the file's CLIP-cleaned class name (what DCLIP prompts with), which
    also tells the two "crane" and the two "maillot" classes apart.
    """
    from . import data as _data

    info = _data.DATASETS.get(dataset)
    if wnid_names is None:
        if info is None or info.display_names_file is None:
            raise KnowledgeBaseError(f"dclip_imagenet_kb: dataset {dataset!r} has no class_names.json in the "
                                     "registry; pass wnid_names={wnid: class name}.")
        wnid_names = info.resolve_display_names(config.data_root() / info.folder)
        names_file = str(config.data_root() / info.folder / info.display_names_file)
    else:
        names_file = None
    path = Path(path) if path is not None else config.descriptors_root() / DCLIP_IMAGENET_FILE
    keys = _json_keys_in_order(path)
    cmap = imagenet_class_map(keys, wnid_names, file=str(path))
    kb = import_descriptor_file(path, class_map=cmap, class_names=sorted(wnid_names))
    anchored = sum(1 for k, w in cmap.items() if _name_key(k) == _name_key(str(wnid_names[w])))
    source = dict(kb.source or {})
    source.update({
        "citation": DCLIP_CITATION,
        "published_set": "DCLIP ImageNet descriptors (Menon & Vondrick 2023), GPT-3 generated",
        "readme_title": (kb.source or {}).get("citation"),
        "class_alignment": (f"by ImageNet index order (file key i = i-th sorted wnid), verified: {anchored} of "
                            f"{len(cmap)} keys equal their wnid's WordNet name, none contradicts it"),
        "wnid_names_file": names_file,
        "display_names": "the descriptor file's CLIP-cleaned class names",
    })
    return dataclasses.replace(kb, kb_id=f"{dataset}-dclip-menon-vondrick-2023", dataset=dataset,
                               modality=info.modality if info is not None else None, authors=DCLIP_CITATION,
                               source=source)
