"""Exceptions and warnings raised by kplib, and the one way error messages spell a fix.

Every error a user can cause derives from :class:`KPLError`; input problems are also ``ValueError`` so generic
handlers keep working. Messages name the offending parameter, class or file and say what to do — for command-line
users as a flag and for Python users as an argument (:func:`fix`).
"""
from __future__ import annotations

from pathlib import Path


class KPLError(Exception):
    """Base class of every error kplib raises on purpose."""


class KPLInputError(KPLError, ValueError):
    """An argument (tensor, parameter, file, folder) is invalid."""


class ImageDecodeError(KPLError):
    """An image file could not be decoded into RGB; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class KnowledgeBaseError(KPLInputError):
    """A knowledge base is missing, malformed or does not match the dataset."""


class LLMError(KPLError):
    """An LLM endpoint failed or answered with something unusable."""


class StandInWarning(UserWarning):
    """Numbers come from the UNTRAINED stand-in encoder: they carry no meaning about CLIP or KPL."""


class CacheWarning(UserWarning):
    """The embedding store is (partly) off; results are still computed, just not stored or reused."""


def fix(cli: str | None = None, python: str | None = None) -> str:
    """The fix for an error in both spellings: ``"(command line: --on-error skip; Python: on_error='skip')"``."""
    parts = [f"command line: {cli}" if cli else "", f"Python: {python}" if python else ""]
    return "(" + "; ".join(p for p in parts if p) + ")"
