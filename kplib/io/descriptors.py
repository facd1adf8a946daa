"""Descriptor files into knowledge bases: the files people write and the published descriptor sets.

:func:`import_descriptors` recognises a file's shape (``{class: [text]}`` and variants, descriptor sets
``{set: {class: [text]}}``, Explicd's criteria table), cleans the texts, matches the classes to a dataset's folders
explicitly and returns a KB (method ``imported``) recording where each description came from. The published sets under
``$KPL_DESCRIPTORS_ROOT`` are read at run time, never copied.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import KnowledgeBaseError, KPLInputError, fix
from . import datasets
from .knowledge import (
    SCHEMA_VERSION,
    Description,
    KBClass,
    KnowledgeBase,
    _class_map_fix,
    _name_key,
    _near_match,
    _read_json,
)

log = logging.getLogger("kplib")

#: Published descriptor sets that fit a registered dataset: ``(file, set, class_map {file class: folder})``.
PUBLISHED_MATCHES: dict[str, list[tuple[str, str | None, dict[str, str]]]] = {
    "tb_cxr_nitrd_da": [("zero_shot_unseen_pulmonary/dk4o_descriptors.json", "disease_descriptors_NLM",
                         {"No Finding": "normal", "Tuberculosis": "tuberculosis"})],
    "chest_xray_pneumonia": [("zero_shot_unseen_pulmonary/multixpert_descriptors.json",
                              "disease_descriptors_Pneumonia", {"Normal": "NORMAL", "Pneumonia": "PNEUMONIA"})],
}
DCLIP_IMAGENET_FILE = "classify_by_description/descriptors_imagenet.json"
DCLIP_CITATION = ("S. Menon and C. Vondrick, 'Visual Classification via Description from Large Language Models', "
                  "ICLR 2023 (DCLIP)")


# ------------------------------------------------------------------------------------------------ one file
def _recognise(data: Any) -> tuple[str, dict, dict, dict]:
    """``(format, classes or sets, display names, metadata)`` of a parsed file, recognised by its structure."""
    if not isinstance(data, dict):
        raise KnowledgeBaseError(f"unrecognised structure: a JSON object {{class: [descriptions]}} was expected, got "
                                 f"{type(data).__name__}")
    if "schema_version" in data:
        raise KnowledgeBaseError("this is already a schema-v1 knowledge base: use it as it is (load_kb, --kb)")
    crit = next((k for k in data if k.startswith("per_class_criteria")), None)
    if crit and isinstance(data[crit], dict) and all(isinstance(v, dict) for v in data[crit].values()):
        table = {c: [f"{axis}: {text}" if isinstance(text, str) else text for axis, text in axes.items()]
                 for c, axes in data[crit].items()}
        return "criteria_table", table, {}, {}
    if "classes" in data:
        payload, display = data["classes"], {}
        if isinstance(payload, list) and all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in payload):
            display = {c["name"]: c["display_name"] for c in payload if isinstance(c.get("display_name"), str)}
            payload = {c["name"]: c.get("descriptions") for c in payload}
        if not isinstance(payload, dict) or not payload:
            raise KnowledgeBaseError("'classes' must map each class to its descriptions, or list objects "
                                     '{"name": ..., "descriptions": [...]}')
        return "classes", payload, display, {k: v for k, v in data.items() if k != "classes"}
    classes = {k: v for k, v in data.items() if isinstance(v, list)}
    sets = {k: v for k, v in data.items() if isinstance(v, dict) and v and all(isinstance(x, list) for x in v.values())}
    if classes and sets:
        raise KnowledgeBaseError(f"mixes classes {sorted(classes)[:5]} with descriptor sets {sorted(sets)[:5]}")
    if not classes and not sets:
        raise KnowledgeBaseError("unrecognised structure: no class found (a class is a key whose value is a list of "
                                 "descriptions)")
    meta = {k: v for k, v in data.items() if k not in classes and k not in sets}
    return ("nested", sets, {}, meta) if sets else ("class_map", classes, {}, meta)


def _pick_set(fmt: str, raw: dict, subset: str | None) -> dict:
    if fmt != "nested":
        if subset is not None:
            raise KnowledgeBaseError(f"holds a single set of classes; do not choose a set ({subset!r})")
        return raw
    first = next(iter(raw))
    if subset is None and len(raw) > 1:
        raise KnowledgeBaseError(f"holds several descriptor sets {list(raw)}; choose one "
                                 + fix(cli=f"--subset {first}", python=f"subset={first!r}"))
    if (subset or first) not in raw:
        raise KnowledgeBaseError(f"has no set {subset!r}; its sets are {list(raw)}")
    return raw[subset or first]


def _clean(raw: Mapping[str, Any]) -> tuple[dict[str, list[Description]], int, int]:
    """Descriptions per class — entries checked, whitespace stripped, empty strings and exact duplicates dropped —
    and the numbers of empty strings and duplicates dropped."""
    out: dict[str, list[Description]] = {}
    n_empty = n_dup = 0
    keys: dict[str, str] = {}  # _name_key -> the first class with it
    for cls, entries in raw.items():
        if (twin := keys.setdefault(_name_key(cls), cls)) != cls:
            raise KnowledgeBaseError(f"classes {twin!r} and {cls!r} differ only in case/spacing; a class appears once "
                                     "under its image-folder name: merge them")
        if not isinstance(entries, list):
            raise KnowledgeBaseError(f"class {cls!r}: descriptions must be a list, got {type(entries).__name__}")
        kept: dict[str, Description] = {}
        for j, e in enumerate(entries):
            text, src = (e, None) if isinstance(e, str) else (None, None)
            if isinstance(e, dict) and not set(e) - {"text", "source"}:
                text, src = e.get("text"), e.get("source")
            if not isinstance(text, str) or not isinstance(src, (str, type(None))):
                raise KnowledgeBaseError(f"class {cls!r}, entry {j}: {e!r:.60} is not a description; write a string "
                                         'or an object {"text": "...", "source": "..."}')
            text = text.strip()
            n_empty += not text
            n_dup += text in kept
            if text and text not in kept:
                kept[text] = Description(text, src)
        out[cls] = list(kept.values())
    return out, n_empty, n_dup


def _align(cleaned: Mapping[str, list], names: list[str] | None, cmap: Mapping[str, str], rel: str) -> dict[str, str]:
    """``{dataset class: file class}``: exact names, or the explicit ``cmap`` ``{file class: dataset class}``."""
    for k in (k for k in cmap if k not in cleaned):
        near = _near_match(k, cleaned)
        hint = f" (did you mean {near!r}?)" if near else ""
        raise KnowledgeBaseError(f"class_map key {k!r} is not a class of {rel}{hint}; its classes are "
                                 f"{sorted(cleaned)[:20]}.")
    targets = list(cmap.values())
    bad = sorted({t for t in targets if targets.count(t) > 1 or names is not None and t not in names})
    if bad:
        raise KnowledgeBaseError(f"class_map maps onto {bad}, which are mapped twice or are not classes of the dataset "
                                 f"{names}; map one file class per dataset class.")
    if names is None:
        return {cmap.get(k, k): k for k in cleaned}
    inverse = {v: k for k, v in cmap.items()}
    for name in (n for n in names if n not in inverse and n not in cleaned):
        near = _near_match(name, cleaned)
        raise KnowledgeBaseError(
            f"dataset class {name!r} is not a class of {rel}; the file has {near!r}, which differs only in case/"
            f"spacing/underscores. Classes are never aligned silently: map it {_class_map_fix(near, name)}." if near
            else f"dataset class {name!r} cannot be matched to {rel} (classes: {sorted(cleaned)[:20]}"
                 f"{' ...' if len(cleaned) > 20 else ''}); map it explicitly {_class_map_fix('file class', name)}.")
    return {n: inverse.get(n, n) for n in names}


def _readme_provenance(folder: Path) -> dict[str, str | None]:
    """Citation (the title), licence and source lines of a descriptor folder's README."""
    readme = folder / "README.md"
    lines = readme.read_text(encoding="utf-8", errors="replace").splitlines() if readme.is_file() else []
    patterns = {"citation": r"# (.+)", "licence": r"\s*-\s*\*\*Licen[cs]e\*\*:\s*(.*)",
                "origin": r"\s*-\s*\*\*Sources?\*\*:?\s*(.*)"}
    return {key: next((m.group(1).strip() or None for m in map(re.compile(p).match, lines) if m), None)
            for key, p in patterns.items()}


