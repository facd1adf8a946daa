"""kplib — Knowledge Proxy Learning (KPL, AAAI 2025) for training-free zero-shot medical image classification.

Layers, bottom up (ARCHITECTURE.md): :mod:`kplib.method` (the method on tensors), :mod:`kplib.io` (images, folders,
encoders, the embedding store, knowledge bases), :mod:`kplib.pipeline` and :mod:`kplib.cli` (one orchestration
path), :mod:`kplib.book` (what only the book needs). The names below are imported on first use, so
``import kplib`` stays light.
"""
from __future__ import annotations

import importlib

from .errors import KPLError, KPLInputError, StandInWarning

__version__ = "0.2.0"

_PUBLIC = {
    "run": "kplib.pipeline", "compare": "kplib.pipeline", "embed_images": "kplib.pipeline",
    "embed_knowledge": "kplib.pipeline", "load_encoder": "kplib.io.encoders", "load_dataset": "kplib.io.datasets",
    "load_kb": "kplib.io.knowledge", "run_method": "kplib.method.methods", "KPLConfig": "kplib.method.methods",
    "METHODS": "kplib.method.methods", "make_world": "kplib.method.simulate", "evaluate": "kplib.method.metrics",
}
__all__ = ["KPLError", "KPLInputError", "StandInWarning", "__version__", *_PUBLIC]  # noqa: PLE0604 (lazy names)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'kplib' has no attribute {name!r}")
