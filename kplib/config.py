"""Where kplib finds data, descriptor files, the tokenizer, the cache and the model: one place, env-overridable."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import KPLInputError

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_ROOT = REPO_ROOT.parent / "shared"
DEFAULT_MODEL = "openai/clip-vit-large-patch14-336"


def _folder(var: str, default: Path, what: str, must_exist: bool = True) -> Path:
    value = os.environ.get(var)
    path = Path(value).expanduser() if value else default
    if must_exist and not path.is_dir():
        source = f"${var}={value!r}" if value else f"the default {path}"
        raise KPLInputError(
            f"{what} folder not found ({source}). Set the environment variable {var} to the folder that holds it."
        )
    return path


def data_root() -> Path:
    """Folder with ``<dataset>/val/<class>/<image>`` (``$KPL_DATA_ROOT``)."""
    return _folder("KPL_DATA_ROOT", SHARED_ROOT / "data", "image data")


def descriptors_root() -> Path:
    """Folder with published descriptor files (``$KPL_DESCRIPTORS_ROOT``)."""
    return _folder("KPL_DESCRIPTORS_ROOT", SHARED_ROOT / "descriptors", "published descriptor")


def tokenizer_dir() -> Path:
    """OpenAI CLIP tokenizer files used by the untrained stand-in (``$KPL_TOKENIZER_DIR``)."""
    return _folder("KPL_TOKENIZER_DIR", SHARED_ROOT / "models" / "openai-clip-tokenizer", "CLIP tokenizer")


def cache_dir() -> Path:
    """Embedding cache (``$KPL_CACHE_DIR``, default ``~/.cache/kplib``); created on first use by the cache."""
    return _folder("KPL_CACHE_DIR", Path.home() / ".cache" / "kplib", "cache", must_exist=False)


def default_device() -> str:
    """Torch device for encoding (``$KPL_DEVICE``, e.g. ``cuda`` or ``cuda:1``; default ``cpu``)."""
    return os.environ.get("KPL_DEVICE") or "cpu"


def default_model() -> str:
    """CLIP checkpoint to load (``$KPL_MODEL``): a hub id, a local folder, ``standin`` or ``auto``."""
    return os.environ.get("KPL_MODEL") or DEFAULT_MODEL
