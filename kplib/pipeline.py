"""From image files and a knowledge base to a method result: the one orchestration path of the API and ``kpl run``.

::

    images = embed_images(dataset, encoder)                 # read, hash, look up the store, decode + encode misses
    text = embed_knowledge(kb, encoder, images.class_names)  # prompts of every description, class-name prompts
    result = run_method(method, images.embeddings, text, config)

:func:`run` does these three steps and the evaluation; :func:`compare` runs several methods on the same embeddings
and tests their differences on the same images. Every image file is read once and decoded at most once (only on a
miss of the embedding store). Nothing is ever written into the data folder.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from . import __version__
from .errors import ImageDecodeError, KPLInputError, fix
from .io.audit import find_leaks
from .io.datasets import ImageFolder, display_path, load_dataset, registry, unreadable_error
from .io.descriptors import dclip_imagenet_kb
from .io.encoders import Encoder, EncoderIdentity, load_encoder
from .io.images import DECODE_VERSION, decode_image, read_bytes
from .io.knowledge import KPL_TEMPLATE, KnowledgeBase, check_template, generic_descriptions, load_kb
from .io.store import EmbeddingStore, content_key, text_key
from .method import metrics
from .method.controls import CONTROLS, control_descriptions
from .method.methods import METHODS, MethodResult, TextEmbeddings, run_method
from .params import Options, check

__all__ = ["DEFAULT_NAME_TEMPLATES", "Comparison", "EmbeddingSet", "Experiment", "compare", "embed_images",
           "embed_knowledge", "run"]

log = logging.getLogger("kplib")

#: Class-name prompts of the zero-shot baseline (a small template ensemble, averaged per class).
DEFAULT_NAME_TEMPLATES = ("a photo of a {}.", "a medical image of a {}.", "an image showing a {}.",
                          "a close-up photo of a {}.")
_CHUNK = 256  # files read, hashed and decoded at a time: bounds the memory held for one round trip to the store


@dataclass
class EmbeddingSet:
    """Image embeddings of a folder: row ``i`` is ``folder.paths[i]`` (unreadable files are in ``folder.skipped``)."""

    folder: ImageFolder
    embeddings: Tensor  # (N, d) float32 unit rows
    encoder: EncoderIdentity
    stats: dict = field(default_factory=dict)  # store hits/misses, images encoded

    labels = property(lambda self: self.folder.labels)
    class_names = property(lambda self: self.folder.class_names)
    paths = property(lambda self: self.folder.paths)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the embeddings with their labels, paths, classes and encoder identity (plain tensors, lists and
        strings: :meth:`load` reads it back with ``weights_only=True``)."""
        f = self.folder
        torch.save({"format": "kplib.EmbeddingSet/2", "embeddings": self.embeddings.contiguous(), "labels": f.labels,
                    "paths": [str(p) for p in f.paths], "root": str(f.root), "class_names": list(f.class_names),
                    "display_names": list(f.display_names), "name": f.name, "encoder": self.encoder.to_dict(),
                    "skipped": [[str(p), r] for p, r in f.skipped]}, path)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EmbeddingSet:
        """Read a file written by :meth:`save` (no pickled code is executed)."""
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            folder = ImageFolder(root=Path(d["root"]), class_names=d["class_names"], display_names=d["display_names"],
                                 paths=[Path(p) for p in d["paths"]], labels=d["labels"], name=d["name"],
                                 skipped=[(Path(p), r) for p, r in d["skipped"]])
            return cls(folder, d["embeddings"], EncoderIdentity.from_dict(d["encoder"]))
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
            raise KPLInputError(f"{path} is not an embedding file written by EmbeddingSet.save ({exc})") from None


