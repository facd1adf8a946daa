"""One-line chapter setup, ``chapter = kplib.book.setup(MODEL, OUTPUT_DIR, dataset=DATASET)``: quiet logs, inline
figures, a version line, the encoder announced once by a banner, and a :class:`Chapter` that saves figures, captions
tables with the encoder and collapses real-image sections when only the stand-in ran."""
from __future__ import annotations

import base64
import html
import logging
import platform
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from IPython import get_ipython
from IPython.display import HTML, display
from IPython.utils.capture import capture_output

from .. import __version__
from ..errors import StandInWarning
from ..io.encoders import Encoder, load_encoder
from ..method.simulate import SIMULATED_ENCODER
from .figures import CAPTION_COLOR, SIMULATED_CAPTION, STANDIN_CAPTION, caption_for

#: Third-party loggers whose messages would clutter the page (set to ERROR).
QUIET_LOGGERS = ("transformers", "huggingface_hub", "urllib3", "httpx", "filelock", "numba", "umap", "pynndescent",
                 "PIL", "matplotlib", "papermill", "traitlets")
REAL_IMAGES_NOTE = ("computed with the stand-in encoder, this section only shows that the code runs; with a pretrained "
                    "CLIP checkpoint (set <code>KPL_MODEL</code> and re-run the notebook) it shows the real result.")
_BANNERS = {  # caption → (admonition class, colour, what the reader must know)
    STANDIN_CAPTION: ("danger", CAPTION_COLOR, ("A randomly initialised CLIP produced the numbers on this page: they "
                      "exercise the code and mean nothing about CLIP, KPL or medicine. Set <code>KPL_MODEL</code> to a "
                      "pretrained checkpoint for real numbers.")),
    SIMULATED_CAPTION: ("warning", "#b35900", ("The embeddings on this page are SIMULATED (known ground truth): they "
                        "show mechanisms and measure no real model.")),
    None: ("tip", "#1a5e20", "The numbers on this page were produced by this pretrained encoder."),
}


class _Stdout(logging.StreamHandler):
    """Writes to the *current* ``sys.stdout``, so a captured section captures log lines too."""

    stream = property(lambda self: sys.stdout, lambda self, value: None)


def banner(label: str, dataset: str | None = None, why: str | None = None) -> HTML:
    """The chapter's encoder banner: an admonition naming the encoder (red for the untrained stand-in) and ``why``."""
    kind, colour, note = _BANNERS[caption_for(label)]
    where = f" on {html.escape(dataset)}" if dataset else ""
    return HTML(f'<div class="admonition {kind} kpl-encoder-banner" style="border-left:0.3em solid {colour}">'
                f'<p class="admonition-title" style="color:{colour}">Encoder: {html.escape(label)}{where}</p>'
                f"<p>{note}</p>" + (f"<p><small>{html.escape(why)}</small></p>" if why else "") + "</div>")


def quiet() -> None:
    """kplib's log at WARNING as plain output, third-party loggers at ERROR, the stand-in warning filtered."""
    log = logging.getLogger("kplib")
    if not any(isinstance(h, _Stdout) for h in log.handlers):
        log.addHandler(_Stdout())
        log.handlers[-1].setFormatter(logging.Formatter("kplib %(levelname)s: %(message)s"))
    log.setLevel(logging.WARNING)
    log.propagate = False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=StandInWarning)  # the banner says it once
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(sklearn|umap|transformers|huggingface_hub)")


@dataclass
class Chapter:
    """A chapter's encoder (``None`` for simulated chapters) and its label, the dataset shown, the figure folder."""

    label: str
    encoder: Encoder | None = None
    output_dir: Path | None = None
    dataset: str | None = None

    @property
    def is_pretrained(self) -> bool:
        """A real checkpoint produced the numbers (neither the stand-in nor the simulator)."""
        return self.encoder is not None and not self.encoder.identity.is_standin

    def save(self, fig: Any, name: str) -> Any:
        """Save ``fig`` as ``<output_dir>/<name>.png`` (if there is a folder); returns it, so a cell can end with it."""
        if self.output_dir is not None:
            fig.savefig(self.output_dir / f"{name}.png", dpi=110)
        return fig

    def show(self, fig: Any, name: str | None = None) -> None:
        """Save (when ``name`` is given) and display ``fig``: for loops and ``with`` blocks."""
        display(self.save(fig, name) if name else fig)

    def table(self, df: pd.DataFrame, caption: str | None = None, precision: int = 3):
        """``df`` with a caption naming the encoder once, instead of a column repeating it on every row."""
        return (df.style.set_caption(caption or f"Encoder: {self.label}").format(precision=precision)
                .set_table_styles([{"selector": "th, td", "props": "padding: 0.15em 0.6em"}], overwrite=False))

    @contextmanager
    def real_images(self, title: str = "Run on your images", note: str = REAL_IMAGES_NOTE):
        """A section on real images: shown as usual with a pretrained checkpoint; otherwise everything it prints or
        displays goes into one collapsed ``<details>`` whose summary says what a real checkpoint would show."""
        if self.is_pretrained:
            yield
            return
        try:
            with capture_output(stdout=True, stderr=True, display=True) as captured:
                yield
        finally:  # shown even when the block fails, with what it printed
            parts = [f"<pre>{html.escape(t)}</pre>" for t in (captured.stdout, captured.stderr) if t.strip()]
            for data in (out.data for out in captured.outputs):  # a PNG embedded, else the HTML, else the text
                png = data.get("image/png")
                png = base64.b64encode(png).decode() if isinstance(png, bytes) else png
                parts.append(f'<img src="data:image/png;base64,{png}" style="max-width:100%">' if png else
                             data.get("text/html") or f"<pre>{html.escape(data.get('text/plain', ''))}</pre>")
            display(HTML(f'<details class="kpl-real-images"><summary><b>{html.escape(title)}</b>: {note}</summary>'
                         + "".join(parts) + "</details>"))


def setup(model: str = "auto", output_dir: str | Path | None = None, dataset: str | None = None) -> Chapter:
    """Prepare a chapter: quiet logging, inline figures, the version line, the encoder and its banner.

    ``model``: ``"auto"`` (``$KPL_MODEL``, else the untrained stand-in), a checkpoint (hub id or folder), ``"standin"``
    or ``"simulated"`` (no encoder). ``output_dir`` (created; ``None``: figures not saved). The stand-in's warning and
    log line are kept off the page: the banner is its one announcement, and says why the stand-in was used."""
    quiet()
    if get_ipython() is not None:
        get_ipython().run_line_magic("matplotlib", "inline")
    print(f"python {platform.python_version()} | torch {torch.__version__} | transformers {version('transformers')} "
          f"| kplib {__version__}")
    log = logging.getLogger("kplib")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StandInWarning)
        log.disabled = True
        try:
            encoder = None if model == "simulated" else load_encoder(model)
        finally:
            log.disabled = False
    folder = None if output_dir is None else Path(output_dir)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    chapter = Chapter(SIMULATED_ENCODER if encoder is None else encoder.identity.label, encoder, folder, dataset)
    display(banner(chapter.label, dataset, " ".join(str(w.message) for w in caught
                                                    if issubclass(w.category, StandInWarning))))
    return chapter