def _dataset_classes(dataset: str) -> tuple[str, list[str], dict[str, str], str | None]:
    """(name, class names, display names, modality) of a registered dataset or an image folder."""
    ds = datasets.load_dataset(dataset)
    info = datasets.registry().get(dataset)
    return ds.name, list(ds.class_names), dict(zip(ds.class_names, ds.display_names)), getattr(info, "modality", None)


def import_descriptors(path: str | os.PathLike, class_map: Mapping[str, str] | None = None,
                       dataset: str | None = None, class_names: Sequence[str] | None = None,
                       subset: str | None = None, drop_empty_classes: bool = False) -> KnowledgeBase:
    """Convert a descriptor file (UTF-8 JSON) — as people write it, or as published — into a KB (method ``imported``).

    Structures, in the order tried: an Explicd criteria table (a ``per_class_criteria...`` key; one description
    ``"<axis>: <criterion>"`` each); ``{"classes": {class: [...]} or [{"name", "descriptions"[, "display_name"]}],
    <metadata>...}``; descriptor sets ``{set: {class: [...]}}`` (choose one with ``subset``); ``{class: [...]}``
    (CuPL's full-sentence prompts are recorded as ``kind: "prompts"``). A description is a string or
    ``{"text": ..., "source": ...}``. A top-level key whose value is a list is a class, any other is metadata, kept in
    ``source["metadata"]``; its ``dataset``, ``modality``, ``authors``, ``citation`` and ``licence`` strings fill those
    fields. Whitespace, empty strings and exact duplicates are dropped and counted in ``source["cleaning"]``.

    ``class_map`` ``{file class: dataset class}`` maps classes whose names differ (never aligned silently).
    ``dataset``: a registered dataset or an image folder whose classes, display names and modality the KB takes (with
    ``class_names`` only a label). ``class_names``: the classes to keep, each a key of the file or mapped onto; unused
    file classes are listed in ``source["unused_classes"]`` (without either, every class is kept).
    ``drop_empty_classes``: leave out classes without descriptions (``source["dropped_empty_classes"]``), not fail.
    """
    path = Path(path)
    try:  # provenance records a path under the descriptors root relative to it
        rel = path.resolve().relative_to(paths.descriptors_root().resolve()).as_posix()
    except (KPLInputError, ValueError):
        rel = str(path)
    data = _read_json(path, "descriptor")
    try:
        fmt, raw, display, meta = _recognise(data)
        cleaned, n_empty, n_dup = _clean(_pick_set(fmt, raw, subset))
    except KnowledgeBaseError as e:
        raise KnowledgeBaseError(f"file {rel}: {e}.") from None
    notes = {k: v for k, v in meta.items() if isinstance(v, str)}
    modality = notes.get("modality")
    if dataset is not None and class_names is None:
        dataset, class_names, ds_display, modality = _dataset_classes(dataset)
        display = {**display, **ds_display}
    mapping = _align(cleaned, None if class_names is None else list(class_names), dict(class_map or {}), rel)
    empty = [name for name, fk in mapping.items() if not cleaned[fk]]
    if empty and not drop_empty_classes:
        raise KnowledgeBaseError(f"file {rel}: class(es) {empty[:10]}{' ...' if len(empty) > 10 else ''} "
                                 f"({len(empty)} in all) have no non-empty descriptions; leave them out "
                                 + fix(cli="--drop-empty-classes", python="drop_empty_classes=True"))
    mapping = {name: fk for name, fk in mapping.items() if name not in empty}
    if not mapping:
        raise KnowledgeBaseError(f"file {rel}: no class left to import.")
    prov, tag = _readme_provenance(path.parent), rel + (f"#{subset}" if subset else "")
    classes = [KBClass(name, display.get(name) or display.get(fk) or fk,
                       [Description(d.text, d.source or tag) for d in cleaned[fk]]) for name, fk in mapping.items()]
    texts = [t for c in classes for t in c.texts]
    sentences = sum(t.endswith(".") and len(t.split()) >= 5 for t in texts) >= 0.6 * len(texts)
    source = {"file": rel, "citation": notes.get("citation", prov["citation"]),
              "licence": notes.get("licence", notes.get("license", prov["licence"])), "origin": prov["origin"],
              "importer": "kplib.io.descriptors.import_descriptors", "format": fmt,
              "kind": "prompts" if sentences else "descriptors", "subset": subset, "metadata": meta or None,
              "class_map": {fk: name for name, fk in mapping.items() if fk != name} or None,
              "unused_classes": [k for k in cleaned if k not in mapping.values() and k not in empty] or None,
              "dropped_empty_classes": empty or None,
              "cleaning": {"dropped_empty_strings": n_empty, "dropped_exact_duplicates": n_dup}}
    dataset = dataset or notes.get("dataset")
    kb_id = f"{dataset + '-' if dataset else ''}imported-{path.stem}{f'-{subset}' if subset else ''}"
    return KnowledgeBase(SCHEMA_VERSION, kb_id, dataset, modality, _dt.date.today().isoformat(), "imported",
                         notes.get("authors") or prov["citation"], None, source, classes, origin=str(path))


