"""CLIP encoders: any Hugging Face CLIP checkpoint, or the untrained stand-in; batched, streamed encoding.

Why this module exists: encoding images is the expensive step of every experiment (a ViT-B/16 runs a few images
per second on a laptop CPU), so it is done once, in bounded-memory batches with image decoding overlapped with the
model, and every embedding carries an :class:`EncoderIdentity` saying which weights produced it.

- The real path (the default for users) is ``CLIPModel.from_pretrained`` on a hub id or a local folder, with the
  checkpoint's own tokenizer and image processor (the paper backbones: ``openai/clip-vit-base-patch16``,
  ``openai/clip-vit-large-patch14``, ``openai/clip-vit-large-patch14-336``; medical CLIPs saved in the same format).
- The **untrained stand-in** is a small randomly initialised CLIP (fixed config, seed 0) with the real OpenAI CLIP
  tokenizer. It exists so the code runs where no pretrained weights can be loaded; its numbers mean nothing and it
  says so (:class:`kplib.errors.StandInWarning`, ``identity.label``).
- Loading is lazy: :func:`load_encoder` fixes the identity, tokenizer and preprocessing from files (and small
  memos in the cache folder), and the weights are built/loaded on first encode, so a re-run whose embeddings are
  all cached never reads them (issue 6).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import re
import socket
import sys
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from . import config, vision_forward as _vf
from ._checks import check_choice, check_int
from .errors import ImageDecodeError, KPLError, KPLInputError, StandInWarning

log = logging.getLogger("kplib")


# glibc mallopt parameters (malloc.h) and their documented defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_GLIBC_ENV = {_M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_", _M_MMAP_MAX: "MALLOC_MMAP_MAX_"}
_heap_lock = threading.Lock()
_heap_depth = 0


def _glibc():
    """The process's glibc (``mallopt`` available), or None off glibc (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- raises AttributeError on non-glibc libcs
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Keep freed blocks in the glibc heap while the batch loop runs (``mallopt``: no mmap, no trimming).

    Why: the model frees and re-allocates the same 20-40 MB activations every layer; by default glibc serves
    blocks that large with fresh ``mmap`` pages, so every layer pays page faults on first touch (measured in
    benchmarks/bench_encoding.py). Sets ``M_MMAP_MAX=0`` and ``M_TRIM_THRESHOLD=1 GiB`` on entry and restores
    the values in effect before (the ``MALLOC_*_`` environment variables if set, else glibc's defaults) when the
    outermost use exits. Only the allocator's policy changes, never a computed value. No-op off glibc.
    """
    global _heap_depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _heap_lock:
        if _heap_depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        _heap_depth += 1
    try:
        yield
    finally:
        with _heap_lock:
            _heap_depth -= 1
            if _heap_depth == 0:
                for param, default in _GLIBC_DEFAULTS.items():
                    env = os.environ.get(_GLIBC_ENV[param], "")
                    libc.mallopt(param, int(env) if env.strip().isdigit() else default)


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``); called once per encoded batch.

    Why: with :func:`keep_freed_memory` in force nothing is trimmed, and the decoded images and small objects of
    each batch fragment the heap, so a long run's peak RSS grew ~100 kB per image (measured by
    tests/test_reliability_memory.py: +314 MB from 1,000 to 5,000 images). One trim per batch (~2 ms) keeps the
    peak flat while the layers inside a batch still reuse the heap. No-op off glibc.
    """
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


STANDIN = "standin"
AUTO = "auto"
STANDIN_SEED = 0
STANDIN_LABEL = "UNTRAINED stand-in (random CLIP, seed 0) — numbers are meaningless"
DTYPES = ("float32", "bfloat16")
VISION_FORWARDS = ("auto", "kplib", "transformers")
ON_ERROR = ("stop", "skip")

#: Architecture of the stand-in: a small CLIP (ViT 224/32, 4 layers, width 256) whose text side uses the real
#: OpenAI vocabulary (49408 tokens) and context (77), so tokenisation and prompt-length checks are the real ones.
STANDIN_CONFIG: dict[str, Any] = {
    "projection_dim": 256,
    "text_config": {
        "vocab_size": 49408, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
        "num_attention_heads": 4, "max_position_embeddings": 77, "projection_dim": 256,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    },
    "vision_config": {
        "image_size": 224, "patch_size": 32, "hidden_size": 256, "intermediate_size": 1024,
        "num_hidden_layers": 4, "num_attention_heads": 4, "projection_dim": 256, "hidden_act": "quick_gelu",
    },
}
#: Preprocessing of the stand-in: OpenAI CLIP's (bicubic resize of the short side to 224, centre crop 224,
#: OpenAI mean/std).
STANDIN_PROCESSOR: dict[str, Any] = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}


class PromptTruncationWarning(UserWarning):
    """Some prompts are longer than the text encoder's context and were truncated (as CLIP does)."""


@dataclass(frozen=True)
class EncoderIdentity:
    """Which weights produced an embedding. Travels with every embedding set and every result.

    ``revision`` is the hub commit hash when known, otherwise a digest of the weights (stand-in included), so two
    different checkpoints never share cached embeddings.
    """

    name: str
    revision: str | None
    is_standin: bool

    @property
    def label(self) -> str:
        """What a reader sees next to numbers: the checkpoint name, or the stand-in's loud label."""
        return STANDIN_LABEL if self.is_standin else self.name

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label}

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderIdentity":
        return cls(name=d["name"], revision=d.get("revision"), is_standin=bool(d["is_standin"]))


