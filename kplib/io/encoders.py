"""CLIP encoders: any Hugging Face CLIP checkpoint, or the labelled untrained stand-in, on top of transformers.

An :class:`Encoder` wraps a ``transformers.CLIPModel`` with its tokenizer and image processor and encodes in batches
with the model's own ``get_image_features`` / ``get_text_features`` (SDPA attention, ``torch.inference_mode``;
``dtype="bfloat16"`` under ``torch.autocast``). Rows come back float32 and L2-normalised, so cosine similarity is a
dot product: :math:`x = f(I) / \\lVert f(I) \\rVert_2`, :math:`t = g(T) / \\lVert g(T) \\rVert_2`.

Every encoder carries an :class:`EncoderIdentity` that travels with every embedding and result, and a
:meth:`Encoder.namespace` (everything that changes an embedding) that the embedding store keys on.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import huggingface_hub
import torch
import torch.nn.functional as F
import transformers
from huggingface_hub import constants as hub_constants
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm
from transformers import CLIPModel

from .. import paths
from ..errors import KPLInputError, StandInWarning, fix
from ..params import Interval, Options, check

log = logging.getLogger("kplib")

STANDIN = "standin"
AUTO = "auto"
STANDIN_SEED = 0
#: Version of the stand-in's recipe (config, seed, processor); bump it whenever any of them changes.
STANDIN_RECIPE = "standin-v1"
STANDIN_LABEL = "UNTRAINED stand-in (random CLIP, seed 0) — numbers are meaningless"
DTYPES = ("float32", "bfloat16")

#: The stand-in: a small CLIP (ViT 224/32, 4 layers, width 256) whose text side uses the real OpenAI vocabulary
#: (49408 tokens) and context (77), so tokenisation and prompt-length checks are the real ones.
_TOWER = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
          "projection_dim": 256}
STANDIN_CONFIG: dict = {
    "projection_dim": 256,
    "text_config": {**_TOWER, "vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406,
                    "eos_token_id": 49407, "pad_token_id": 49407},
    "vision_config": {**_TOWER, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu"},
}
#: OpenAI CLIP preprocessing: bicubic resize of the short side to 224, centre crop 224, OpenAI mean/std.
STANDIN_PROCESSOR: dict = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}
#: Processor settings that change pixels (recorded in the namespace).
_PREPROCESSING_KEYS = ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "rescale_factor",
                       "do_normalize", "image_mean", "image_std", "resample", "do_convert_rgb")
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
_PATHLIKE = re.compile(r"^(/|\.{1,2}[/\\]|~|[A-Za-z]:[/\\])")
_HUB_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class EncoderIdentity:
    """Which weights produced an embedding; travels with every embedding set and every result.

    ``revision`` is the hub commit for a hub checkpoint, ``"files-<sha256>"`` of ``config.json`` and the weight files
    for a local folder, and the recipe for the stand-in, so two different checkpoints never share stored embeddings.
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
    def from_dict(cls, d: dict) -> EncoderIdentity:
        return cls(name=d["name"], revision=d.get("revision"), is_standin=bool(d["is_standin"]))