# ------------------------------------------------------------------------------------------------ published sets
def published_descriptor_files() -> list[Path]:
    """Every ``*.json`` under the descriptors root (``$KPL_DESCRIPTORS_ROOT``), sorted."""
    return sorted(p for p in paths.descriptors_root().rglob("*.json") if p.is_file())


def import_all_published() -> list[tuple[str, KnowledgeBase | str]]:
    """Every published descriptor file imported as it is, with strict defaults (a file with empty classes is refused):
    ``[(file[#set], KB or the reason it was refused)]``."""
    root, out = paths.descriptors_root(), []
    for p in published_descriptor_files():
        rel = p.relative_to(root).as_posix()
        try:
            fmt, payload, _, _ = _recognise(_read_json(p, "descriptor"))
        except KnowledgeBaseError as e:
            out.append((rel, f"file {rel}: {e}"))
            continue
        for s in list(payload) if fmt == "nested" and len(payload) > 1 else [None]:
            name = rel + (f"#{s}" if s else "")
            try:
                out.append((name, import_descriptors(p, subset=s)))
            except KnowledgeBaseError as e:
                out.append((name, str(e)))
    return out


def import_for_dataset(dataset: str, class_names: Sequence[str] | None = None) -> list[KnowledgeBase]:
    """The published descriptor sets paired with ``dataset`` (:data:`PUBLISHED_MATCHES`), imported for it."""
    if dataset not in PUBLISHED_MATCHES:
        raise KnowledgeBaseError(f"no published descriptor set is paired with dataset {dataset!r} (paired: "
                                 f"{sorted(PUBLISHED_MATCHES)}); import a file with a class map yourself "
                                 + fix(cli="kpl kb import FILE --class-map ...",
                                       python="import_descriptors(FILE, class_map=...)"))
    return [import_descriptors(paths.descriptors_root() / f, class_map=cmap, dataset=dataset, class_names=class_names,
                               subset=s)
            for f, s, cmap in PUBLISHED_MATCHES[dataset]]