@dataclass(frozen=True)
class LongPrompt:
    """A prompt longer than the text context (in tokens, start/end tokens included)."""

    index: int
    text: str
    n_tokens: int
    context_length: int
    label: str | None = None   # e.g. "class 'glioma', description 3"

    def describe(self) -> str:
        where = self.label or f"prompt {self.index}"
        text = self.text if len(self.text) <= 100 else self.text[:97] + "..."
        return f"{where}: {self.n_tokens} tokens > {self.context_length}: {text!r}"


@dataclass
class ImageEncoding:
    """Result of encoding a list of images when some may fail to decode (``on_error="skip"``)."""

    embeddings: Tensor                      # (n_ok, d) float32, unit rows, in input order
    indices: list[int]                      # input positions that were encoded, ascending
    failures: list[tuple[int, str]] = field(default_factory=list)   # (input position, reason)


class ClipEncoder:
    """A frozen CLIP image/text encoder with its tokenizer, image processor and identity.

    Build it with :func:`load_encoder`. Embeddings come back ``float32`` with L2-normalised rows (ARCHITECTURE.md).
    """

    def __init__(self, model, tokenizer, image_processor, identity: EncoderIdentity,
                 device: str | torch.device = "cpu", dtype: str = "float32", *, context_length: int | None = None,
                 embed_dim: int | None = None, vision_act: str | None = None, preprocessing: dict | None = None,
                 vision_forward: str = "auto"):
        """``model`` and ``image_processor`` are the objects themselves, or :class:`Deferred` builders that run on
        first use (:func:`load_encoder` defers them when a cached re-run may never need them). A deferred model
        needs ``context_length``, ``embed_dim`` and ``vision_act`` (the image tower's activation), read from the
        checkpoint's config; a deferred processor may come with its known ``preprocessing`` description so the
        cache namespace is known without building it. ``vision_forward``: see :attr:`vision_forward`."""
        check_choice(dtype, "dtype", DTYPES)
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.identity = identity
        self._model_lock = threading.Lock()       # the model and the processor are built once, by one thread
        self._processor_lock = threading.Lock()
        self._model_error: BaseException | None = None
        if isinstance(model, Deferred):
            if context_length is None or embed_dim is None or vision_act is None:
                raise KPLInputError("a deferred model needs context_length, embed_dim and vision_act (from its config)")
            self._model, self._model_source = None, model
        else:
            self._model, self._model_source = _prepared(model, self.device), None
            context_length = int(model.config.text_config.max_position_embeddings)
            embed_dim = int(model.config.projection_dim)
            vision_act = model.config.vision_config.hidden_act
        self.context_length = int(context_length)
        self.embed_dim = int(embed_dim)
        self.vision_act = str(vision_act)
        self._bf16: list | None = None   # kplib's bfloat16 copies of the image tower's matrices, cast on first use
        self.vision_forward = vision_forward
        if isinstance(image_processor, Deferred):
            self._processor, self._processor_source = None, image_processor
        else:
            self._processor, self._processor_source = image_processor, None
        self._preprocessing = preprocessing
        self._tokenizer_digest: str | None = None

    def __repr__(self) -> str:
        return (f"ClipEncoder({self.identity.label!r}, revision={self.identity.revision!r}, "
                f"device={str(self.device)!r}, dtype={self.dtype!r}, dim={self.embed_dim}, "
                f"vision_forward={self._vision_forward!r})")

    # ------------------------------------------------------------------ which forward computes image features
    @property
    def vision_forward(self) -> str:
        """Which code computes image features: ``"kplib"`` (:mod:`kplib.vision_forward`, the same function with
        fewer memory passes: ~10% faster on CPU in float32; in bfloat16, weights cast once and a float32 residual
        stream, faster and closer to float32 than autocast; measured by ``make bench``) or ``"transformers"``
        (``CLIPModel.get_image_features``, under autocast in bfloat16). Set it to ``"auto"`` (the default: kplib's
        where it applies — CPU, a quick_gelu or gelu image tower — else transformers'), ``"kplib"`` (an error where
        it does not apply) or ``"transformers"``. The two agree to rounding but not bit for bit, so the choice is
        part of the embedding cache namespace (:meth:`fingerprint`). Set it before encoding."""
        return self._vision_forward

    @vision_forward.setter
    def vision_forward(self, choice: str) -> None:
        check_choice(choice, "vision_forward", VISION_FORWARDS)
        why = _vf.unsupported_reason(self.vision_act, self.device, self.dtype)
        if choice == "kplib" and why is not None:
            raise KPLInputError(f"vision_forward='kplib' cannot serve this encoder: {why}. Use 'auto' or "
                                "'transformers'.")
        resolved = "transformers" if choice == "transformers" or why is not None else "kplib"
        if resolved == "kplib" and self._model is not None:
            self._check_structure(self._model)
        self._vision_forward = resolved

    def _check_structure(self, model) -> None:
        try:
            _vf.check_structure(model)
        except TypeError as exc:
            raise KPLInputError(f"{exc}; kplib's image forward cannot run it. Pass vision_forward='transformers'."
                                ) from None

    # ------------------------------------------------------------------ deferred parts
    @property
    def is_materialized(self) -> bool:
        """Whether the model's weights are built/loaded (False until something needs encoding)."""
        return self._model is not None

    @property
    def model(self):
        """The ``CLIPModel``, built/loaded on first access (see :meth:`materialize`)."""
        model = self._model
        return model if model is not None else self.materialize()

    def materialize(self):
        """Build/load the model now (once; thread-safe) and return it. A checkpoint that turns out incomplete, or
        weights that do not match the identity given out at load time, raise here (and on every later use)."""
        with self._model_lock:
            if self._model is None:
                if self._model_error is not None:
                    raise self._model_error
                try:
                    model = self._model_source()
                except KPLError as exc:
                    self._model_error = exc
                    raise
                model = _prepared(model, self.device)
                if self._vision_forward == "kplib":
                    try:
                        self._check_structure(model)
                    except KPLError as exc:
                        self._model_error = exc
                        raise
                self._model = model
                log.info("materialised the model of %r", self)
            return self._model

    @property
    def image_processor(self):
        """The image processor (built on first access when deferred)."""
        proc = self._processor
        if proc is not None:
            return proc
        with self._processor_lock:
            if self._processor is None:
                proc = self._processor_source()
                if self._preprocessing is not None:
                    got = _preprocessing_of(proc)
                    if got != self._preprocessing:
                        self._processor_source.on_mismatch(self._preprocessing, got)
                self._processor = proc
            return self._processor

    # ------------------------------------------------------------------ identity of what the encoder computes
    @property
    def preprocessing(self) -> dict:
        """The image preprocessing settings (part of the embedding cache key)."""
        if self._preprocessing is None:
            self._preprocessing = _preprocessing_of(self.image_processor)
        return self._preprocessing

    @property
    def tokenizer_digest(self) -> str | None:
        """Digest of the tokenizer's files (part of the text-embedding cache key: the same weights with another
        vocabulary or merges give other text embeddings). None when the tokenizer was not loaded from a folder."""
        if self._tokenizer_digest is None:
            folder = Path(str(getattr(self.tokenizer, "name_or_path", "") or ""))
            files = sorted(f for f in TOKENIZER_FILES if (folder / f).is_file()) if folder.is_dir() else []
            if files:
                h = hashlib.blake2b(digest_size=8)
                for name in files:
                    h.update(f"{name}|".encode() + (folder / name).read_bytes() + b"\n")
                self._tokenizer_digest = h.hexdigest()
            else:
                self._tokenizer_digest = ""
        return self._tokenizer_digest or None

    def fingerprint(self) -> dict:
        """Everything that determines an image embedding besides the image bytes (model, weights, preprocessing,
        numeric precision). Used as the cache namespace."""
        return {"model": self.identity.name, "revision": self.identity.revision,
                "is_standin": self.identity.is_standin, "preprocessing": self.preprocessing, "dtype": self.dtype,
                "vision_forward": _vf.name(self.dtype) if self._vision_forward == "kplib" else "transformers"}

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")

    def _bf16_weights(self) -> list:
        model = self.model                  # materialised (once) before the lock is taken
        with self._model_lock:
            if self._bf16 is None:
                self._bf16 = _vf.bf16_weights(model)
            return self._bf16

    # ------------------------------------------------------------------ images
    def preprocess(self, image) -> Tensor:
        """One image (PIL image or path) → pixel tensor (3, H, W) ready for the vision tower."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            from .data import load_rgb  # robust decoding lives in data.py
            image = load_rgb(image)
        elif image.mode != "RGB":
            image = image.convert("RGB")
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) pixels → (B, d) float32 unit-norm image embeddings (computed by :attr:`vision_forward`)."""
        pixel_values = pixel_values.to(self.device)
        if self._vision_forward == "kplib" and self.dtype == "bfloat16":
            return _unit(_vf.image_features_bf16(self.model, self._bf16_weights(), pixel_values, self.vision_act))
        if self._vision_forward == "kplib":
            return _unit(_vf.image_features(self.model, pixel_values, self.vision_act))
        with self._autocast():
            out = self.model.get_image_features(pixel_values=pixel_values)
        return _unit(out)

    def encode_images(self, images: Sequence, batch_size: int = 32, progress: bool = True,
                      num_workers: int | None = None) -> Tensor:
        """Encode images (PIL images or paths) → (N, d). Raises :class:`ImageDecodeError` on the first bad file."""
        return self.encode_images_detailed(images, batch_size=batch_size, progress=progress,
                                           num_workers=num_workers, on_error="stop").embeddings

    def encode_images_detailed(self, images: Sequence, batch_size: int = 32, progress: bool = True,
                               num_workers: int | None = None, on_error: str = "stop") -> ImageEncoding:
        """Encode images in streamed batches, decoding the next batches in worker threads while the model runs
        (``num_workers``; default :func:`default_num_workers`; 0 decodes in this thread).

        At most ``num_workers + 1`` decoded batches are held at any time, so memory does not grow with N.
        ``on_error="skip"`` leaves undecodable images out and lists them in ``failures``; ``"stop"`` raises.
        """
        check_int(batch_size, "batch_size")
        check_choice(on_error, "on_error", ON_ERROR)
        images = list(images)
        n = len(images)
        workers = default_num_workers(n) if num_workers is None else check_int(num_workers, "num_workers", 0)
        chunks = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
        parts: list[Tensor] = []
        indices: list[int] = []
        failures: list[tuple[int, str]] = []
        if n:
            self.image_processor  # noqa: B018 -- build a deferred processor here, not in the decoding threads
        bar = tqdm(total=n, desc="encoding images", unit="img", disable=not progress)
        with keep_freed_memory():
            try:
                for idx, pixels, failed in self._prefetch(images, chunks, workers):
                    if failed:
                        if on_error == "stop":
                            i, exc = failed[0]
                            raise exc if isinstance(exc, ImageDecodeError) else ImageDecodeError(_name(images[i]), str(exc))
                        for i, exc in failed:
                            log.warning("skipping image %s: %s", _name(images[i]), exc)
                            failures.append((i, str(exc)))
                    if idx:
                        parts.append(self.encode_pixels(pixels))
                        indices.extend(idx)
                    del pixels
                    release_freed_memory()
                    bar.update(len(idx) + len(failed))
            finally:
                bar.close()
        emb = torch.cat(parts) if parts else torch.empty(0, self.embed_dim)
        return ImageEncoding(emb, indices, failures)

    def _load_chunk(self, images: Sequence, chunk: range):
        idx, pix, failed = [], [], []
        for i in chunk:
            try:
                pix.append(self.preprocess(images[i]))
                idx.append(i)
            except ImageDecodeError as exc:
                failed.append((i, exc))
            except KPLError:  # not about this image (e.g. the deferred processor could not be built)
                raise
            except Exception as exc:  # the processor choked on a decodable file (e.g. a 1-pixel image)
                failed.append((i, ImageDecodeError(_name(images[i]), f"preprocessing failed: {exc}")))
        return idx, (torch.stack(pix) if pix else None), failed

    def _prefetch(self, images, chunks, workers: int) -> Iterator:
        if workers == 0:
            for chunk in chunks:
                yield self._load_chunk(images, chunk)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kpl-decode") as pool:
            pending: deque = deque()
            todo = iter(chunks)
            for chunk in todo:
                pending.append(pool.submit(self._load_chunk, images, chunk))
                if len(pending) > workers:
                    break
            while pending:
                result = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(self._load_chunk, images, nxt))
                yield result

    # ------------------------------------------------------------------ texts
    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Number of tokens of each text, start and end tokens included, without truncation."""
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return [len(x) for x in ids]

    def check_prompt_lengths(self, texts: Sequence[str], labels: Sequence[str] | None = None,
                             strict: bool = False) -> list[LongPrompt]:
        """Find prompts longer than the context. ``strict`` raises :class:`KPLInputError` listing them; otherwise a
        :class:`PromptTruncationWarning` lists them (encoding truncates them, as CLIP does). Returns the list."""
        texts = list(texts)
        if labels is not None and len(labels) != len(texts):
            raise KPLInputError(f"labels has {len(labels)} items but texts has {len(texts)}; pass one label per text")
        long = [LongPrompt(i, t, n, self.context_length, labels[i] if labels is not None else None)
                for i, (t, n) in enumerate(zip(texts, self.token_lengths(texts))) if n > self.context_length]
        if long:
            shown = "\n  ".join(p.describe() for p in long[:20])
            more = f"\n  ... and {len(long) - 20} more" if len(long) > 20 else ""
            head = (f"{len(long)} of {len(texts)} prompt(s) exceed the text encoder's context of "
                    f"{self.context_length} tokens")
            if strict:
                raise KPLInputError(f"{head}; shorten these descriptions:\n  {shown}{more}")
            msg = f"{head} and are truncated (as CLIP does); consider shortening:\n  {shown}{more}"
            log.warning(msg)
            warnings.warn(msg, PromptTruncationWarning, stacklevel=2)
        return long

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, labels: Sequence[str] | None = None,
                     strict: bool = False, progress: bool = False) -> Tensor:
        """Encode texts → (N, d) float32 unit rows. Over-length prompts are truncated with a warning naming them
        (``labels`` says what each prompt is, e.g. class and description), or raise when ``strict``."""
        check_int(batch_size, "batch_size")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise KPLInputError("texts must be a sequence of strings")
        if not texts:
            return torch.empty(0, self.embed_dim)
        self.check_prompt_lengths(texts, labels=labels, strict=strict)
        parts = []
        for i in tqdm(range(0, len(texts), batch_size), desc="encoding texts", disable=not progress):
            tok = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                 max_length=self.context_length, return_tensors="pt")
            with self._autocast():
                out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                   attention_mask=tok["attention_mask"].to(self.device))
            parts.append(_unit(out))
        return torch.cat(parts)


# ---------------------------------------------------------------------------------------------------- loading
def load_encoder(model: str = AUTO, device: str | None = None, dtype: str = "float32",
                 vision_forward: str = "auto") -> ClipEncoder:
    """Load a CLIP encoder.

    ``model``: a Hugging Face hub id or a local folder saved with ``save_pretrained`` (loaded through
    ``CLIPModel.from_pretrained``); ``"standin"`` for the untrained stand-in; or ``"auto"``: the configured model
    (``$KPL_MODEL``, default ``openai/clip-vit-large-patch14-336``), falling back to the stand-in — with a
    :class:`StandInWarning` — only when that model cannot be loaded. An explicit model that cannot be loaded raises
    :class:`KPLInputError` (no fallback).

    The weights are loaded lazily: this call reads the checkpoint's config, tokenizer and preprocessing and fixes
    the encoder's identity (so the embedding cache can answer), but the model is built/loaded only when something
    is encoded (or on ``encoder.model`` / ``encoder.materialize()``). A cached re-run therefore never reads them.
    Identity without weights: a hub id's revision is the commit of its snapshot in the local Hugging Face cache
    (the hub is asked only when it is not cached there — in ``"auto"`` mode only when reachable — and then the
    download is loaded at once); a local folder's is its hub-cache snapshot commit, else ``"files-"`` + a digest
    of its config.json and weight files (memoised in the cache folder by path, size and mtime); the stand-in's is
    ``"weights-"`` + the digest of its weights, memoised per recipe (config, seed, torch and transformers versions)
    and checked when the model is built. What ``"auto"`` falls back on is decided here, from files: checkpoint not
    available locally and hub unreachable, no CLIP config.json or weight file, tokenizer or image processor not
    loadable. Weights missing from or mismatching the file are detected when the model is loaded (first encode):
    :class:`KPLInputError` naming the checkpoint (never random-filled weights, never a fallback then).

    ``vision_forward``: which code computes image features (see :attr:`ClipEncoder.vision_forward`).
    """
    check_choice(vision_forward, "vision_forward", VISION_FORWARDS)
    encoder = _load_encoder(model, device, dtype)
    encoder.vision_forward = vision_forward
    return encoder


def _load_encoder(model: str, device: str | None, dtype: str) -> ClipEncoder:
    if device is None:
        from .config import default_device

        device = default_device()
    check_choice(dtype, "dtype", DTYPES)
    if not isinstance(model, str) or not model.strip():
        raise KPLInputError(f"model must be a hub id, a local folder, 'standin' or 'auto', got {model!r}")
    model = model.strip()
    if model == STANDIN:
        _warn_standin("the untrained stand-in was selected explicitly (model='standin').")
        return build_standin(device=device, dtype=dtype)
    if model != AUTO:
        return _load_pretrained(model, device, dtype, allow_network=True)

    target = config.default_model().strip()
    if target == STANDIN:
        _warn_standin("KPL_MODEL=standin selects the untrained stand-in.")
        return build_standin(device=device, dtype=dtype)
    if target == AUTO:
        target = config.DEFAULT_MODEL
    try:
        return _load_pretrained(target, device, dtype, allow_network=None)
    except KPLInputError as exc:
        _warn_standin(f"model='auto' could not load {target!r} ({exc}). Set KPL_MODEL to a CLIP checkpoint "
                      "(hub id or local folder) to get real results.")
        return build_standin(device=device, dtype=dtype)


def standin_config():
    """The stand-in's ``CLIPConfig`` (see :data:`STANDIN_CONFIG`)."""
    from transformers import CLIPConfig

    return CLIPConfig(**json.loads(json.dumps(STANDIN_CONFIG)))