def _decode(data: bytes, path: Path, max_pixels: int | None) -> Image.Image | ImageDecodeError:
    """:func:`decode_image`, with its error returned instead of raised (a thread pool's map stops at a raise)."""
    try:
        return decode_image(data, path, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return exc


def embed_images(dataset, encoder: Encoder | str, cache: bool = True, on_error: str = "stop", progress: bool = False,
                 max_pixels: int | None = None) -> EmbeddingSet:
    """Encode every image of ``dataset`` (a registered name, a folder or an :class:`ImageFolder`).

    Files go through in chunks: read once, keyed by the sha256 of their bytes, looked up in the embedding store, and
    only misses are decoded (in :attr:`Encoder.preprocess_threads` threads; ``max_pixels``: the decompression-bomb
    limit) and encoded; new rows are stored.
    ``on_error="stop"`` raises one error listing every unreadable file (chunks encoded before the first failure stay
    stored); ``"skip"`` leaves them out, in ``folder.skipped``. Byte-identical files under different classes are
    reported (a labelling leak).
    """
    strict = check("on_error", on_error, Options("stop", "skip")) == "stop"
    encoder = encoder if isinstance(encoder, Encoder) else load_encoder(encoder)
    folder = dataset if isinstance(dataset, ImageFolder) else load_dataset(dataset)
    store = EmbeddingStore({**encoder.namespace("image"), "decode": DECODE_VERSION}) if cache else None
    out = torch.zeros(len(folder), encoder.embed_dim)  # rows are written in place: no per-chunk tensors kept
    keys, bad, encoded = [None] * len(folder), [], 0
    with (tqdm(total=len(folder), desc=f"embedding {folder.name}", unit="img", disable=not progress) as bar,
          ThreadPoolExecutor(encoder.preprocess_threads) as pool):
        for start in range(0, len(folder), _CHUNK):
            datas = {}
            for i, path in enumerate(folder.paths[start:start + _CHUNK], start):
                try:
                    datas[i] = read_bytes(path)
                    keys[i] = content_key(datas[i])
                except ImageDecodeError as exc:
                    bad.append((path, exc.reason))
            todo = list(datas)
            if store is not None and todo:
                found, rows = store.get([keys[i] for i in todo])
                out[[i for i, f in zip(todo, found.tolist()) if f]] = rows[found]
                todo = [i for i, f in zip(todo, found.tolist()) if not f]
            images = {}
            decoded = pool.map(_decode, [datas[i] for i in todo], [folder.paths[i] for i in todo],
                               [max_pixels] * len(todo))  # in order; Pillow's decoders release the GIL
            for i, image in zip(todo, decoded):
                if isinstance(image, ImageDecodeError):
                    bad.append((folder.paths[i], image.reason))
                else:
                    images[i] = image
            if images and not (strict and bad):  # strict mode encodes nothing once a file failed
                out[list(images)] = new = encoder.encode_images(list(images.values()))
                if store is not None:
                    store.put([keys[i] for i in images], new)
                encoded += len(images)
            bar.update(min(_CHUNK, len(folder) - start))
    if bad and strict:
        raise unreadable_error(bad, len(folder))
    leaks = find_leaks(folder, keys)
    if leaks.cross_class or leaks.aliases:
        log.warning("%s\n(`kpl audit %s` lists every finding)", leaks.message(), display_path(folder.root))
    if bad:
        failed = {p for p, _ in bad}
        out = out[torch.tensor([p not in failed for p in folder.paths])]
        folder = folder.without(bad)
        log.warning("%s", folder.skipped_summary())
    stats = {"n_images": len(folder), "n_encoded": encoded, **(dataclasses.asdict(store.stats) if store else {})}
    return EmbeddingSet(folder=folder, embeddings=out, encoder=encoder.identity, stats=stats)


# ------------------------------------------------------------------------------------------------ text side
def _encode_texts(encoder: Encoder, texts: list[str], cache: bool) -> Tensor:
    if not texts or not cache:
        return encoder.encode_texts(texts)
    store = EmbeddingStore(encoder.namespace("text"))
    keys = [text_key(t) for t in texts]
    found, rows = store.get(keys)
    missing = [i for i in range(len(texts)) if not found[i]]
    if missing:
        new = encoder.encode_texts([texts[i] for i in missing])
        store.put([keys[i] for i in missing], new)
        rows[missing] = new
    return rows


def _prompts(template: str, display: Sequence[str], descriptions: Sequence[Sequence[str]]) -> list[str]:
    return [template.format(class_name=shown, description=text) for shown, texts in zip(display, descriptions)
            for text in texts]


def embed_knowledge(kb: KnowledgeBase | str | os.PathLike | None, encoder: Encoder, class_names: Sequence[str],
                    display_names: Sequence[str] | None = None, template: str = KPL_TEMPLATE,
                    name_templates: Sequence[str] = DEFAULT_NAME_TEMPLATES, controls: bool = False, seed: int = 0,
                    modality: str | None = None, cache: bool = True) -> TextEmbeddings:
    """Encode a knowledge base for ``class_names`` (in that order) into :class:`TextEmbeddings`.

    Description prompts are ``template`` filled with each class's display name and description (kpl-method.md,
    Stage 1 step 1); class-name prompts fill each of ``name_templates``. ``kb=None`` encodes class names only.
    ``controls=True`` also encodes the knowledge controls (:mod:`kplib.method.controls`, seeded by ``seed``;
    ``generic`` needs the ``modality``). Prompts longer than the text context are truncated as CLIP does, with a
    warning naming the class and description.
    """
    check_template(template)
    if not name_templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in name_templates):
        raise KPLInputError(f"name_templates must be strings with one '{{}}' each, got {list(name_templates)!r}")
    kb = None if kb is None else (kb if isinstance(kb, KnowledgeBase) else load_kb(kb)).select(list(class_names))
    display = list(display_names or (kb.display_names if kb is not None else class_names))
    descriptions = kb.descriptions() if kb is not None else [[] for _ in class_names]
    prompts = _prompts(template, display, descriptions)
    labels = [f"class {c!r}, description {m}" for c, texts in zip(class_names, descriptions) for m in range(len(texts))]
    long = [(lab, n) for lab, n in zip(labels, encoder.token_lengths(prompts) if prompts else [])
            if n > encoder.context_length]
    if long:
        log.warning("%d prompt(s) exceed the text encoder's %d tokens and are truncated as CLIP does (`kpl kb "
                    "validate` lists them): %s", len(long), encoder.context_length,
                    "; ".join(f"{lab}: {n} tokens" for lab, n in long[:5]))
    names = [t.format(shown) for shown in display for t in name_templates]
    text = TextEmbeddings(
        class_names=list(class_names),
        name_embeddings=_encode_texts(encoder, names, cache).reshape(len(display), len(name_templates), -1),
        description_embeddings=list(_encode_texts(encoder, prompts, cache).split([len(t) for t in descriptions])),
        descriptions=descriptions, templates=list(name_templates),
        meta={"encoder": encoder.identity.to_dict(), "encoder_label": encoder.identity.label,
              "kb_id": kb.kb_id if kb else None, "kb_method": kb.method if kb else None,
              "kb_origin": kb.origin if kb else None, "template": template, "display_names": display})
    if controls and kb is not None:
        try:
            generic = generic_descriptions(modality) if modality else None
        except KPLInputError as exc:  # a modality without a generic family: that one control is left out
            log.warning("knowledge control 'generic' left out: %s", exc)
            generic = None
        for name in (c for c in CONTROLS if c != "generic" or generic is not None):
            texts = control_descriptions(name, descriptions, seed=seed, generic=generic)
            flat = _encode_texts(encoder, _prompts(template, display, texts), cache)
            text.controls[name] = list(flat.split([len(t) for t in texts]))
        text.meta["controls"] = {"names": sorted(text.controls), "seed": seed, "modality": modality}
    return text


