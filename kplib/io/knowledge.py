"""Knowledge bases (KBs): the per-class visual descriptions of KPL's stage 0 — schema, files, validation.

Stage 1 puts each description :math:`d` of class :math:`c` in the prompt ``KPL_TEMPLATE`` and averages the embeddings
of the top K into the text proxy :math:`w_c \\propto \\sum_{d \\in \\mathrm{top}K(c)} t_d`. A KB (schema v1) lists, for
every image-folder class, short visual descriptions and where they came from. Files are read strictly (errors name
the file, the class and the fix); :func:`select` aligns a KB with a dataset by exact folder names, :func:`validate`
checks it. :mod:`kplib.io.descriptors` imports descriptor files; :mod:`kplib.io.llm` generates KBs with an LLM.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import functools
import json
import logging
import os
import re
import shlex
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import transformers

from .. import paths
from ..errors import KnowledgeBaseError, KPLInputError, fix

log = logging.getLogger("kplib")

SCHEMA_VERSION = 1
KPL_TEMPLATE = "a photo of a {class_name}, which has {description}"
METHODS = ("curated", "imported", "generated", "merged")
CURATED_MIN_COUNT = 40  # the paper's LLM prompt asked for at least 50 descriptions per class
CONTEXT_LENGTH = 77  # CLIP's text context, BOS and EOS included
NEAR_DUPLICATE_RATIO = 0.92
_HERE = Path(__file__).parent  # the curated KBs (kbs/) and generic descriptions ship with the package


def _iso_date(value: Any) -> bool:
    try:
        return _dt.date.fromisoformat(value) is not None
    except (TypeError, ValueError):
        return False


_TEXT = (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")
_OPTIONAL = {str: (lambda v: v is None or isinstance(v, str), "a string or null"),
             dict: (lambda v: v is None or isinstance(v, dict), "an object or null")}
#: schema v1: each field with its rule (check, what it must be); descriptions are checked in _class
_TOP_FIELDS = {"schema_version": (lambda v: v == SCHEMA_VERSION and v is not True, f"{SCHEMA_VERSION}"),
               "kb_id": _TEXT, "dataset": _OPTIONAL[str], "modality": _OPTIONAL[str],
               "created": (_iso_date, "an ISO date YYYY-MM-DD"),
               "method": (METHODS.__contains__, f"one of {list(METHODS)}"),
               "authors": _OPTIONAL[str], "generator": _OPTIONAL[dict], "source": _OPTIONAL[dict],
               "classes": (lambda v: isinstance(v, list) and bool(v), "a non-empty list of class objects")}
_CLASS_FIELDS = {"name": _TEXT, "display_name": _TEXT,
                 "references": (lambda v: isinstance(v, list) and all(isinstance(r, str) for r in v),
                                "a list of strings"),
                 "descriptions": (lambda v: isinstance(v, list) and bool(v),
                                  "a non-empty list (an empty class cannot be scored)")}
#: what a KB of a given method records, and where
_PROVENANCE = {"generated": ("generator", ("model", "base_url_host", "prompt", "date")),
               "imported": ("source", ("file", "citation", "licence"))}


# ------------------------------------------------------------------------------------------------ data model
@dataclass(frozen=True)
class Description:
    """One visual description of a class; ``source`` says where it came from (a KB id, a file, a reference)."""

    text: str
    source: str | None = None


@dataclass
class KBClass:
    """One class: ``name`` equals the image-folder name, ``display_name`` goes into the prompt."""

    name: str
    display_name: str
    descriptions: list[Description]
    references: list[str] = field(default_factory=list)

    texts = property(lambda self: [d.text for d in self.descriptions])


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

    class_names = property(lambda self: [c.name for c in self.classes])
    display_names = property(lambda self: [c.display_name for c in self.classes])

    def descriptions(self) -> list[list[str]]:
        """Description texts per class, in class order (what the pipeline encodes)."""
        return [c.texts for c in self.classes]

    def get(self, name: str) -> KBClass:
        for c in self.classes:
            if c.name == name:
                return c
        raise KnowledgeBaseError(f"class {name!r} is not in knowledge base {self._where()}; it has {self.class_names}.")

    def select(self, class_names: Sequence[str]) -> KnowledgeBase:
        """The KB restricted to ``class_names`` in that order (:func:`select`)."""
        return select(self, class_names)

    def to_dict(self) -> dict:
        """The schema-v1 JSON object, keys in schema order."""
        return {**{k: getattr(self, k) for k in list(_TOP_FIELDS)[:-1]}, "classes": [
            {"name": c.name, "display_name": c.display_name, "references": list(c.references),
             "descriptions": [{"text": d.text, "source": d.source} for d in c.descriptions]} for c in self.classes]}

    def _where(self) -> str:
        return f"{self.kb_id!r} ({self.origin})" if self.origin else repr(self.kb_id)


# ------------------------------------------------------------------------------------------------ schema v1
def _kb_error(where: str | None, msg: str, cls: str | None = None) -> KnowledgeBaseError:
    return KnowledgeBaseError(f"knowledge base {where or '<in-memory>'}{f', class {cls!r}' if cls else ''}: {msg}")


def _check_fields(obj: dict, rules: Mapping, where: str | None, cls: str | None = None) -> None:
    """Every field of ``rules`` present, no other, each passing its rule."""
    missing, unknown = [k for k in rules if k not in obj], sorted(set(obj) - set(rules))
    if missing or unknown:
        raise _kb_error(where, (f"missing field(s) {missing}" if missing else f"unknown field(s) {unknown} (typo?)")
                        + f"; the schema has {list(rules)}.", cls)
    for key, (ok, what) in rules.items():
        if not ok(obj[key]):
            raise _kb_error(where, f"{key} is {obj[key]!r:.60}; it must be {what}.", cls)


def from_dict(data: Any, origin: str | None = None) -> KnowledgeBase:
    """A :class:`KnowledgeBase` from a parsed schema-v1 object, every field checked (errors name file and class)."""
    if not isinstance(data, dict):
        raise _kb_error(origin, f"the top level must be a JSON object, got {type(data).__name__}.")
    if "schema_version" not in data:  # a descriptor file: say exactly how to convert it
        out = str(Path(origin or "kb.json").with_suffix(".kb.json"))
        how = fix(cli=f"kpl kb import {shlex.quote(origin)} --output {shlex.quote(out)}",
                  python=f"save_kb(import_descriptors({origin!r}), {out!r})") if origin else "with import_descriptors()"
        raise _kb_error(origin, "missing field 'schema_version': not a schema-v1 knowledge base. If it is a "
                                "{class: [descriptions]} map (or another descriptor file), convert it once and use "
                                f"the converted file {how}; import_descriptors is in kplib.io.descriptors.")
    _check_fields(data, _TOP_FIELDS, origin)
    key, needed = _PROVENANCE.get(data["method"], ("source", ()))
    if any(k not in (data[key] or {}) for k in needed):
        raise _kb_error(origin, f"a KB of method {data['method']!r} records {list(needed)} in {key!r}.")
    classes = [_class(i, c, origin) for i, c in enumerate(data["classes"])]
    names = [c.name for c in classes]
    if len(set(names)) < len(names):
        raise _kb_error(origin, "duplicate class; each class may appear once (merge their descriptions).",
                        next(n for n in names if names.count(n) > 1))
    return KnowledgeBase(**{k: data[k] for k in list(_TOP_FIELDS)[:-1]}, classes=classes, origin=origin)


def _class(i: int, c: Any, where: str | None) -> KBClass:
    name = c.get("name") if isinstance(c, dict) else None
    if not isinstance(name, str) or name != name.strip() or not name:
        raise _kb_error(where, f"classes[{i}] needs a 'name' equal to its image-folder name, without leading/"
                               f"trailing spaces; got {name!r}.", name)
    _check_fields(c, _CLASS_FIELDS, where, name)
    for j, d in enumerate(c["descriptions"]):
        shape_ok = isinstance(d, dict) and "text" in d and not set(d) - {"text", "source"}
        if not shape_ok or not isinstance(d.get("source"), (str, type(None))):
            raise _kb_error(where, f"descriptions[{j}] must be an object with 'text' (and a string or null 'source'), "
                                   f"got {d!r:.80}.", name)
        if not isinstance(d["text"], str) or not d["text"].strip():
            raise _kb_error(where, f"descriptions[{j}] is empty; remove it or write the description.", name)
    return KBClass(name, c["display_name"], [Description(d["text"], d.get("source")) for d in c["descriptions"]],
                   list(c["references"]))


# ------------------------------------------------------------------------------------------------ files
def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise KnowledgeBaseError(next(k for k in keys if keys.count(k) > 1))
    return dict(pairs)


def _read_json(path: str | os.PathLike, what: str = "knowledge base") -> Any:
    """Parsed JSON of a UTF-8 file (a byte-order mark is allowed); errors name the file, the place and the fix."""
    path, text = Path(path), ""
    try:
        text = path.read_bytes().decode("utf-8-sig")
        return json.loads(text, object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        msg = "does not exist"
    except OSError as e:
        msg = f"cannot be read ({e.strerror or e})"
    except UnicodeDecodeError as e:
        msg = f"is not valid UTF-8 (byte {e.start}: {e.reason}); re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
    except KnowledgeBaseError as e:  # from _unique_keys
        msg = f"has the key {e.args[0]!r} more than once in one object (JSON keeps the last); merge the entries"
    except json.JSONDecodeError as e:
        lines = [s.strip() for s in text.splitlines() if s.strip()]
        json_lines = e.msg == "Extra data" and len(lines) > 1 and all(s[0] in "{[\"" for s in lines)
        msg = ('looks like JSON Lines (a JSON value on each line); a knowledge base is one JSON object such as '
               '{"class": ["description", ...]}' if json_lines else
               f"is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}")
    raise KnowledgeBaseError(f"{what} file {path} {msg}.")


def list_curated() -> list[str]:
    """Names (= dataset names) of the curated KBs shipped in ``kplib/io/kbs``."""
    return sorted(p.stem for p in (_HERE / "kbs").glob("*.json"))


def load_kb(path_or_name: str | os.PathLike) -> KnowledgeBase:
    """Load a schema-v1 KB file, or a curated KB by name (``kplib/io/kbs/<name>.json``)."""
    name = os.fspath(path_or_name)
    if name in list_curated():
        return from_dict(_read_json(_HERE / "kbs" / f"{name}.json"), origin=f"kplib/io/kbs/{name}.json")
    if not name or not Path(name).suffix and not Path(name).exists():
        raise KnowledgeBaseError(f"no curated knowledge base named {name!r}; available: {list_curated()}. Pass a "
                                 "file path to load any other KB.")
    return from_dict(_read_json(name), origin=name)


def curated_kb(dataset: str) -> KnowledgeBase:
    """The project's curated KB for ``dataset`` (checked to be curated and written for that dataset)."""
    kb = load_kb(dataset)
    if kb.method != "curated" or kb.dataset != dataset:
        raise _kb_error(kb.origin, f"not the curated KB of {dataset!r} (method {kb.method!r}, dataset {kb.dataset!r}).")
    return kb