def build_standin_model(seed: int = STANDIN_SEED):
    """A randomly initialised ``CLIPModel`` from :func:`standin_config`; same seed → identical weights.
    The global torch RNG is left untouched."""
    from transformers import CLIPModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(standin_config())
    return model.eval()


def standin_image_processor():
    """OpenAI CLIP preprocessing (PIL backend: bicubic short-side resize to 224, centre crop 224, OpenAI mean/std)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers >= 5
    except ImportError:  # pragma: no cover - transformers 4: the default class is the PIL one
        from transformers import CLIPImageProcessor as Processor
    return Processor(**STANDIN_PROCESSOR)


def load_clip_tokenizer(path: str | Path | None = None):
    """The OpenAI CLIP BPE tokenizer (``$KPL_TOKENIZER_DIR``)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path or config.tokenizer_dir()))


def build_standin(device: str = "cpu", dtype: str = "float32") -> ClipEncoder:
    """The untrained stand-in encoder (no warning here; :func:`load_encoder` warns). Its revision is a digest of
    its weights, so a change in torch's initialisation can never be mistaken for cached embeddings.

    The digest is memoised per recipe (:func:`standin_recipe_key`) in ``<cache>/standin-revisions.json``; with a
    memo the model is built only on first use and its digest checked then (see :func:`_checked_standin_model`).
    Without one (first run, unreadable or unwritable memo) the model is built now, as always."""
    tokenizer = load_clip_tokenizer()
    recipe = standin_recipe_key(STANDIN_SEED)
    memo = _Memo(STANDIN_MEMO)
    known = memo.get(recipe)
    processor, preprocessing = _processor_parts({"standin": STANDIN_PROCESSOR}, standin_image_processor,
                                                STANDIN)
    if isinstance(known, str) and re.fullmatch(r"[0-9a-f]{16}", known):
        identity = EncoderIdentity(name=STANDIN, revision="weights-" + known, is_standin=True)
        cfg = STANDIN_CONFIG
        source = Deferred(lambda: _checked_standin_model(STANDIN_SEED, recipe, known), "the stand-in model")
        return ClipEncoder(source, tokenizer, processor, identity, device=device, dtype=dtype,
                           context_length=cfg["text_config"]["max_position_embeddings"],
                           embed_dim=cfg["projection_dim"], vision_act=cfg["vision_config"]["hidden_act"],
                           preprocessing=preprocessing)
    model = build_standin_model(STANDIN_SEED)
    digest = weights_digest(model)
    memo.put(recipe, digest)
    identity = EncoderIdentity(name=STANDIN, revision="weights-" + digest, is_standin=True)
    return ClipEncoder(model, tokenizer, processor, identity, device=device, dtype=dtype, preprocessing=preprocessing)


