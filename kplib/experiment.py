"""Glue: dataset + encoder + knowledge base → embeddings (cached) → ``run_method`` → result with provenance.

Encoding images is the cost of every experiment, so :func:`embed_dataset` goes through the content-addressed
:class:`kplib.cache.EmbeddingCache` (the key covers the model, its revision, the preprocessing, the decoder and the
image bytes): a second run over the same folder reads every embedding from the cache. Every embedding set and every
result carries the :class:`~kplib.encoders.EncoderIdentity` that produced it — the untrained stand-in says so.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import Tensor

from . import __version__
from ._checks import check_choice, check_int
from .encoders import ON_ERROR, ClipEncoder, EncoderIdentity, LongPrompt, load_encoder
from .errors import KPLInputError
from .knowledge import KPL_TEMPLATE, KnowledgeBase, load_kb

if TYPE_CHECKING:  # methods.py is imported lazily: it is only needed to run a method
    from .data import ImageFolderDataset
    from .methods import KPLConfig, MethodResult, TextEmbeddings

log = logging.getLogger("kplib")

__all__ = ["KPL_TEMPLATE", "DEFAULT_NAME_TEMPLATES", "EmbeddingSet", "resolve_dataset", "resolve_kb",
           "embed_dataset", "embed_knowledge", "run_experiment", "provenance", "EMBEDDING_SET_FORMAT",
           "cached_run_method"]

#: Class-name prompts of the zero-shot baseline: a small template ensemble (averaged per class by ``zero_shot``).
DEFAULT_NAME_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a medical image of a {}.",
    "an image showing a {}.",
    "a close-up photo of a {}.",
)
EMBEDDING_SET_FORMAT = "kplib.EmbeddingSet/1"


@dataclass
class EmbeddingSet:
    """Image embeddings of one dataset with the labels, paths, class list and the encoder that produced them."""

    embeddings: Tensor                      # (N, d) float32, unit rows
    labels: Tensor                          # (N,) int64 (the folder's class; used only for evaluation)
    paths: list[str]                        # image paths, in row order
    class_names: list[str]                  # sorted folder names
    encoder: EncoderIdentity
    dataset: str
    display_names: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason) left out with on_error="skip"
    cache_stats: dict | None = None         # {"hits", "misses", ...} of this call; None without cache
    meta: dict = field(default_factory=dict)  # dataset description, dtype, preprocessing, kplib version

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def counts(self) -> dict[str, int]:
        per = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        return dict(zip(self.class_names, per))

    def save(self, path: str | os.PathLike) -> Path:
        """Write to a ``.pt`` file (plain tensors, lists and dicts; loadable with ``weights_only=True``)."""
        path = Path(path)
        torch.save({
            "format": EMBEDDING_SET_FORMAT, "embeddings": self.embeddings.contiguous(), "labels": self.labels,
            "paths": list(self.paths), "class_names": list(self.class_names), "encoder": self.encoder.to_dict(),
            "dataset": self.dataset, "display_names": self.display_names,
            "skipped": [list(s) for s in self.skipped], "meta": self.meta,
        }, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EmbeddingSet":
        """Read a file written by :meth:`save` (safe loading: no pickled code)."""
        path = Path(path)
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise KPLInputError(f"embedding file {path} not found") from None
        except Exception as exc:
            raise KPLInputError(f"cannot read embedding file {path}: {exc}") from None
        if not isinstance(d, dict) or d.get("format") != EMBEDDING_SET_FORMAT:
            raise KPLInputError(f"{path} is not a kplib embedding set (format {EMBEDDING_SET_FORMAT!r})")
        return cls(embeddings=d["embeddings"], labels=d["labels"], paths=list(d["paths"]),
                   class_names=list(d["class_names"]), encoder=EncoderIdentity.from_dict(d["encoder"]),
                   dataset=d["dataset"], display_names=d.get("display_names"),
                   skipped=[tuple(s) for s in d.get("skipped", [])], meta=d.get("meta", {}))


# ------------------------------------------------------------------------------------------------- datasets
def resolve_dataset(dataset, limit_per_class: int | None = None, seed: int = 0) -> "ImageFolderDataset":
    """A registered dataset name (``kplib.data.DATASETS``), an image folder, or an ``ImageFolderDataset``."""
    from .data import DATASETS, ImageFolderDataset, get_dataset, load_image_folder

    if isinstance(dataset, ImageFolderDataset):
        if limit_per_class is not None:
            raise KPLInputError("limit_per_class applies when the dataset is given by name or folder; "
                                "pass the ImageFolderDataset already limited instead")
        return dataset
    if isinstance(dataset, (str, os.PathLike)):
        text = str(dataset)
        if text in DATASETS:
            return get_dataset(text, limit_per_class=limit_per_class, seed=seed)
        if Path(text).expanduser().is_dir():
            return load_image_folder(text, split=None, limit_per_class=limit_per_class, seed=seed)
        raise KPLInputError(f"dataset {text!r} is neither a registered dataset ({sorted(DATASETS)}) nor an existing "
                            "folder laid out as <folder>/<class>/<image> or <folder>/<split>/<class>/<image>")
    raise KPLInputError(f"dataset must be a name, a folder or an ImageFolderDataset, got {type(dataset).__name__}")


def _image_namespace(encoder: ClipEncoder) -> dict:
    from .data import DECODE_DESCRIPTION

    return {"kind": "image", **encoder.fingerprint(), "decode": DECODE_DESCRIPTION}


def _text_namespace(encoder: ClipEncoder) -> dict:
    fp = encoder.fingerprint()
    return {"kind": "text", "model": fp["model"], "revision": fp["revision"], "is_standin": fp["is_standin"],
            "dtype": fp["dtype"], "context_length": encoder.context_length, "tokenizer": encoder.tokenizer_digest}


def embed_dataset(dataset, encoder: ClipEncoder, cache: bool = True, on_error: str = "stop", batch_size: int = 32,
                  progress: bool = True, num_workers: int | None = None, limit_per_class: int | None = None,
                  seed: int = 0) -> EmbeddingSet:
    """Encode every image of ``dataset`` (name, folder or ``ImageFolderDataset``) with ``encoder``.

    ``cache=True`` reads known images from the embedding cache (``$KPL_CACHE_DIR``) and stores new ones; the
    returned set's ``cache_stats`` says how many were hits. ``on_error="stop"`` raises
    :class:`~kplib.errors.ImageDecodeError` on the first undecodable file; ``"skip"`` leaves such files out, lists
    them in ``skipped`` and logs a warning.
    """
    from .cache import EmbeddingCache
    from .data import ImageFolderDataset

    check_choice(on_error, "on_error", ON_ERROR)
    check_int(batch_size, "batch_size")
    if not isinstance(encoder, ClipEncoder):
        raise KPLInputError(f"encoder must be a ClipEncoder from kplib.encoders.load_encoder, got "
                            f"{type(encoder).__name__}")
    ds = resolve_dataset(dataset, limit_per_class=limit_per_class, seed=seed)
    assert isinstance(ds, ImageFolderDataset)
    paths = list(ds.paths)
    n = len(paths)
    if n == 0:
        raise KPLInputError(f"dataset {ds.name!r} ({ds.root}) has no images")

    failures: dict[int, str] = {}
    rows: dict[int, Tensor] = {}
    store = EmbeddingCache(_image_namespace(encoder)) if cache else None
    keys: list[str | None] = [None] * n
    if store is not None:
        for i, p in enumerate(paths):
            try:
                keys[i] = store.key_for_bytes(Path(p).read_bytes())
            except OSError as exc:
                # unreadable file: let the decoder give the human reason (and honour on_error)
                log.debug("cannot hash %s (%s)", p, exc)
        found = store.get_many([k for k in keys if k is not None])
        for i, k in enumerate(keys):
            if k is not None and k in found:
                rows[i] = found[k]
    todo = [i for i in range(n) if i not in rows]
    if todo and on_error == "stop":
        # decode every image still to encode before the model runs on any batch, so a bad file at the end of a
        # large folder stops the run at once; the error lists every bad file and says how to skip them
        from .data import scan_images
        scan_images(ds.subset(todo), on_error="stop")
    if todo:
        log.info("encoding %d of %d images of %s with %s", len(todo), n, ds.name, encoder.identity.label)
        enc = encoder.encode_images_detailed([paths[i] for i in todo], batch_size=batch_size, progress=progress,
                                             num_workers=num_workers, on_error=on_error)
        for j, reason in enc.failures:
            failures[todo[j]] = reason
        new = {}
        for row, j in zip(enc.embeddings, enc.indices):
            rows[todo[j]] = row
            if store is not None and keys[todo[j]] is not None:
                new[keys[todo[j]]] = row
        if store is not None and new:
            store.put_many(new)
    keep = [i for i in range(n) if i in rows]
    if failures:
        left = torch.bincount(ds.labels[keep], minlength=ds.num_classes) if keep else torch.zeros(ds.num_classes)
        empty = [c for c, k in zip(ds.class_names, left.tolist()) if k == 0]
        if empty:
            raise KPLInputError(f"no readable image left in class(es) {empty} of {ds.root} after skipping "
                                f"{len(failures)} undecodable file(s)")
        log.warning("left out %d undecodable image(s) of %s: %s", len(failures), ds.name,
                    "; ".join(f"{paths[i]}: {r}" for i, r in list(failures.items())[:5]))
    stats = dict(store.stats.as_dict(), n_encoded=len(todo) - len(failures)) if store is not None else None
    if stats is not None:
        log.info("embedding cache for %s: %d hit(s), %d miss(es)", ds.name, stats["hits"], stats["misses"])
    desc = ds.describe()
    desc.update(n_images=len(keep), counts=dict(zip(ds.class_names, torch.bincount(
        ds.labels[keep], minlength=ds.num_classes).tolist())),
        skipped=[(str(paths[i]), r) for i, r in sorted(failures.items())] + desc.get("skipped", []))
    return EmbeddingSet(
        embeddings=torch.stack([rows[i] for i in keep]).float(),
        labels=ds.labels[keep].clone(),
        paths=[str(paths[i]) for i in keep],
        class_names=list(ds.class_names),
        encoder=encoder.identity,
        dataset=ds.name,
        display_names=list(ds.display_names),
        skipped=[(str(paths[i]), r) for i, r in sorted(failures.items())],
        cache_stats=stats,
        meta={"dataset": desc, "dtype": encoder.dtype, "preprocessing": encoder.preprocessing,
              "kplib_version": __version__},
    )


# ------------------------------------------------------------------------------------------------- knowledge
def _encode_texts_cached(encoder: ClipEncoder, texts: list[str], cache: bool, batch_size: int) -> Tensor:
    """Encode prompts, reading/writing the cache by exact text (length checks are done by the caller)."""
    if not texts:
        return torch.empty(0, encoder.embed_dim)
    if not cache:
        return _encode_plain(encoder, texts, batch_size)
    from .cache import EmbeddingCache

    store = EmbeddingCache(_text_namespace(encoder))
    keys = [store.key_for_text(t) for t in texts]
    return store.get_or_compute(keys, lambda idx: _encode_plain(encoder, [texts[i] for i in idx], batch_size))


def _encode_plain(encoder: ClipEncoder, texts: list[str], batch_size: int) -> Tensor:
    import warnings

    from .encoders import PromptTruncationWarning

    with warnings.catch_warnings():  # already reported, with class and description, by embed_knowledge
        warnings.simplefilter("ignore", PromptTruncationWarning)
        return encoder.encode_texts(texts, batch_size=batch_size)


def embed_knowledge(kb: KnowledgeBase | str | os.PathLike, encoder: ClipEncoder, class_names: Sequence[str],
                    template: str = KPL_TEMPLATE, name_templates: Sequence[str] = DEFAULT_NAME_TEMPLATES,
                    display_names: Sequence[str] | None = None, strict: bool = False, cache: bool = True,
                    batch_size: int = 256) -> "TextEmbeddings":
    """Encode a KB for the dataset's classes → :class:`kplib.methods.TextEmbeddings`.

    Description prompts are ``template.format(class_name=<display name>, description=<text>)`` (method doc, stage 1
    step 1); class-name prompts are each of ``name_templates`` filled with the display name (zero-shot baseline).
    Display names are the KB's unless ``display_names`` is given. Prompts longer than the text context are
    truncated as CLIP does, with a warning that names the class and description (``strict=True`` raises instead).
    """
    from .methods import TextEmbeddings

    if not isinstance(kb, KnowledgeBase):
        kb = load_kb(kb)
    class_names = list(class_names)
    kb = kb.select(class_names)
    if "{class_name}" not in template or "{description}" not in template:
        raise KPLInputError(f"template {template!r} must contain '{{class_name}}' and '{{description}}'")
    name_templates = list(name_templates)
    if not name_templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in name_templates):
        raise KPLInputError(f"name_templates must be a non-empty list of strings with one '{{}}' each, got "
                            f"{name_templates!r}")
    if display_names is None:
        display = list(kb.display_names)
    else:
        display = [str(d) for d in display_names]
        if len(display) != len(class_names):
            raise KPLInputError(f"display_names has {len(display)} entries for {len(class_names)} classes")
    descriptions = kb.descriptions()
    for name, descs in zip(class_names, descriptions):
        dupes = sorted({t for t in descs if descs.count(t) > 1})
        if dupes:  # encoded as often as they appear, they count more than once in the top-K text proxy
            log.warning("knowledge base %s, class %r: %d duplicate description(s) %s count more than once in the "
                        "top-K text proxy; remove them (`kpl kb validate` lists them)", kb.origin or kb.kb_id,
                        name, len(dupes), [d[:60] for d in dupes[:3]])

    prompts, labels, owner = [], [], []
    for c, (name, shown, descs) in enumerate(zip(class_names, display, descriptions)):
        for m, text in enumerate(descs):
            prompts.append(template.format(class_name=shown, description=text))
            labels.append(f"class {name!r}, description {m}")
            owner.append(c)
    name_prompts = [t.format(shown) for shown in display for t in name_templates]
    name_labels = [f"class {name!r}, name template {t!r}" for name in class_names for t in name_templates]
    long: list[LongPrompt] = encoder.check_prompt_lengths(prompts + name_prompts, labels=labels + name_labels,
                                                          strict=strict)

    desc_emb = _encode_texts_cached(encoder, prompts, cache, batch_size)
    name_emb = _encode_texts_cached(encoder, name_prompts, cache, batch_size)
    owner_t = torch.tensor(owner, dtype=torch.long)
    per_class = [desc_emb[owner_t == c] for c in range(len(class_names))]
    meta = {
        "encoder": encoder.identity.to_dict(),
        "encoder_label": encoder.identity.label,
        "kb_id": kb.kb_id, "kb_method": kb.method, "kb_origin": kb.origin,
        "template": template, "name_templates": name_templates, "display_names": display,
        "n_descriptions": [len(d) for d in descriptions],
        "long_prompts": [{"label": p.label, "n_tokens": p.n_tokens, "context_length": p.context_length}
                         for p in long],
        "dtype": encoder.dtype,
    }
    return TextEmbeddings(
        class_names=class_names,
        name_embeddings=name_emb.reshape(len(class_names), len(name_templates), -1),
        description_embeddings=per_class,
        descriptions=[list(d) for d in descriptions],
        templates=name_templates,
        meta=meta,
    )


# ------------------------------------------------------------------------------------------------- experiments
def default_kb_for(dataset_name: str) -> str | KnowledgeBase | None:
    """The default KB of a registered dataset: its curated KB name (``DatasetInfo.kb``), else a published
    descriptor set imported at run time (``imagenet_sample``: DCLIP, :func:`kplib.knowledge.dclip_imagenet_kb`),
    else None."""
    from .data import DATASETS
    from .knowledge import dclip_imagenet_kb

    info = DATASETS.get(dataset_name)
    if info is None:
        return None
    if info.kb is not None:
        return info.kb
    if dataset_name == "imagenet_sample":
        return dclip_imagenet_kb(dataset=dataset_name)
    return None


def run_experiment(dataset, method: str, model: str | ClipEncoder = "auto", kb=None,
                   config: "KPLConfig | None" = None, limit_per_class: int | None = None, seed: int = 0, *,
                   device: str | None = None, dtype: str = "float32", batch_size: int = 32, cache: bool = True,
                   on_error: str = "stop", progress: bool = True, template: str = KPL_TEMPLATE,
                   name_templates: Sequence[str] = DEFAULT_NAME_TEMPLATES, strict_prompts: bool = False,
                   **overrides: Any) -> "MethodResult":
    """Run one method on one dataset end to end and return its :class:`~kplib.methods.MethodResult` with
    ``meta`` filled: encoder identity and label, dataset (name, counts, limit, seed), KB id and method, config,
    seed, kplib version, date, cache statistics, and the labels/paths of the rows (for evaluation).

    ``dataset``: registered name, folder or ``ImageFolderDataset``. ``model``: as :func:`load_encoder`, or an
    already loaded :class:`ClipEncoder` (reuse it across calls). ``kb``: KB name/path/object; ``None`` uses the
    dataset's curated KB when the registry has one. ``limit_per_class``/``seed``: seeded subset of the images.
    ``**overrides``: KPLConfig fields passed to ``run_method``.
    """
    from .methods import run_method

    encoder = model if isinstance(model, ClipEncoder) else load_encoder(model, device=device, dtype=dtype)
    emb = embed_dataset(dataset, encoder, cache=cache, on_error=on_error, batch_size=batch_size, progress=progress,
                        limit_per_class=limit_per_class, seed=seed)
    kb_obj = resolve_kb(kb, emb.dataset)
    text = embed_knowledge(kb_obj, encoder, emb.class_names, template=template, name_templates=name_templates,
                           strict=strict_prompts, cache=cache)
    if config is None and method not in ("zero_shot", "descriptor_mean"):
        from .methods import KPLConfig

        config = KPLConfig(seed=seed)
    result = run_method(method, emb.embeddings, text, config=config, **overrides)
    result.meta.update(provenance(emb, text, kb_obj, result, seed))
    result.meta["labels"] = emb.labels.clone()
    result.meta["paths"] = list(emb.paths)
    result.meta["date"] = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    result.meta["cache"] = emb.cache_stats
    return result


def resolve_kb(kb, dataset_name: str) -> KnowledgeBase:
    """A KB object, name or path; None = the dataset's default KB (:func:`default_kb_for`; error when none)."""
    if isinstance(kb, KnowledgeBase):
        return kb
    if kb is None:
        kb = default_kb_for(dataset_name)
        if kb is None:
            raise KPLInputError(f"no knowledge base given and dataset {dataset_name!r} has no curated one; pass "
                                "kb=<curated name or path to a KB JSON file> (command line: --kb; see `kpl kb list`)")
        if isinstance(kb, KnowledgeBase):  # a published set imported at run time
            return kb
    return load_kb(kb)


