"""Where kplib finds data, descriptor files, the tokenizer, the cache and the model: one place, env-overridable.

| variable | meaning | default |
|---|---|---|
| ``KPL_DATA_ROOT`` | folder holding ``<dataset>/val/<class>/<image>`` | ``../shared/data`` in a source checkout |
| ``KPL_DESCRIPTORS_ROOT`` | published descriptor files | ``../shared/descriptors`` in a source checkout |
| ``KPL_TOKENIZER_DIR`` | CLIP tokenizer for the stand-in | ``../shared/models/openai-clip-tokenizer`` (checkout) |
| ``KPL_CACHE_DIR`` | embedding store | ``platformdirs.user_cache_dir("kplib")`` (honours ``XDG_CACHE_HOME``) |
| ``KPL_MODEL`` | CLIP checkpoint (hub id or folder), ``standin`` or ``auto`` | ``openai/clip-vit-large-patch14-336`` |
| ``KPL_DEVICE`` | torch device for encoding | ``cuda`` when available, else ``cpu`` |

The ``../shared`` defaults are guessed only in a source checkout (the package folder sits next to ``pyproject.toml``);
an installed wheel has no such neighbour and asks for the variable instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs
import torch

from .errors import KPLInputError

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent
IN_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / ".git").exists()
SHARED_ROOT = REPO_ROOT.parent / "shared" if IN_CHECKOUT else None
DEFAULT_MODEL = "openai/clip-vit-large-patch14-336"


def _folder(var: str, default: str | None, what: str, required: bool = True) -> Path | None:
    value = os.environ.get(var)
    path = Path(value).expanduser() if value else (SHARED_ROOT / default if SHARED_ROOT and default else None)
    if path is not None and path.is_dir():
        return path
    if not required:
        return None
    where = f"${var}={value!r} is not a folder" if value else (f"the default {path} does not exist" if path else
                                                              "no default outside a source checkout")
    raise KPLInputError(f"{what} folder not found ({where}). Set the environment variable {var} to the folder "
                        "that holds it.")


def data_root() -> Path:
    """Folder with ``<dataset>/val/<class>/<image>`` (``$KPL_DATA_ROOT``)."""
    return _folder("KPL_DATA_ROOT", "data", "image data")


def descriptors_root() -> Path:
    """Folder with published descriptor files (``$KPL_DESCRIPTORS_ROOT``)."""
    return _folder("KPL_DESCRIPTORS_ROOT", "descriptors", "published descriptor")


def tokenizer_dir(required: bool = True) -> Path | None:
    """OpenAI CLIP tokenizer files (``$KPL_TOKENIZER_DIR``) used by the stand-in; None when absent and not required."""
    return _folder("KPL_TOKENIZER_DIR", "models/openai-clip-tokenizer", "CLIP tokenizer", required)


def cache_dir() -> Path:
    """Embedding store folder (``$KPL_CACHE_DIR``, else the platform's user cache folder); created on first write."""
    value = os.environ.get("KPL_CACHE_DIR")
    return Path(value).expanduser() if value else Path(platformdirs.user_cache_dir("kplib"))


def default_device() -> str:
    """Torch device for encoding (``$KPL_DEVICE``, e.g. ``cuda:1``); default ``cuda`` when available, else ``cpu``."""
    return os.environ.get("KPL_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def default_model() -> str:
    """CLIP checkpoint to load (``$KPL_MODEL``): a hub id, a local folder, ``standin`` or ``auto``."""
    return os.environ.get("KPL_MODEL") or DEFAULT_MODEL