def standin_recipe_key(seed: int = STANDIN_SEED) -> str:
    """What determines the stand-in's weights: its config, the seed and the torch/transformers versions (hash)."""
    return _hash_json({"config": STANDIN_CONFIG, "seed": seed, "torch": torch.__version__,
                       "transformers": _transformers_version()})


def _checked_standin_model(seed: int, recipe: str, expected: str):
    """Build the stand-in and check it is the one whose memoised digest named this run's cache entries."""
    model = build_standin_model(seed)
    got = weights_digest(model)
    if got != expected:
        memo = _Memo(STANDIN_MEMO)
        fixed = memo.put(recipe, got)
        now = (f"The memo now says weights-{got}; re-run (load the encoder again) and the old cached embeddings "
               "will not be used." if fixed else
               f"The memo could not be corrected (see the log): delete {memo.path} or make the cache folder "
               "writable, then re-run.")
        raise KPLError(
            f"the untrained stand-in's initialisation is not reproducible on this machine: its recipe (seed {seed}, "
            f"torch {torch.__version__}, transformers {_transformers_version()}) was memoised as weights-{expected} "
            f"in {memo.path}, but the model built now hashes to weights-{got}. Embeddings this encoder already read "
            f"from the cache (under revision weights-{expected}) may come from other weights, so nothing is encoded "
            f"with the new model and results computed with this encoder in this run must be discarded. {now}")
    return model


