"""Exceptions and warnings raised by kplib.

Every error a user can cause derives from :class:`KPLError`; input problems are also ``ValueError`` so generic
handlers keep working. Messages name the offending parameter, class or file and say what to do.
"""
from __future__ import annotations

from pathlib import Path


class KPLError(Exception):
    """Base class of every error kplib raises on purpose."""


class KPLInputError(KPLError, ValueError):
    """An argument (tensor, parameter, file) is invalid."""


class ImageDecodeError(KPLError):
    """An image file could not be decoded into RGB."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class KnowledgeBaseError(KPLInputError):
    """A knowledge base is missing, malformed or does not match the dataset."""


class CacheError(KPLError):
    """The embedding cache cannot be used (e.g. read-only or full directory)."""


class LLMError(KPLError):
    """An LLM endpoint failed or answered with something unusable."""


class StandInWarning(UserWarning):
    """Numbers come from the UNTRAINED stand-in encoder: they carry no meaning about CLIP or KPL."""
