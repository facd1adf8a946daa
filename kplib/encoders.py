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
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from . import config
from ._checks import check_choice, check_int
from .errors import ImageDecodeError, KPLInputError, StandInWarning

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
        "num_hidden_layers": 4, "num_attention_heads": 4, "projection_dim": 256,
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
                 device: str | torch.device = "cpu", dtype: str = "float32"):
        check_choice(dtype, "dtype", DTYPES)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.identity = identity
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.embed_dim = int(model.config.projection_dim)

    def __repr__(self) -> str:
        return (f"ClipEncoder({self.identity.label!r}, revision={self.identity.revision!r}, "
                f"device={str(self.device)!r}, dtype={self.dtype!r}, dim={self.embed_dim})")

    # ------------------------------------------------------------------ identity of what the encoder computes
    @property
    def preprocessing(self) -> dict:
        """The image preprocessing settings (part of the embedding cache key)."""
        d = self.image_processor.to_dict()
        keep = ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
                "image_mean", "image_std", "resample", "do_convert_rgb")
        out = {k: d[k] for k in keep if k in d}
        out["processor"] = type(self.image_processor).__name__
        return json.loads(json.dumps(out, sort_keys=True, default=str))

    def fingerprint(self) -> dict:
        """Everything that determines an image embedding besides the image bytes (model, weights, preprocessing,
        numeric precision). Used as the cache namespace."""
        return {"model": self.identity.name, "revision": self.identity.revision,
                "is_standin": self.identity.is_standin, "preprocessing": self.preprocessing, "dtype": self.dtype}

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")

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
        """(B, 3, H, W) pixels → (B, d) float32 unit-norm image embeddings."""
        with self._autocast():
            out = self.model.get_image_features(pixel_values=pixel_values.to(self.device))
        return _unit(out)

    def encode_images(self, images: Sequence, batch_size: int = 32, progress: bool = True,
                      num_workers: int | None = None) -> Tensor:
        """Encode images (PIL images or paths) → (N, d). Raises :class:`ImageDecodeError` on the first bad file."""
        return self.encode_images_detailed(images, batch_size=batch_size, progress=progress,
                                           num_workers=num_workers, on_error="stop").embeddings

    def encode_images_detailed(self, images: Sequence, batch_size: int = 32, progress: bool = True,
                               num_workers: int | None = None, on_error: str = "stop") -> ImageEncoding:
        """Encode images in streamed batches, decoding the next batches in worker threads while the model runs.

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
def load_encoder(model: str = AUTO, device: str | None = None, dtype: str = "float32") -> ClipEncoder:
    """Load a CLIP encoder.

    ``model``: a Hugging Face hub id or a local folder saved with ``save_pretrained`` (loaded through
    ``CLIPModel.from_pretrained``); ``"standin"`` for the untrained stand-in; or ``"auto"``: the configured model
    (``$KPL_MODEL``, default ``openai/clip-vit-large-patch14-336``), falling back to the stand-in — with a
    :class:`StandInWarning` — only when that model cannot be loaded. An explicit model that cannot be loaded raises
    :class:`KPLInputError` (no fallback).
    """
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
    its weights, so a change in torch's initialisation can never be mistaken for cached embeddings."""
    model = build_standin_model(STANDIN_SEED)
    identity = EncoderIdentity(name=STANDIN, revision="weights-" + weights_digest(model), is_standin=True)
    return ClipEncoder(model, load_clip_tokenizer(), standin_image_processor(), identity, device=device, dtype=dtype)


def weights_digest(model) -> str:
    """Short blake2b digest of every parameter/buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def default_num_workers(n_images: int) -> int:
    """Decoding threads: 1 for small jobs, 2 above 256 images (decoding then overlaps the model on ≥2 cores)."""
    return 1 if n_images <= 256 or (os.cpu_count() or 1) < 2 else 2


_PATHLIKE = re.compile(r"^(/|\.{1,2}/|~|[A-Za-z]:\\)")


def _load_pretrained(model_id: str, device: str, dtype: str, allow_network: bool | None) -> ClipEncoder:
    """``CLIPModel.from_pretrained`` + the checkpoint's tokenizer and image processor.

    ``allow_network=None`` (auto mode): use the local Hugging Face cache first and go to the hub only when it is
    reachable, so an offline machine falls back in milliseconds instead of retrying for ~20 s.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    # The PIL image processors reproduce OpenAI CLIP's preprocessing and do not depend on torchvision.
    pil_backend = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    local = Path(model_id).expanduser()
    is_dir = local.is_dir()
    if not is_dir and (_PATHLIKE.match(model_id) or model_id.count("/") > 1 or local.exists()):
        raise KPLInputError(f"model folder {model_id!r} not found (or not a folder). Pass an existing folder saved "
                            "with CLIPModel.save_pretrained, a Hugging Face hub id such as "
                            "'openai/clip-vit-base-patch16', or 'standin'.")
    source = str(local) if is_dir else model_id
    # local folder: files only; explicit hub id: transformers' own cache+network logic; auto: cache, then network
    tries = [True] if is_dir else ([True, False] if allow_network is None else [False])
    parts, error = None, None
    for local_only in tries:
        if not local_only and allow_network is None and not _hub_reachable():
            error = OSError(f"not in the local Hugging Face cache and the hub is unreachable ({_first_line(error)})")
            break
        try:
            model, info = CLIPModel.from_pretrained(source, local_files_only=local_only, output_loading_info=True)
            parts = (model, info,
                     AutoTokenizer.from_pretrained(source, local_files_only=local_only),
                     AutoImageProcessor.from_pretrained(source, local_files_only=local_only, **pil_backend))
            break
        except Exception as exc:  # transformers raises OSError/ValueError/EnvironmentError variants
            error = exc
    if parts is None:
        raise KPLInputError(
            f"cannot load CLIP checkpoint {model_id!r}: {_first_line(error)}. It must be a Hugging Face CLIP model "
            "(CLIPModel) with its tokenizer and preprocessor_config.json, given as a hub id or a local folder; "
            "use model='standin' for the untrained stand-in.") from error
    model, info, tokenizer, processor = parts
    if getattr(model.config, "model_type", None) != "clip":
        raise KPLInputError(f"{model_id!r} is a {getattr(model.config, 'model_type', '?')!r} checkpoint, not a CLIP "
                            "(model_type 'clip') one; kplib loads CLIPModel checkpoints only")
    # transformers fills weights missing from the file with random values and only logs it: refuse that
    bad = sorted(set(info.get("missing_keys") or ()) | {str(k) for k in (info.get("mismatched_keys") or ())})
    if bad:
        raise KPLInputError(f"checkpoint {model_id!r} lacks or mismatches {len(bad)} CLIP weight(s) (e.g. "
                            f"{bad[:3]}); they would be random. Use a complete CLIPModel checkpoint.")
    identity = EncoderIdentity(name=model_id, revision=_revision(model, local if is_dir else None), is_standin=False)
    enc = ClipEncoder(model, tokenizer, processor, identity, device=device, dtype=dtype)
    log.info("loaded %r", enc)
    return enc


def _revision(model, local_dir: Path | None) -> str:
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return str(commit)
    if local_dir is not None:  # a hub cache snapshot folder is named after its commit
        name = local_dir.resolve().name
        if re.fullmatch(r"[0-9a-f]{40}", name) and local_dir.resolve().parent.name == "snapshots":
            return name
    return "weights-" + weights_digest(model)


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