def weights_digest(model) -> str:
    """Short blake2b digest of every parameter/buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def default_num_workers(n_images: int) -> int:
    """Decoding threads that overlap the model: 1 for small jobs, 2 above 256 images. Measured on 2 cores
    (``make bench`` and the stand-in): threads make the stand-in's encoding 10-28% faster, where decoding is a large
    share of the work; with a ViT-B/16 on the same 2 cores, where decoding is ~3% of the model's time, serial decoding
    (``num_workers=0``) was 0-17% faster, as the thread takes time from the model's own threads."""
    return 1 if n_images <= 256 or (os.cpu_count() or 1) < 2 else 2


# ---------------------------------------------------------------------------------------------------- deferred parts
class Deferred:
    """A part of an encoder (model, image processor) built on first use by ``build()``; ``what`` names it in logs.
    ``on_mismatch(expected, got)`` is called when a deferred processor's preprocessing differs from the one given
    out at load time (it corrects the memo and raises)."""

    def __init__(self, build: Callable[[], Any], what: str, on_mismatch: Callable[[dict, dict], None] | None = None):
        self.build, self.what, self._on_mismatch = build, what, on_mismatch

    def __call__(self):
        return self.build()

    def on_mismatch(self, expected: dict, got: dict) -> None:
        if self._on_mismatch is not None:
            self._on_mismatch(expected, got)
        raise KPLError(f"{self.what}: preprocessing {got} differs from the memoised {expected}")

    def __repr__(self) -> str:
        return f"Deferred({self.what})"