# ------------------------------------------------------------------------------------------------ experiments
@dataclass
class Experiment:
    """One method on one set of images, with everything that produced it (results nest, nothing is copied)."""

    result: MethodResult
    images: EmbeddingSet
    text: TextEmbeddings
    kb: KnowledgeBase | None
    metrics: dict | None  # None for unlabelled images

    def provenance(self) -> dict:
        """Deterministic record of what produced the result (no dates, timings or store statistics)."""
        meta = self.text.meta
        return {"dataset": self.images.folder.describe(), "encoder": self.images.encoder.to_dict(),
                "kb": {"kb_id": meta.get("kb_id"), "method": meta.get("kb_method"), "origin": meta.get("kb_origin")},
                "template": meta.get("template"), "method": self.result.method,
                "config": dataclasses.asdict(self.result.config), "controls": meta.get("controls"),
                "kplib": __version__, "torch": torch.__version__}

    def summary(self) -> dict:
        """``{dataset, model, method, config, metrics}``, the shape of LAION clip_benchmark's result files."""
        keep = ("accuracy", "balanced_accuracy", "macro_f1", "accuracy_ci", "balanced_accuracy_ci", "macro_f1_ci", "n")
        m = self.metrics
        return {"dataset": self.images.folder.name, "model": self.images.encoder.label, "method": self.result.method,
                "is_standin": self.images.encoder.is_standin, "kb": self.text.meta.get("kb_id"),
                "config": dataclasses.asdict(self.result.config),
                "metrics": None if m is None else {k: [float(v) for v in m[k]] if isinstance(m[k], (tuple, list))
                                                   else int(m[k]) if k == "n" else float(m[k]) for k in keep if k in m},
                "date": _dt.date.today().isoformat()}