def provenance(emb: EmbeddingSet, text: "TextEmbeddings", kb: KnowledgeBase | None, result: "MethodResult",
               seed: int) -> dict:
    """Deterministic provenance of a result (no timings, dates or cache statistics)."""
    ds = emb.meta.get("dataset", {})
    return {
        "encoder": emb.encoder.to_dict(),
        "encoder_label": emb.encoder.label,
        "is_standin": emb.encoder.is_standin,
        "dtype": emb.meta.get("dtype"),
        "dataset": emb.dataset,
        "dataset_root": ds.get("root"),
        "n_images": len(emb),
        "counts": emb.counts(),
        "skipped": [list(s) for s in emb.skipped],
        "limit_per_class": ds.get("limit_per_class"),
        "kb_id": kb.kb_id if kb is not None else None,
        "kb_method": kb.method if kb is not None else None,
        "kb_origin": kb.origin if kb is not None else None,
        "template": text.meta.get("template"),
        "name_templates": text.meta.get("name_templates"),
        "long_prompts": text.meta.get("long_prompts"),
        "method": result.method,
        "config": result.config,
        "seed": seed,
        "kplib_version": __version__,
    }


# ------------------------------------------------------------------------------------------------- result cache
def _feed(h: "hashlib._Hash", obj: Any) -> None:
    """Feed ``obj`` into ``h`` canonically: type-tagged and length-prefixed, mappings in sorted key order, floats by
    exact ``repr``, tensors/arrays by dtype, shape, device and raw bytes. Unsupported types raise TypeError."""
    def blob(tag: bytes, data) -> None:
        data = memoryview(data).cast("B")
        h.update(tag + len(data).to_bytes(8, "little"))
        h.update(data)

    if obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):
        h.update(b"B1" if obj else b"B0")
    elif isinstance(obj, int):
        blob(b"I", str(obj).encode())
    elif isinstance(obj, float):
        blob(b"F", repr(obj).encode())
    elif isinstance(obj, str):
        blob(b"S", obj.encode("utf-8"))
    elif isinstance(obj, (bytes, bytearray)):
        blob(b"Y", obj)
    elif isinstance(obj, Tensor):
        t = obj.detach()
        blob(b"T", f"{t.dtype}|{tuple(t.shape)}|{t.device}".encode())
        blob(b"D", t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("numpy object arrays")
        blob(b"A", f"{obj.dtype.str}|{obj.shape}".encode())
        blob(b"D", np.ascontiguousarray(obj).reshape(-1).view(np.uint8))
    elif isinstance(obj, os.PathLike):
        blob(b"P", os.fspath(obj).encode("utf-8"))
    elif isinstance(obj, dict):
        h.update(b"M" + len(obj).to_bytes(8, "little"))
        for k in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + len(obj).to_bytes(8, "little"))
        for item in obj:
            _feed(h, item)
    else:
        raise TypeError(f"cannot key a {type(obj).__name__}")