#: Files that define a Hugging Face CLIP tokenizer (those present are hashed into the text cache key).
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
STANDIN_MEMO = "standin-revisions.json"
CHECKPOINT_MEMO = "checkpoint-digests.json"
PREPROCESSING_MEMO = "preprocessing-memo.json"


class _Memo:
    """A small JSON object in the cache folder holding values that are slow to compute and cheap to check.

    A missing, unreadable or corrupt file reads as empty; a failed write is logged and ignored (the value is then
    computed again next time). Writes are atomic (temporary file + ``os.replace``)."""

    def __init__(self, name: str):
        self.name = name

    @property
    def path(self) -> Path:
        return config.cache_dir() / self.name

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.info("ignoring unreadable memo %s (%s); recomputing", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str):
        return self._read().get(key)

    def put(self, key: str, value) -> bool:
        from .cache import _atomic_write

        data = self._read()
        data[key] = value
        try:
            _atomic_write(self.path, json.dumps(data, sort_keys=True, indent=1).encode("utf-8"))
            return True
        except OSError as exc:
            log.info("cannot write memo %s (%s); it is recomputed on the next load", self.path, exc)
            return False


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _transformers_version() -> str:
    mod = sys.modules.get("transformers")
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    from importlib.metadata import version

    return version("transformers")


def _preprocessing_of(processor) -> dict:
    """The image preprocessing settings of a processor (part of the embedding cache key)."""
    d = processor.to_dict()
    keep = ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
            "image_mean", "image_std", "resample", "do_convert_rgb")
    out = {k: d[k] for k in keep if k in d}
    out["processor"] = type(processor).__name__
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def _processor_parts(source: dict, build: Callable[[], Any], name: str) -> tuple[Any, dict]:
    """(processor or Deferred, preprocessing). Building an image processor imports most of transformers' model
    code (~1.4 s), so its preprocessing description is memoised by ``source`` (what the processor is built from)
    and the transformers version; with a memo the processor is built only when an image is preprocessed."""
    key = _hash_json({"source": source, "transformers": _transformers_version()})
    memo = _Memo(PREPROCESSING_MEMO)
    known = memo.get(key)
    if isinstance(known, dict) and known.get("processor"):
        def mismatch(expected: dict, got: dict) -> None:
            memo.put(key, got)
            raise KPLError(
                f"the image preprocessing of {name!r} built now ({got}) differs from the one memoised in "
                f"{memo.path} ({expected}) that named this run's embedding cache entries. Embeddings read from the "
                "cache by this encoder may come from other preprocessing: discard this run's results; the memo is "
                "corrected, re-run.")
        return Deferred(build, f"the image processor of {name!r}", mismatch), known
    processor = build()
    preprocessing = _preprocessing_of(processor)
    memo.put(key, preprocessing)
    return processor, preprocessing