def _default_kb(folder: ImageFolder, needs_kb: bool) -> KnowledgeBase | None:
    """The registered dataset's curated knowledge base (ImageNet sample: DCLIP's published descriptors)."""
    info = registry().get(folder.name)
    if info is not None and info.kb is not None:
        return load_kb(info.kb)
    if info is not None and info.name == "imagenet_sample":
        return dclip_imagenet_kb()
    if needs_kb:
        raise KPLInputError(f"no knowledge base given and {folder.name!r} has no curated one; pass one "
                            + fix(cli="--kb FILE_OR_NAME", python="kb='FILE_OR_NAME'")
                            + " (`kpl kb list` shows the curated ones; zero_shot, clip_dn, transclip and inmap run "
                              "on class names alone)")
    return None


def run(dataset, method: str = "kpl_corrected", encoder: Encoder | str = "auto", kb=None, config=None, *,
        cache: bool = True, on_error: str = "stop", progress: bool = False, template: str = KPL_TEMPLATE,
        max_pixels: int | None = None, n_bootstrap: int = 1000) -> Experiment:
    """Run one method end to end: embed the images and the knowledge base, run the method, evaluate.

    Parameters
    ----------
    dataset : str, path or ImageFolder
        A registered dataset, an image folder (``<class>/<image>``), or an :class:`ImageFolder` from
        :func:`kplib.io.datasets.load_dataset` (unlabelled images, a seeded subset ...).
    method : str
        One of :data:`kplib.method.methods.METHODS`.
    encoder : Encoder or str
        An :class:`Encoder`, or what :func:`kplib.io.encoders.load_encoder` should load.
    kb : KnowledgeBase, str or path, optional
        Default: the dataset's curated one; methods on class names alone run without one.
    config : KPLConfig (or the method's own config), optional
        The method's switches (default: its defaults).

    The keyword options: the embedding store (``cache``), unreadable images (``on_error``), progress bars, the
    description prompt (``template``), the decompression-bomb limit and the bootstrap size.
    """
    return compare(dataset, [method], encoder, kb, config, cache=cache, on_error=on_error, progress=progress,
                   template=template, max_pixels=max_pixels, n_bootstrap=n_bootstrap).experiments[method]


