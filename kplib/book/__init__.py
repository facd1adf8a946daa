"""What only the book needs: chapter setup, figures, widgets and the analyses the chapters show.

A chapter starts with ``chapter = setup(MODEL, OUTPUT_DIR, dataset=DATASET)`` and then calls
``figures.<name>(..., encoder=chapter)`` and ``analysis.<name>(...)``. Needs the ``kplib[book]`` extra.
"""
from . import analysis, figures, widgets
from .setup import Chapter, setup

__all__ = ["Chapter", "analysis", "figures", "setup", "widgets"]