# ---------------------------------------------------------------------------------------------------- checkpoints
_PATHLIKE = re.compile(r"^(/|\.{1,2}/|~|[A-Za-z]:\\)")
#: Weight files in the order ``from_pretrained`` looks for them: (single file, index of shards).
_WEIGHT_FORMATS = (("model.safetensors", "model.safetensors.index.json"),
                   ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def checkpoint_weight_files(folder: str | Path) -> list[Path]:
    """The weight files ``from_pretrained`` reads in a ``save_pretrained`` folder: ``model.safetensors``, or the
    index and its shards, else the same for ``pytorch_model.bin``. Empty when there is none; KPLInputError when an
    index names a missing shard or cannot be read."""
    folder = Path(folder)
    for single, index in _WEIGHT_FORMATS:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise KPLInputError(f"cannot read the shard index {folder / index}: {exc}; re-save the checkpoint "
                                    "with save_pretrained") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise KPLInputError(f"checkpoint folder {folder} lacks shard(s) {missing[:3]} named in {index}; "
                                    "copy the complete checkpoint")
            return [folder / index] + [folder / s for s in shards]
    return []


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _file_digest(path: Path, memo: _Memo) -> str:
    """blake2b of a file's bytes, memoised by (absolute path, size, mtime_ns) so a re-run does not re-read GBs."""
    real, size, mtime = _stamp(path)
    known = memo.get(real)
    if (isinstance(known, dict) and known.get("size") == size and known.get("mtime_ns") == mtime
            and isinstance(known.get("blake2b"), str)):
        return known["blake2b"]
    h = hashlib.blake2b(digest_size=16)
    buf = bytearray(1 << 24)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    digest = h.hexdigest()
    if _stamp(path) == (real, size, mtime):  # not modified while reading
        memo.put(real, {"size": size, "mtime_ns": mtime, "blake2b": digest})
    return digest


def checkpoint_files_digest(folder: str | Path) -> str:
    """Digest of a checkpoint folder's ``config.json`` and weight files (names and bytes, sorted by name).

    The revision of a local folder that is not a hub-cache snapshot is ``"files-" + checkpoint_files_digest``;
    per-file digests are memoised in ``<cache>/checkpoint-digests.json``."""
    folder = Path(folder)
    files = sorted({folder / "config.json", *checkpoint_weight_files(folder)}, key=lambda p: p.name)
    memo = _Memo(CHECKPOINT_MEMO)
    h = hashlib.blake2b(digest_size=8)
    for f in files:
        h.update(f"{f.name}|{_file_digest(f, memo)}\n".encode())
    return h.hexdigest()


def _snapshot_commit(folder: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot folder (``.../snapshots/<40 hex>``), else None."""
    real = folder.resolve()
    if re.fullmatch(r"[0-9a-f]{40}", real.name) and real.parent.name == "snapshots":
        return real.name
    return None


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache snapshot of ``repo_id`` (no network), or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # not cached, invalid id, ...
        log.debug("%s is not in the local Hugging Face cache (%s)", repo_id, _first_line(exc))
        return None


def _pil_backend() -> dict:
    """The PIL image processors reproduce OpenAI CLIP's preprocessing and do not depend on torchvision."""
    return {"backend": "pil"} if int(_transformers_version().split(".")[0]) >= 5 else {"use_fast": False}


def _cannot_load(model_id: str, why: str) -> KPLInputError:
    return KPLInputError(
        f"cannot load CLIP checkpoint {model_id!r}: {why}. It must be a Hugging Face CLIP model (CLIPModel) with "
        "its tokenizer and preprocessor_config.json, given as a hub id or a local folder; use model='standin' for "
        "the untrained stand-in.")


def _load_pretrained(model_id: str, device: str, dtype: str, allow_network: bool | None) -> ClipEncoder:
    """A hub id or local folder → :class:`ClipEncoder` (model deferred when the files are local).

    ``allow_network=None`` (auto mode): use the local Hugging Face cache first and go to the hub only when it is
    reachable, so an offline machine falls back in milliseconds instead of retrying for ~20 s.
    """
    local = Path(model_id).expanduser()
    if local.is_dir():
        return _load_folder(local, model_id, device, dtype)
    if _PATHLIKE.match(model_id) or model_id.count("/") > 1 or local.exists():
        raise KPLInputError(f"model folder {model_id!r} not found (or not a folder). Pass an existing folder saved "
                            "with CLIPModel.save_pretrained, a Hugging Face hub id such as "
                            "'openai/clip-vit-base-patch16', or 'standin'.")
    error: Exception | None = None
    snapshot = _cached_snapshot(model_id)
    if snapshot is not None:
        try:
            return _load_folder(snapshot, model_id, device, dtype)
        except KPLInputError as exc:  # e.g. only some files of the snapshot are cached: ask the hub
            error = exc
            log.info("cached snapshot %s of %s is incomplete (%s)", snapshot, model_id, _first_line(exc))
    if allow_network is None and not _hub_reachable():
        raise _cannot_load(model_id, "not in the local Hugging Face cache and the hub is unreachable "
                                     f"({_first_line(error) if error else 'no cached snapshot'})")
    return _download_and_load(model_id, device, dtype)


def _load_folder(folder: Path, model_id: str, device: str, dtype: str) -> ClipEncoder:
    """A ``save_pretrained`` folder (or hub-cache snapshot): config, tokenizer and preprocessing now, model deferred."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise _cannot_load(model_id, f"{folder} has no config.json")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _cannot_load(model_id, f"cannot read {cfg_file}: {exc}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != "clip":
        raise KPLInputError(f"{model_id!r} is a {model_type!r} checkpoint, not a CLIP (model_type 'clip') one; "
                            "kplib loads CLIPModel checkpoints only")
    weights = checkpoint_weight_files(folder)
    if not weights:
        raise _cannot_load(model_id, f"{folder} has no weight file ({', '.join(n for f in _WEIGHT_FORMATS for n in f)})")
    from transformers import AutoTokenizer, CLIPConfig  # not AutoImageProcessor: importing it costs ~1.5 s

    try:
        cfg = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/EnvironmentError variants
        raise _cannot_load(model_id, _first_line(exc)) from exc
    source = {name: (hashlib.sha256((folder / name).read_bytes()).hexdigest() if (folder / name).is_file() else None)
              for name in ("preprocessor_config.json", "config.json")}
    source["backend"] = _pil_backend()

    def build_processor():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(folder), local_files_only=True, **_pil_backend())

    try:
        processor, preprocessing = _processor_parts(source, build_processor, model_id)
    except Exception as exc:
        raise _cannot_load(model_id, _first_line(exc)) from exc
    commit = _snapshot_commit(folder)
    try:
        revision = commit or "files-" + checkpoint_files_digest(folder)
        stamps = None if commit else [_stamp(f) for f in [cfg_file, *weights]]
    except OSError as exc:
        raise _cannot_load(model_id, f"cannot read its files: {exc}") from None
    identity = EncoderIdentity(name=model_id, revision=revision, is_standin=False)
    source_model = Deferred(lambda: _load_checkpoint_model(folder, model_id, stamps), f"the model of {model_id!r}")
    enc = ClipEncoder(source_model, tokenizer, processor, identity, device=device, dtype=dtype,
                      context_length=int(cfg.text_config.max_position_embeddings), embed_dim=int(cfg.projection_dim),
                      vision_act=cfg.vision_config.hidden_act, preprocessing=preprocessing)
    log.info("loaded %r (weights deferred until first encode)", enc)
    return enc


def _load_checkpoint_model(folder: Path, model_id: str, stamps: list | None):
    """``CLIPModel.from_pretrained`` on a local folder, refusing incomplete weights (never random-filled)."""
    if stamps is not None:
        try:
            now = [_stamp(Path(p)) for p, _, _ in stamps]
        except OSError:
            now = None
        if now != stamps:
            raise KPLError(f"the files of checkpoint {model_id!r} ({folder}) changed (or vanished) after "
                           "load_encoder computed its revision from them; call load_encoder again")
    from transformers import CLIPModel

    try:
        model, info = CLIPModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except Exception as exc:
        raise KPLInputError(f"cannot load the weights of CLIP checkpoint {model_id!r} ({folder}): "
                            f"{_first_line(exc)}. Use a complete CLIPModel checkpoint whose config.json matches "
                            "its weights (saved with save_pretrained), or model='standin'.") from exc
    _refuse_incomplete(model_id, info)
    return model


def _refuse_incomplete(model_id: str, info: dict) -> None:
    # transformers fills weights missing from the file with random values and only logs it: refuse that
    bad = sorted(set(info.get("missing_keys") or ()) | {str(k) for k in (info.get("mismatched_keys") or ())})
    if bad:
        raise KPLInputError(f"checkpoint {model_id!r} lacks or mismatches {len(bad)} CLIP weight(s) (e.g. "
                            f"{bad[:3]}); they would be random. Use a complete CLIPModel checkpoint.")


def _download_and_load(model_id: str, device: str, dtype: str) -> ClipEncoder:
    """Hub id not in the local cache: ``from_pretrained`` downloads it and loads it at once (a first run)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    try:
        model, info = CLIPModel.from_pretrained(model_id, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        processor = AutoImageProcessor.from_pretrained(model_id, **_pil_backend())
    except Exception as exc:  # transformers raises OSError/ValueError/EnvironmentError variants
        raise _cannot_load(model_id, _first_line(exc)) from exc
    if getattr(model.config, "model_type", None) != "clip":
        raise KPLInputError(f"{model_id!r} is a {getattr(model.config, 'model_type', '?')!r} checkpoint, not a CLIP "
                            "(model_type 'clip') one; kplib loads CLIPModel checkpoints only")
    _refuse_incomplete(model_id, info)
    commit = getattr(model.config, "_commit_hash", None)
    revision = str(commit) if commit else "weights-" + weights_digest(model)
    identity = EncoderIdentity(name=model_id, revision=revision, is_standin=False)
    enc = ClipEncoder(model, tokenizer, processor, identity, device=device, dtype=dtype)
    log.info("loaded %r", enc)
    return enc


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    result: list[bool] = []

    def probe() -> None:  # in a thread: name resolution itself has no timeout
        try:
            with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                          timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="kpl-hub-probe")
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def _warn_standin(reason: str) -> None:
    msg = (f"USING THE UNTRAINED STAND-IN ENCODER (random CLIP, seed {STANDIN_SEED}): every number it produces is "
           f"meaningless and must not be reported as a result. {reason}")
    log.warning(msg)
    warnings.warn(msg, StandInWarning, stacklevel=3)


#: Byte alignment of the CPU allocator's blocks. BLAS kernels take different code paths (and round differently) for
#: operands at other addresses; safetensors' memory-mapped weights sit at any 4-byte offset of the file.
CPU_ALIGNMENT = 64


def _prepared(model, device: torch.device):
    """``model`` on ``device`` in eval mode, with every CPU parameter and buffer at a 64-byte aligned address.

    Why: a checkpoint loaded by ``from_pretrained`` keeps its tensors where safetensors mapped them (measured here:
    ``data_ptr() % 64 == 20`` for a saved tiny CLIP), and the CPU matrix products round differently for unaligned
    operands (~1e-7 in the embeddings). Copying those tensors once makes a checkpoint give bit-identical
    embeddings whether it was loaded from disk or built in memory, which the embedding cache relies on.
    """
    model = model.to(device).eval()
    if torch.device(device).type == "cpu":
        with torch.no_grad():
            for t in (*model.parameters(), *model.buffers()):
                if t.numel() and t.data_ptr() % CPU_ALIGNMENT:
                    t.data = t.data.clone()
    return model


def _unit(out) -> Tensor:
    """Projected features (a tensor in transformers 4, a model output with ``pooler_output`` in 5) → float32 unit
    rows."""
    feats = out if isinstance(out, Tensor) else getattr(out, "pooler_output", None)
    if feats is None:
        feats = out[0]
    return F.normalize(feats.float(), dim=-1).cpu()


def _name(item) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"<{type(item).__name__}>"


def _first_line(exc: Exception | None) -> str:
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else type(exc).__name__
    return text[:300]