def save_kb(kb: KnowledgeBase, path: str | os.PathLike) -> Path:
    """Write ``kb`` as indented UTF-8 JSON in schema key order (deterministic), atomically, with the user's umask."""
    path, data = Path(path), kb.to_dict()
    from_dict(data, origin=str(path))  # never write a file load_kb would refuse
    if not path.parent.is_dir():
        raise KnowledgeBaseError(f"cannot save knowledge base to {path}: folder {path.parent} does not exist.")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:  # os.open with mode 0o666 leaves the permissions to the umask, as for any new file (mkstemp: 0o600)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KnowledgeBaseError(f"cannot write knowledge base {path}: {e.strerror or e}.") from None
    return path


# ------------------------------------------------------------------------------------------------ select, merge
def _name_key(name: str) -> str:
    """Case/spacing/underscore/hyphen-insensitive key, used only to *detect* near-matches (never to align)."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower()).strip()


def _near_match(wanted: str, available: Iterable[str]) -> str | None:
    return next((a for a in available if a != wanted and _name_key(a) == _name_key(wanted)), None)


def _class_map_fix(file_class: str, name: str) -> str:
    return fix(cli=f"--class-map '{json.dumps({file_class: name})}'", python=f"class_map={ {file_class: name}!r}")


def select(kb: KnowledgeBase, class_names: Sequence[str]) -> KnowledgeBase:
    """A copy of ``kb`` with exactly ``class_names`` (the dataset's classes, exact folder names) in that order.

    A missing class is an error naming the KB file and, for a case/spacing/underscore variant, the rename. KB classes
    the dataset does not have are left out, and repeated descriptions (which count twice in the top-K text proxy)
    kept, each with a logged warning.
    """
    class_names = list(class_names)
    if not class_names or len(set(class_names)) < len(class_names):
        raise KnowledgeBaseError(f"select: class_names must be the dataset's classes, without duplicates; got "
                                 f"{class_names}.")
    by_name = {c.name: c for c in kb.classes}
    for name in (n for n in class_names if n not in by_name):
        near = _near_match(name, by_name)
        raise KnowledgeBaseError(
            f"dataset class {name!r} is not in knowledge base {kb._where()}, which has {near!r} — they differ only "
            f"in case/spacing/underscores. Class names must equal the image-folder names exactly: rename {near!r} "
            f"to {name!r} in the KB (keep the readable form in display_name), or import the file with "
            f"{_class_map_fix(near, name)}." if near else
            f"dataset class {name!r} is not in knowledge base {kb._where()}; the KB has {kb.class_names}. Add "
            f"descriptions for {name!r} or use a KB for this dataset.")
    if extra := [n for n in by_name if n not in class_names]:
        log.warning("knowledge base %s: class(es) %s have no images in the dataset; left out", kb._where(), extra)
    for name in class_names:
        texts = by_name[name].texts
        if len(set(texts)) < len(texts):
            log.warning("knowledge base %s, class %r: duplicate description(s) %s count more than once in the top-K "
                        "text proxy; remove them (`kpl kb validate` lists them)", kb._where(), name,
                        sorted({t[:60] for t in texts if texts.count(t) > 1}))
    return dataclasses.replace(kb, classes=[dataclasses.replace(by_name[n], descriptions=list(
        by_name[n].descriptions), references=list(by_name[n].references)) for n in class_names])


def merge(kbs: Sequence[KnowledgeBase], kb_id: str | None = None) -> KnowledgeBase:
    """Union of KBs of one dataset: per class, the descriptions of all (exact duplicates once, each keeping its
    ``source`` or else the ``kb_id`` it came from), in the first KB's class order and display names."""
    kbs = list(kbs)
    datasets = sorted({k.dataset for k in kbs if k.dataset is not None})
    if not kbs or len(datasets) > 1:
        raise KnowledgeBaseError(f"merge: pass knowledge bases of one dataset; got {[k.kb_id for k in kbs]} for "
                                 f"different datasets {datasets}.")
    merged: dict[str, KBClass] = {}
    for k in kbs:
        for c in k.classes:
            target = merged.setdefault(c.name, KBClass(c.name, c.display_name, [], []))
            target.references += [r for r in c.references if r not in target.references]
            seen = {d.text.strip() for d in target.descriptions}
            for d in c.descriptions:
                if d.text.strip() not in seen:
                    seen.add(d.text.strip())
                    target.descriptions.append(Description(d.text, k.kb_id if d.source is None else d.source))
    ids = [k.kb_id for k in kbs]
    return KnowledgeBase(SCHEMA_VERSION, kb_id or "merged:" + "+".join(ids), datasets[0] if datasets else None,
                         next((k.modality for k in kbs if k.modality), None), _dt.date.today().isoformat(), "merged",
                         "; ".join(dict.fromkeys(k.authors for k in kbs if k.authors)) or None, None,
                         {"merged": ids}, list(merged.values()))


# ------------------------------------------------------------------------------------------------ validation
@dataclass(frozen=True)
class Finding:
    """One finding of :func:`validate`; ``index`` is the description's position in its class (None: class or KB)."""

    severity: str  # "error" | "warning"
    check: str  # coverage, prompt_style, duplicate_class, count, references, empty, duplicate, near_duplicate, ...
    cls: str | None
    index: int | None
    message: str


@dataclass
class ValidationReport:
    """What :func:`validate` found: the findings and a per-class table (counts, prompt token lengths)."""

    kb_id: str
    origin: str | None
    findings: list[Finding]
    class_stats: list[dict]
    params: dict

    errors = property(lambda self: [f for f in self.findings if f.severity == "error"])
    warnings = property(lambda self: [f for f in self.findings if f.severity == "warning"])
    ok = property(lambda self: not self.errors, doc="True when no finding is an error (warnings allowed).")

    def to_frame(self) -> pd.DataFrame:
        """Findings as a table: severity, check, class, index, message."""
        return pd.DataFrame(map(dataclasses.astuple, self.findings),
                            columns=["severity", "check", "class", "index", "message"])

    def counts_frame(self) -> pd.DataFrame:
        """Per class: descriptions, max and mean prompt tokens, errors, warnings."""
        return pd.DataFrame(self.class_stats)

    def to_text(self, max_findings: int | None = 50) -> str:
        p, w = self.params, max([len(s["class"]) for s in self.class_stats] + [5])
        shown = self.findings[:max_findings]
        return "\n".join([
            (f"knowledge base {self.kb_id}{f' ({self.origin})' if self.origin else ''}: "
             f"{'OK' if self.ok else 'FAILED'} — {len(self.errors)} error(s), {len(self.warnings)} warning(s)"),
            (f"checks: min_count={p['min_count']}, template={p['template']!r}, context_length={p['context_length']}, "
             f"token check={'on' if p['token_check'] else 'off'}"),
            f"  {'class':<{w}}  descriptions  max_tokens  errors  warnings",
            *[f"  {s['class']:<{w}}  {s['descriptions']:>12}  {s['max_tokens'] or '-':>10}  {s['errors']:>6}  "
              f"{s['warnings']:>8}" for s in self.class_stats],
            *[f"{f.severity.upper():7} {f.check}{'' if f.cls is None else f' [{f.cls}'}"
              f"{'' if f.index is None else f' #{f.index}'}{'' if f.cls is None else ']'}: {f.message}" for f in shown],
            *[f"... {len(self.findings) - len(shown)} more finding(s) (to_frame() or --all shows all)"]
            * (len(shown) < len(self.findings))])

    __str__ = to_text


@functools.lru_cache(maxsize=4)
def _load_tokenizer(name: str, clip: bool) -> Any:
    cls = transformers.CLIPTokenizer if clip else transformers.AutoTokenizer
    return cls.from_pretrained(name, local_files_only=True)


def default_tokenizer(model: str | os.PathLike | None = None) -> Any:
    """The tokenizer prompt lengths are counted with: ``model``'s own (hub id or folder, local files only), else
    the OpenAI CLIP tokenizer in ``$KPL_TOKENIZER_DIR``. Raises :class:`KnowledgeBaseError` saying how to get one."""
    folder = paths.tokenizer_dir(required=False) if model is None else None
    reason = "no CLIP tokenizer folder (KPL_TOKENIZER_DIR is unset or not a folder)"
    try:
        if model is not None or folder is not None:
            return _load_tokenizer(str(model or folder), model is None)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = f"cannot load the tokenizer of {str(model or folder)!r} from local files ({type(e).__name__})"
    raise KnowledgeBaseError(f"{reason}. Name a checkpoint that is available locally " + fix(
        cli="--model <hub id or folder>", python="tokenizer='<hub id or folder>'") + " or set KPL_TOKENIZER_DIR.")


def _words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[^\W_]+", text.lower()))


def _kb_findings(kb: KnowledgeBase, class_names: list[str] | None, template: str) -> Iterator[Finding]:
    """Findings about the KB as a whole: coverage of the dataset's classes and the prompt style."""
    for name in (n for n in class_names or [] if n not in kb.class_names):
        near = _near_match(name, kb.class_names)
        yield Finding("error", "coverage", name, None, (
            f"dataset class {name!r} is missing; the KB has {near!r}, which differs only in case/spacing/underscores. "
            f"Rename it to {name!r} (the image-folder name); keep the readable form in display_name." if near else
            f"dataset class {name!r} has no entry in the KB."))
    for name in (n for n in kb.class_names if class_names is not None and n not in class_names
                 and not _near_match(n, class_names)):
        yield Finding("warning", "coverage", name, None, f"KB class {name!r} has no images in the dataset (classes "
                                                         f"{class_names}); it is left out when the KB is used with it.")
    if (kb.source or {}).get("kind") == "prompts" and "which has" in template:
        yield Finding("warning", "prompt_style", None, None, (
            f"this KB holds full-sentence prompts (CuPL style), not short features; inside {template!r} they read "
            "badly — encode them with template '{description}' instead."))


@dataclass
class _Checks:
    """The per-class checks of one :func:`validate` pass, with what they read across classes."""

    kb: KnowledgeBase
    min_count: int
    near_ratio: float
    context_length: int
    owner: dict[str, str]  # lower-cased text -> the first class that has it
    mentions: dict[str, list[tuple[tuple[str, ...], str, str]]]  # first word -> (words, class, the name as written)

    def __call__(self, c: KBClass, n: list[int]) -> list[Finding]:
        """The findings about class ``c`` (``n``: its prompts' token counts, or empty) in report order."""
        out, texts = [], c.texts
        add = lambda severity, check, msg, j=None: out.append(Finding(severity, check, c.name, j, msg))
        if next(x for x in self.kb.classes if x.name == c.name) is not c:
            add("error", "duplicate_class", "class appears more than once in the KB.")
        if len(texts) < self.min_count:
            add("error", "count", f"{len(texts)} description(s), fewer than min_count={self.min_count}.")
        if self.kb.method == "curated" and not c.references:
            add("warning", "references", "curated class lists no references.")
        norms = [" ".join(_words(t)) for t in texts]
        for j, t in enumerate(texts):
            if not t.strip():
                add("error", "empty", "empty description.", j)
                continue
            if (i := next((i for i in range(j) if texts[i].strip() == t.strip()), None)) is not None:
                add("error", "duplicate", f"exact duplicate of #{i}: {t!r}.", j)
            for i in (i for i in range(j) if norms[i] and texts[i].strip() != t.strip()):
                # the same words, or a difflib ratio >= near_ratio (a plural, a typo, one word changed)
                sm, r = difflib.SequenceMatcher(None, norms[i], norms[j], autojunk=False), self.near_ratio
                if norms[i] == norms[j] or sm.real_quick_ratio() >= r and sm.quick_ratio() >= r and sm.ratio() >= r:
                    add("warning", "near_duplicate", f"same text as #{i} up to case/punctuation: {t!r}."
                        if norms[i] == norms[j] else
                        f"near-duplicate of #{i} (similarity {sm.ratio():.2f}): {t!r} ~ {texts[i]!r}.", j)
                    break
            if (first := self.owner[t.strip().lower()]) != c.name:
                add("warning", "shared_text", f"the same text is also a description of class {first!r}: {t!r}.", j)
            words, hits = _words(t), {}  # another class's folder name (_ read as a space) or display name
            for k, w in enumerate(words):
                for pw, other, phrase in self.mentions.get(w, ()):
                    if other != c.name and words[k:k + len(pw)] == pw:
                        hits.setdefault(other, phrase)
            if hits:
                add("error", "names_other_class", "mentions " + ", ".join(
                    f"{p!r}, the name of class {o!r}" for o, p in hits.items()) + f": {t!r}. Rephrase without naming "
                    "another class (its words pull this class's proxy towards that class).", j)
            if n and n[j] > self.context_length:
                add("error", "token_length", f"prompt is {n[j]} CLIP tokens (incl. BOS/EOS) > {self.context_length}; "
                                             f"CLIP would truncate it. Shorten: {t!r}.", j)
        return out


def check_template(template: str) -> None:
    """Refuse a description template without both ``{class_name}`` and ``{description}`` fields."""
    if "{class_name}" not in template or "{description}" not in template:
        raise KnowledgeBaseError(f"template {template!r} must contain '{{class_name}}' and '{{description}}' "
                                 + fix(cli="--template '... {class_name} ... {description}'", python="template=..."))


def validate(kb: KnowledgeBase, class_names: Sequence[str] | None = None, tokenizer: Any = None,
             template: str = KPL_TEMPLATE, min_count: int | None = None, check_tokens: bool = True,
             near_duplicate_ratio: float = NEAR_DUPLICATE_RATIO) -> ValidationReport:
    """Check a KB, against a dataset's ``class_names`` when given, and return every finding.

    Errors (``report.ok`` False): a dataset class missing from the KB (a near-match named), a class with fewer than
    ``min_count`` descriptions (default 40 for curated KBs, else 1), empty or duplicate descriptions, a prompt
    ``template.format(class_name=display_name, description=text)`` longer than the tokenizer's limit (else 77: the
    text encoder would truncate it), and a description that names another class — its words pull this class's proxy
    towards the other class. Warnings: KB classes without images in the dataset, near-duplicates, the same text in
    two classes, a curated class without references, CuPL sentences inside the "which has" template, and a skipped
    token check.

    ``tokenizer``: a Hugging Face tokenizer, a checkpoint (hub id or folder, local files only) whose tokenizer to use,
    or None for the CLIP tokenizer in ``$KPL_TOKENIZER_DIR``. When none loads, the token check is skipped with a
    warning that says how to enable it; ``check_tokens=False`` turns it off.
    """
    check_template(template)
    dataset, tok, findings = None if class_names is None else list(class_names), None, []
    try:
        if check_tokens:
            tok = default_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike, type(None))) else tokenizer
    except KnowledgeBaseError as e:
        findings.append(Finding("warning", "token_length", None, None, f"prompt token lengths not checked: {e}"))
    findings += _kb_findings(kb, dataset, template)
    prompts = [template.format(class_name=c.display_name, description=t) for c in kb.classes for t in c.texts]
    counted = iter(map(len, tok(prompts, add_special_tokens=True, truncation=False)["input_ids"] if tok and prompts
                       else []))
    limit = getattr(tok, "model_max_length", CONTEXT_LENGTH)
    display, mentions = {c.name: c.display_name for c in kb.classes}, {}
    for name in kb.class_names if dataset is None else dataset:
        for phrase in dict.fromkeys([name.replace("_", " ").strip(), display.get(name, name)]):
            if words := _words(phrase):
                mentions.setdefault(words[0], []).append((words, name, phrase))
    checks = _Checks(kb, min_count if min_count is not None else CURATED_MIN_COUNT if kb.method == "curated" else 1,
                     near_duplicate_ratio, limit if limit < 100_000 else CONTEXT_LENGTH,
                     {t.strip().lower(): c.name for c in reversed(kb.classes) for t in c.texts}, mentions)
    stats = []
    for c in kb.classes:
        n = [next(counted) for _ in c.texts] if tok else []
        findings += (mine := checks(c, n))
        stats.append({"class": c.name, "display_name": c.display_name, "descriptions": len(c.texts),
                      "max_tokens": max(n, default=None), "mean_tokens": round(sum(n) / len(n), 1) if n else None,
                      "errors": sum(f.severity == "error" for f in mine),
                      "warnings": sum(f.severity == "warning" for f in mine)})
    return ValidationReport(kb.kb_id, kb.origin, findings, stats, {
        "class_names": dataset, "min_count": checks.min_count, "template": template,
        "context_length": checks.context_length, "token_check": tok is not None,
        "near_duplicate_ratio": near_duplicate_ratio})


# ------------------------------------------------------------------------------------------------ generic knowledge
@functools.lru_cache(maxsize=1)
def _generic_table() -> dict[str, dict]:
    return json.loads((_HERE / "generic_descriptions.json").read_text("utf-8"))


def generic_descriptions(modality: str) -> list[str]:
    """Descriptions that fit any class of an imaging modality: the "generic knowledge" control.

    They keep the prompt's form and the modality's words but carry no class knowledge, so KPL run on them measures
    what class knowledge adds. ``modality`` (e.g. "paediatric chest X-ray") maps to the first family of
    ``kplib/io/generic_descriptions.json`` whose name or one of whose ``match`` words it contains, case-insensitively.
    """
    families = _generic_table()["families"]
    family = next((f for name, f in families.items() if any(w in str(modality).lower()
                                                            for w in [name.lower(), *f["match"]])), None)
    if family is None:
        raise KPLInputError(f"no generic descriptions for modality {modality!r}; the families are "
                            + "; ".join(f"{n!r} (matched by {f['match']})" for n, f in families.items())
                            + ". Pass a modality that names one of them.")
    return list(family["descriptions"])