def imagenet_class_map(file_classes: Sequence[str], wnid_names: Mapping[str, str], file: str = "descriptor file",
                       min_anchored: float = 0.5) -> dict[str, str]:
    """``{file class: wnid}`` for an ImageNet-1k descriptor file whose keys follow the ImageNet index order.

    DCLIP and CuPL key ImageNet by CLIP-cleaned names ("crane bird") that differ from the WordNet names for ~300
    classes ("crane" names two wnids). Key :math:`i` belongs to the :math:`i`-th sorted wnid; this is verified, never
    assumed: one unique key per wnid, every key equal to a WordNet name (up to case/spacing) sits at a wnid of that
    name, and at least ``min_anchored`` of the keys are such anchors.
    """
    keys, wnids = list(file_classes), sorted(wnid_names)
    bad = [w for w in wnids if not re.fullmatch(r"n\d{8}", str(w))]
    if bad:
        raise KnowledgeBaseError(f"ImageNet class names: {bad[:10]} are not WordNet ids (n + 8 digits); pass the "
                                 "{wnid: class name} mapping of the dataset's class_names.json.")
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup or len(keys) != len(wnids):
        raise KnowledgeBaseError(f"{file}: class key(s) {dup} occur more than once" if dup else
                                 f"{file} has {len(keys)} classes but the dataset has {len(wnids)} wnids; aligning "
                                 "by ImageNet index order needs exactly one key per wnid.")
    owners: dict[str, list[str]] = {}
    for w in wnids:
        owners.setdefault(_name_key(str(wnid_names[w])), []).append(w)
    anchors = [(i, k, w) for i, (k, w) in enumerate(zip(keys, wnids)) if _name_key(k) in owners]
    conflicts = [f"key {i} {k!r} sits at {w} ({wnid_names[w]!r}) but names {owners[_name_key(k)]}"
                 for i, k, w in anchors if w not in owners[_name_key(k)]]
    if conflicts:
        raise KnowledgeBaseError(f"{file}: key order does not follow the sorted wnids — {len(conflicts)} class(es) "
                                 f"contradict it: {'; '.join(conflicts[:10])}. Pass an explicit class_map "
                                 "{file class: wnid} instead.")
    if len(anchors) < min_anchored * len(keys):
        raise KnowledgeBaseError(f"{file}: only {len(anchors)} of {len(keys)} keys equal a WordNet class name, too "
                                 "few to verify that the key order is the ImageNet index order; pass an explicit "
                                 "class_map {file class: wnid}.")
    log.info("%s: aligned %d classes by ImageNet index order (%d verified by name)", file, len(keys), len(anchors))
    return dict(zip(keys, wnids))