def _result_key(method: str, image_embeddings: Tensor, text: "TextEmbeddings", config: "KPLConfig") -> str:
    """sha256 over everything that can change a method's result: method, resolved config, X (dtype, shape, device,
    bytes), every field of ``text``, the torch version and the digest of kplib's own source files."""
    from . import cache as _cache

    h = hashlib.sha256()
    _feed(h, {
        "format": "kplib.method-result-key/1", "method": method, "config": config.to_dict(),
        "torch": torch.__version__, "kplib_code": _cache.code_digest(), "image_embeddings": image_embeddings,
        "text": {f.name: getattr(text, f.name) for f in dataclasses.fields(text)},
    })
    return h.hexdigest()


def cached_run_method(method: str, image_embeddings: Tensor, text: "TextEmbeddings",
                      config: "KPLConfig | None" = None, *, cache: bool = True, **overrides: Any) -> "MethodResult":
    """:func:`kplib.methods.run_method` through the method-result cache (:class:`kplib.cache.ResultCache` in
    ``$KPL_CACHE_DIR``): same arguments, validation and result; a repeated call reads the stored result instead of
    recomputing it.

    The key covers the method, the resolved config, the image embeddings (dtype, shape, device, bytes), every field
    of ``text``, the torch version and a digest of kplib's source. ``result.meta["result_cache"]`` says
    ``{"hit", "key" (16 hex), "computed_seconds", "stored"}``. **On a hit ``result.timings`` (and
    ``computed_seconds``) are those of the run that computed the result, not of this call.** ``cache=False``, an
    unwritable cache folder (one :class:`~kplib.cache.CacheWarning`) or inputs that cannot be keyed compute as usual.
    """
    from . import methods as _methods
    from .cache import ResultCache

    check_choice(method, "method", _methods.METHODS + ("kpl",))
    cfg = _methods.resolve_config(config, **overrides)
    key = None
    if cache and isinstance(text, _methods.TextEmbeddings):  # otherwise run_method raises its own error
        try:
            key = _result_key(method, image_embeddings, text, cfg)
        except TypeError as exc:
            log.warning("method result not cached: an input cannot be keyed (%s)", exc)
    store = ResultCache() if key is not None else None
    if store is not None:
        found = store.get(key)
        if found is not None:
            found.meta["result_cache"] = {"hit": True, "key": key[:16],
                                          "computed_seconds": found.timings.get("total"), "stored": True}
            return found
    result = _methods.run_method(method, image_embeddings, text, cfg)
    stored = store.put(key, result) if store is not None else False
    result.meta["result_cache"] = {"hit": False, "key": key[:16] if key else None,
                                   "computed_seconds": result.timings.get("total"), "stored": stored}
    return result