class Encoder:
    """A frozen CLIP image/text encoder (a ``transformers.CLIPModel``, its tokenizer and image processor), built by
    :func:`load_encoder`; ``dtype`` ``"bfloat16"`` runs the forward under autocast."""

    #: Threads that prepare images: :func:`kplib.pipeline.embed_images` decodes files in them, and the image
    #: processor runs on slices of each batch (Pillow's decoders and resize release the GIL); 1: one at a time.
    #: With the forward on a GPU, decoding and the processor bound encoding.
    preprocess_threads: int = min(8, os.cpu_count() or 1)

    def __init__(self, model: CLIPModel, tokenizer, processor, identity: EncoderIdentity, device="cpu",
                 dtype: str = "float32", batch_size: int = 32):
        self.dtype = check("dtype", dtype, Options(*DTYPES))
        self.batch_size = check("batch_size", batch_size, Interval(int, 1))
        try:
            self.device = torch.device(device)
            self.model = model.to(self.device).eval()
        except (RuntimeError, AssertionError) as exc:  # unknown device string, or CUDA absent/not compiled in
            raise KPLInputError(f"cannot use torch device {str(device)!r}: {_first_line(exc)}. Choose an available one "
                                + fix(cli="--device cpu", python="device='cpu'") + " or set KPL_DEVICE") from None
        self.tokenizer, self.processor, self.identity = tokenizer, processor, identity
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.embed_dim = int(model.config.projection_dim)

    def __repr__(self) -> str:
        return (f"Encoder({self.identity.label!r}, revision={self.identity.revision!r}, device={str(self.device)!r}, "
                f"dtype={self.dtype!r}, dim={self.embed_dim})")

    @property
    def preprocessing(self) -> dict:
        """The image processor's settings that change pixels (class name included)."""
        d = self.processor.to_dict()
        out = {k: d[k] for k in _PREPROCESSING_KEYS if k in d}
        return json.loads(json.dumps({**out, "processor": type(self.processor).__name__}, default=str))

    @functools.cached_property
    def tokenizer_digest(self) -> str:
        """sha256 of the tokenizer's serialisation (vocabulary, merges, normaliser, special tokens; not the padding and
        truncation settings that each call changes)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return hashlib.sha256(repr(sorted(self.tokenizer.get_vocab().items())).encode()).hexdigest()
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def namespace(self, kind: str = "image") -> dict:
        """Everything besides the input that changes an embedding of ``kind`` (``"image"`` or ``"text"``), for the
        embedding store to key on; the caller adds what happens before the encoder (e.g. the decoder's version)."""
        check("kind", kind, Options("image", "text"))
        ns = {"kind": kind, "model": self.identity.name, "revision": self.identity.revision,
              "is_standin": self.identity.is_standin, "dtype": self.dtype, "embed_dim": self.embed_dim}
        if kind == "image":
            return {**ns, "preprocessing": self.preprocessing}
        return {**ns, "tokenizer": self.tokenizer_digest, "context_length": self.context_length}

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")

    @staticmethod
    def _unit(out) -> Tensor:  # the projected features of get_image_features / get_text_features, unit rows
        return F.normalize(out.pooler_output.float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_images(self, images: Iterable[Image.Image], batch_size: int | None = None,
                      progress: bool = False) -> Tensor:
        """Encode PIL images → ``(n, d)`` float32 unit rows, in input order, ``batch_size`` at a time (default: the
        encoder's). A generator of images is consumed a batch at a time, so memory does not grow with their number.
        """
        batch_size = self.batch_size if batch_size is None else check("batch_size", batch_size, Interval(int, 1))
        total = len(images) if hasattr(images, "__len__") else None
        # one output tensor (doubled when a generator outgrows it): per-batch tensors kept alive fragment the heap
        out, seen, items = torch.empty(total if total is not None else 1024, self.embed_dim), 0, iter(images)
        with tqdm(total=total, desc="encoding images", unit="img", disable=not progress) as bar:
            while batch := list(itertools.islice(items, batch_size)):
                bad = next((i for i, im in enumerate(batch) if not isinstance(im, Image.Image)), None)
                if bad is not None:
                    raise KPLInputError(f"images[{seen + bad}] is a {type(batch[bad]).__name__}, not a PIL image; read "
                                        "files with kplib.io.images.read_image, or encode a folder with "
                                        "kplib.pipeline.embed_images")
                rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in batch]
                pixels = self._preprocess(rgb).to(self.device)
                if seen + len(batch) > len(out):
                    out = torch.cat([out, torch.empty_like(out)])
                with self._autocast():
                    out[seen:seen + len(batch)] = self._unit(self.model.get_image_features(pixel_values=pixels))
                seen += len(batch)
                bar.update(len(batch))
        return out if seen == len(out) else out[:seen].clone()

    def _preprocess(self, images: list[Image.Image]) -> Tensor:
        """The processor's pixel values of ``images``, in order, computed in :attr:`preprocess_threads` slices."""
        def pixels(part):
            return self.processor(images=part, return_tensors="pt")["pixel_values"]
        threads = min(self.preprocess_threads, len(images))
        if threads <= 1:
            return pixels(images)
        step = -(-len(images) // threads)  # contiguous slices, so the concatenation keeps the input order
        parts = [images[i:i + step] for i in range(0, len(images), step)]
        with ThreadPoolExecutor(len(parts)) as pool:
            return torch.cat(list(pool.map(pixels, parts)))

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Number of tokens of each text, start and end tokens included, before truncation."""
        return [len(x) for x in self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]]

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> Tensor:
        """Encode texts → ``(n, d)`` float32 unit rows. Texts longer than :attr:`context_length` tokens are truncated
        as CLIP does: the first ``context_length - 1`` tokens and the end token."""
        check("batch_size", batch_size, Interval(int, 1))
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise KPLInputError("texts must be a sequence of strings")
        out = torch.empty(len(texts), self.embed_dim)
        for i in tqdm(range(0, len(texts), batch_size), desc="encoding texts", disable=not progress):
            tok = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                 max_length=self.context_length, return_tensors="pt").to(self.device)
            with self._autocast():
                out[i:i + batch_size] = self._unit(self.model.get_text_features(tok.input_ids, tok.attention_mask))
        return out


# ---------------------------------------------------------------------------------------------------- loading
def load_encoder(model: str = AUTO, device: str | None = None, dtype: str = "float32",
                 batch_size: int = 32) -> Encoder:
    """Load a CLIP encoder.

    Parameters
    ----------
    model : str
        A Hugging Face hub id or a ``save_pretrained`` folder of a ``CLIPModel`` with its tokenizer and image
        processor; ``"standin"`` for the untrained stand-in; or ``"auto"``: ``$KPL_MODEL``, falling back to the
        stand-in with a :class:`~kplib.errors.StandInWarning` when it cannot be loaded (an explicit model raises).
    device : str, optional
        Torch device (default :func:`kplib.paths.default_device`).
    dtype : {"float32", "bfloat16"}
        ``"bfloat16"`` runs the forward under ``torch.autocast``.
    batch_size : int
        Default number of images per forward.

    Notes
    -----
    A hub id not in the local Hugging Face cache is asked of the hub once, without retries, so a machine without
    network fails within seconds (``HF_HUB_OFFLINE=1`` skips the question). Checkpoints with missing or mismatched
    weights are refused (transformers would fill them with random values).
    """
    check("dtype", dtype, Options(*DTYPES))
    check("batch_size", batch_size, Interval(int, 1))
    if not isinstance(model, str) or not model.strip():
        raise KPLInputError(f"model must be a hub id, a local folder, 'standin' or 'auto', got {model!r}")
    args, model = (device or paths.default_device(), dtype, batch_size), model.strip()
    target = paths.default_model().strip() if model == AUTO else model
    if target == STANDIN:
        _warn_standin("the untrained stand-in was selected explicitly (model='standin')." if model == STANDIN
                      else "KPL_MODEL=standin selects the untrained stand-in.")
        return _standin(*args)
    if model != AUTO:
        return _pretrained(model, *args)
    try:
        return _pretrained(paths.DEFAULT_MODEL if target == AUTO else target, *args)
    except KPLInputError as exc:
        _warn_standin(f"model='auto' could not load {target!r}: {exc} Set KPL_MODEL to a CLIP checkpoint (hub id or "
                      "local folder) to get real results.")
        return _standin(*args)


def _standin(*args) -> Encoder:
    """The untrained stand-in: :data:`STANDIN_CONFIG` from seed 0 (the global torch RNG untouched), the OpenAI CLIP
    tokenizer from :func:`kplib.paths.tokenizer_dir`, OpenAI preprocessing."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(paths.tokenizer_dir()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(STANDIN_SEED)
        model = CLIPModel(transformers.CLIPConfig(**copy.deepcopy(STANDIN_CONFIG), attn_implementation="sdpa"))
    revision = f"{STANDIN_RECIPE}-seed{STANDIN_SEED}-torch{torch.__version__}-transformers{transformers.__version__}"
    identity = EncoderIdentity(STANDIN, revision, True)
    return Encoder(model, tokenizer, transformers.CLIPImageProcessorPil(**STANDIN_PROCESSOR), identity, *args)


def _pretrained(source: str, *args) -> Encoder:
    """A local ``save_pretrained`` folder or a hub id → :class:`Encoder`; KPLInputError saying why not."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        revision = _snapshot_commit(folder) or "files-" + checkpoint_digest(folder)
        return _from_pretrained(str(folder), source, revision, True, *args)
    if _PATHLIKE.match(source) or source.count("/") > 1 or folder.exists():
        raise KPLInputError(f"model folder {source!r} not found (or not a folder). Pass a folder saved with "
                            "CLIPModel.save_pretrained, a hub id such as 'openai/clip-vit-base-patch16', or "
                            f"'standin' {fix(cli='--model FOLDER_OR_HUB_ID', python='model=...')}")
    try:
        cached = huggingface_hub.try_to_load_from_cache(source, "config.json")  # its path when cached (no network)
    except Exception as exc:  # an invalid repo id
        raise _cannot_load(source, _first_line(exc)) from exc
    if isinstance(cached, str):
        try:
            return _from_pretrained(source, source, _snapshot_commit(Path(cached).parent), True, *args)
        except _Unavailable as exc:  # e.g. only some files of the snapshot are cached: ask the hub
            if _offline():
                raise
            log.info("cached snapshot %s of %s is incomplete (%s)", Path(cached).parent, source, exc)
    return _from_pretrained(source, source, _ask_hub(source), False, *args)  # downloads the commit the hub named


def _from_pretrained(src: str, name: str, revision: str | None, local_only: bool, *args) -> Encoder:
    """Load ``src`` from disk (``local_only``), else download hub commit ``revision``."""
    kw = {"local_files_only": local_only, "revision": None if local_only else revision}
    try:
        model_type = transformers.AutoConfig.from_pretrained(src, **kw).model_type
    except Exception as exc:  # transformers raises OSError / ValueError / EnvironmentError variants
        raise _cannot_load(name, _first_line(exc)) from exc
    if model_type != "clip":
        raise KPLInputError(f"{name!r} is a {model_type!r} checkpoint, not a CLIP one (model_type 'clip'); kplib "
                            f"loads CLIPModel checkpoints only {fix(cli='--model standin', python='model=...')}")
    try:
        model, info = CLIPModel.from_pretrained(src, output_loading_info=True, attn_implementation="sdpa", **kw)
        tokenizer = transformers.AutoTokenizer.from_pretrained(src, **kw)
        processor = transformers.AutoImageProcessor.from_pretrained(src, backend="pil", **kw)
    except Exception as exc:
        raise _cannot_load(name, _first_line(exc)) from exc
    bad = sorted(set(info.get("missing_keys") or ()) | {str(k) for k in info.get("mismatched_keys") or ()})
    if bad:
        raise KPLInputError(f"checkpoint {name!r} ({src}) lacks or mismatches {len(bad)} CLIP weight(s) (e.g. "
                            f"{bad[:3]}); transformers would fill them with random values. Use a complete CLIPModel "
                            "checkpoint whose config.json matches its weights (saved with save_pretrained).")
    encoder = Encoder(model, tokenizer, processor, EncoderIdentity(name, revision, False), *args)
    log.info("loaded %r", encoder)
    return encoder


def checkpoint_digest(folder: str | Path) -> str:
    """sha256 over the names and bytes of a checkpoint folder's ``config.json`` and weight files (sorted by name)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.name == "config.json" or _WEIGHT_FILE.fullmatch(p.name))
    if not any(_WEIGHT_FILE.fullmatch(p.name) for p in files):
        raise _cannot_load(str(folder), f"{folder} has no weight file (model.safetensors or pytorch_model.bin)")
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as fh:
            h.update(f"{path.name}\0{hashlib.file_digest(fh, 'sha256').hexdigest()}\n".encode())
    return h.hexdigest()[:32]


def _snapshot_commit(folder: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot folder (``.../snapshots/<40 hex>``), else None."""
    real = folder.resolve()
    return real.name if re.fullmatch(r"[0-9a-f]{40}", real.name) and real.parent.name == "snapshots" else None


def _offline() -> bool:
    flags = (os.environ.get(v, "").strip().upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return hub_constants.HF_HUB_OFFLINE or any(f in hub_constants.ENV_VARS_TRUE_VALUES for f in flags)


def _ask_hub(repo_id: str) -> str | None:
    """The commit the hub serves for ``repo_id``: one request for its config.json, without retries; KPLInputError
    when the hub does not answer."""
    if _offline():
        raise _cannot_load(repo_id, "it is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE)")
    try:
        return huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo_id, "config.json"),
                                                    timeout=_HUB_TIMEOUT_S).commit_hash
    except Exception as exc:
        raise _cannot_load(repo_id, f"it is not in the local Hugging Face cache and the hub did not answer "
                                    f"({_first_line(exc)})") from exc


class _Unavailable(KPLInputError):
    """A checkpoint's files cannot be found or read (as opposed to files that are there but wrong)."""


def _cannot_load(name: str, why: str) -> KPLInputError:
    return _Unavailable(
        f"cannot load CLIP checkpoint {name!r}: {why}. It must be a Hugging Face CLIPModel checkpoint with its "
        "tokenizer and preprocessor_config.json, given as a hub id or a local folder; the untrained stand-in is "
        f"{fix(cli='--model standin', python='model=' + repr(STANDIN))}.")


def _warn_standin(reason: str) -> None:
    msg = (f"USING THE UNTRAINED STAND-IN ENCODER (random CLIP, seed {STANDIN_SEED}): every number it produces is "
           f"meaningless and must not be reported as a result. {reason}")
    warnings.warn(msg, StandInWarning, stacklevel=3)  # one channel: the CLI and the book turn it into one banner


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