def dclip_imagenet_kb(wnid_names: Mapping[str, str] | None = None, path: str | os.PathLike | None = None,
                      dataset: str = "imagenet_sample") -> KnowledgeBase:
    """The published DCLIP ImageNet descriptors (Menon & Vondrick 2023) as a KB over WordNet-id class folders.

    ``wnid_names``: ``{wnid: WordNet name}`` (default: the display names of ``dataset``); ``path`` defaults to
    :data:`DCLIP_IMAGENET_FILE` under ``$KPL_DESCRIPTORS_ROOT``. Classes are aligned by :func:`imagenet_class_map`; the
    display name is the file's CLIP-cleaned class name, as DCLIP prompts (it tells the two "crane" classes apart).
    """
    modality = None
    if wnid_names is None:
        _, names, display, modality = _dataset_classes(dataset)
        wnid_names = {n: display[n] for n in names}
    path = Path(path or paths.descriptors_root() / DCLIP_IMAGENET_FILE)
    cmap = imagenet_class_map(list(_read_json(path, "descriptor")), wnid_names, file=str(path))
    kb = import_descriptors(path, class_map=cmap, class_names=sorted(wnid_names))
    anchored = sum(_name_key(k) == _name_key(str(wnid_names[w])) for k, w in cmap.items())
    source = {**kb.source, "citation": DCLIP_CITATION, "readme_title": kb.source["citation"],
              "published_set": "DCLIP ImageNet descriptors (Menon & Vondrick 2023), GPT-3 generated",
              "class_alignment": f"by ImageNet index order (file key i = i-th sorted wnid), verified: {anchored} of "
                                 f"{len(cmap)} keys equal their wnid's WordNet name, none contradicts it",
              "display_names": "the descriptor file's CLIP-cleaned class names"}
    return dataclasses.replace(kb, kb_id=f"{dataset}-dclip-menon-vondrick-2023", dataset=dataset, modality=modality,
                               authors=DCLIP_CITATION, source=source)