@dataclass
class Comparison:
    """Several methods on the same embeddings, and each one's paired difference to ``reference``."""

    experiments: dict[str, Experiment]
    reference: str
    paired: dict[str, metrics.PairedComparison]  # method -> (method - reference) on the same labelled images

    def table(self) -> pd.DataFrame:
        """One row per method: accuracy, balanced accuracy, macro-F1, and the paired test against the reference."""
        rows = []
        for name, exp in self.experiments.items():
            row = {"method": name}
            if exp.metrics is not None:
                row.update({k: exp.metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")})
            if (pair := self.paired.get(name)) is not None:
                row.update({f"Δ vs {self.reference}": pair.difference, "Δ 95% CI": pair.difference_ci,
                            "McNemar p": pair.p_value})
            rows.append(row)
        return pd.DataFrame(rows).set_index("method")


def compare(dataset, methods: Sequence[str], encoder: Encoder | str = "auto", kb=None, config=None, *,
            reference: str | None = None, cache: bool = True, on_error: str = "stop", progress: bool = False,
            template: str = KPL_TEMPLATE, max_pixels: int | None = None, n_bootstrap: int = 1000) -> Comparison:
    """Run ``methods`` on the same images and knowledge base; test each against ``reference`` (default: the first)
    on the same images: paired bootstrap interval of the accuracy difference and exact McNemar test.

    ``config`` may be a sequence of configs (a :class:`KPLConfig` and baselines' own); each method takes the one of
    its class; the first config with a ``seed`` seeds the controls and the bootstrap. The keyword options are those
    of :func:`run`. An unlabelled folder takes its classes from the knowledge base.
    """
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise KPLInputError("compare needs at least one method " + fix(cli="--methods a,b,c", python="methods=[...]"))
    reference = reference or methods[0]
    if reference not in methods:
        raise KPLInputError(f"reference {reference!r} must be one of the compared methods {methods}")
    specs = [METHODS[m] for m in methods if m in METHODS]
    seed = next((c.seed for c in (config if isinstance(config, (list, tuple)) else [config]) if hasattr(c, "seed")), 0)
    enc = encoder if isinstance(encoder, Encoder) else load_encoder(encoder)
    folder = dataset if isinstance(dataset, ImageFolder) else load_dataset(dataset)
    if kb is None:
        kb = _default_kb(folder, any(s.descriptions for s in specs))
    elif not isinstance(kb, KnowledgeBase):
        kb = load_kb(kb)
    if folder.labels is None and not folder.class_names:
        if kb is None:
            raise KPLInputError("unlabelled images need their classes: give a knowledge base "
                                + fix(cli="--kb FILE", python="kb=...") + " or the class names "
                                + fix(cli="--classes A,B", python="load_dataset(folder, classes=[...])"))
        folder = dataclasses.replace(folder, class_names=kb.class_names, display_names=kb.display_names)
    images = embed_images(folder, enc, cache=cache, on_error=on_error, progress=progress, max_pixels=max_pixels)
    text = embed_knowledge(kb, enc, images.class_names, display_names=None if kb else images.folder.display_names,
                           template=template, controls=any(s.controls for s in specs), seed=seed,
                           modality=kb.modality if kb else None, cache=cache)
    exps = {}
    for m in methods:
        result = run_method(m, images.embeddings, text, config)
        scores = None if images.labels is None else metrics.evaluate(
            images.labels, result.predictions, images.class_names, n_bootstrap=n_bootstrap, seed=seed)
        exps[m] = Experiment(result, images, text, kb, scores)
    paired = {}
    if images.labels is not None:
        ref = exps[reference].result.predictions
        paired = {m: metrics.paired_comparison(images.labels, e.result.predictions, ref, n_bootstrap=n_bootstrap,
                                               seed=seed) for m, e in exps.items() if m != reference}
    return Comparison(exps, reference, paired)
