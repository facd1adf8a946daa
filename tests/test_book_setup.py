"""kplib.book.setup: one banner per chapter, nothing else repeating the stand-in, and real-image sections collapsed
under the stand-in (their figures embedded as PNG) while a pretrained checkpoint shows them as usual."""
from __future__ import annotations

import base64
import logging
import re
import warnings
from types import SimpleNamespace

import matplotlib
import pandas as pd
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.display import display
from IPython.utils.capture import capture_output
from matplotlib.figure import Figure

from kplib.book import figures
from kplib.book.setup import Chapter, banner, setup
from kplib.errors import StandInWarning
from kplib.io.encoders import EncoderIdentity
from kplib.method.simulate import SIMULATED_ENCODER

STANDIN = EncoderIdentity("standin", "standin-v1", True).label
REAL = "openai/clip-vit-base-patch16"


@pytest.fixture(scope="module")
def kernel_shell():
    """The process's IPython shell, as in a kernel (``%matplotlib inline`` enables its formats once per process; a
    kernel-less shell needs no GUI loop for it); the matplotlib backend and rcParams it changes are restored."""
    backend, existed = matplotlib.get_backend(), InteractiveShell.initialized()
    shell = InteractiveShell.instance()
    shell.enable_gui = lambda gui=None: None
    with matplotlib.rc_context():
        yield shell
    if not existed:
        InteractiveShell.clear_instance()
    matplotlib.use(backend)


@pytest.fixture
def shell(kernel_shell):
    """setup() changes kplib's logging and the warning filters on purpose: restored after each test."""
    log = logging.getLogger("kplib")
    saved = (log.handlers[:], log.level, log.propagate, warnings.filters[:])
    yield kernel_shell
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]
    warnings.filters[:] = saved[3]


def _figure() -> Figure:
    fig = Figure(figsize=(3, 2))
    fig.subplots().plot([0, 1], [1, 0])
    return fig


def _html(outputs) -> list[str]:
    return [o.data.get("text/html", "") for o in outputs]


def test_banner_is_loud_for_the_standin_only():
    standin = banner(STANDIN, dataset="brain_tumor_mri").data
    assert "UNTRAINED" in standin and figures.CAPTION_COLOR in standin and "brain_tumor_mri" in standin
    assert "kpl-encoder-banner" in standin and "admonition danger" in standin
    real = banner(REAL).data
    assert REAL in real and figures.CAPTION_COLOR not in real and "danger" not in real
    assert "SIMULATED" in banner(SIMULATED_ENCODER).data


def test_setup_announces_the_standin_once(shell, tmp_path):
    with warnings.catch_warnings(record=True) as caught, capture_output(display=True) as cap:
        warnings.simplefilter("always")
        chapter = setup("standin", tmp_path / "out", dataset="toy")
    assert chapter.encoder.identity.is_standin and not chapter.is_pretrained and chapter.label == STANDIN
    banners = [h for h in _html(cap.outputs) if "kpl-encoder-banner" in h]
    assert len(cap.outputs) == 1 and len(banners) == 1 and "UNTRAINED" in banners[0] and "toy" in banners[0]
    assert "selected explicitly" in banners[0]  # the banner says why the stand-in runs
    said = cap.stdout + cap.stderr
    assert not re.search(r"UNTRAINED|STAND-IN|meaningless", said, re.I), said  # no log line, no warning text
    assert not [w for w in caught if issubclass(w.category, StandInWarning)]
    assert re.match(r"python \S+ \| torch \S+ \| transformers \S+ \| kplib \S+", said.strip())
    assert (tmp_path / "out").is_dir()
    with capture_output() as later:  # kplib's own warnings still reach the page, as plain output, once
        setup("simulated")
        logging.getLogger("kplib").warning("a real problem")
    assert later.stdout.count("kplib WARNING: a real problem") == 1
    with warnings.catch_warnings(record=True) as again:  # the banner said it: the warning stays filtered
        warnings.warn("stand-in again", StandInWarning)
    assert not again


def test_setup_simulated_loads_no_encoder(shell, tmp_path):
    with capture_output(display=True) as cap:
        chapter = setup("simulated", tmp_path / "sim")
    assert chapter.encoder is None and chapter.label == SIMULATED_ENCODER and not chapter.is_pretrained
    assert "SIMULATED" in _html(cap.outputs)[0] and (tmp_path / "sim").is_dir()
    fig = chapter.save(figures.confusion([[1, 0], [0, 1]], ["a", "b"], encoder=chapter), "cm")
    assert isinstance(fig, Figure) and (tmp_path / "sim" / "cm.png").stat().st_size > 1000
    assert "SIMULATED" in fig.get_suptitle() and fig.get_supxlabel() == figures.SIMULATED_CAPTION
    assert Chapter(REAL).save(fig, "not saved") is fig  # no output folder: nothing written
    styled = chapter.table(pd.DataFrame({"accuracy": [0.51234]}))
    assert f"Encoder: {SIMULATED_ENCODER}" in styled.to_html() and "0.512" in styled.to_html()


def test_real_images_collapse_under_the_standin(shell, tmp_path):
    setup("simulated")  # inline figures, as in a chapter
    chapter = Chapter(STANDIN, SimpleNamespace(identity=EncoderIdentity("standin", None, True)), tmp_path)
    with capture_output(display=True) as cap:
        with chapter.real_images():
            print("embedded 8 images")
            chapter.show(_figure(), "real")
            display(pd.DataFrame({"accuracy": [0.5]}))
    assert cap.stdout == "" and len(cap.outputs) == 1  # everything went into one block
    block = _html(cap.outputs)[0]
    assert block.startswith('<details class="kpl-real-images">') and "<details open" not in block
    assert "Run on your images" in block and "KPL_MODEL" in block and "embedded 8 images" in block
    assert "<table" in block and (tmp_path / "real.png").is_file()
    png = re.search(r'src="data:image/png;base64,([^"]+)"', block).group(1)
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    with capture_output(display=True) as failed, pytest.raises(RuntimeError, match="boom"):
        with chapter.real_images(title="Try it"):
            print("before the error")
            raise RuntimeError("boom")
    assert "before the error" in _html(failed.outputs)[0] and "Try it" in _html(failed.outputs)[0]


def test_real_images_pass_through_with_a_checkpoint(shell):
    setup("simulated")
    chapter = Chapter(REAL, SimpleNamespace(identity=EncoderIdentity(REAL, "abc", False)))
    assert chapter.is_pretrained
    with capture_output(display=True) as cap:
        with chapter.real_images():
            print("embedded 8 images")
            chapter.show(_figure())
    assert cap.stdout == "embedded 8 images\n" and len(cap.outputs) == 1
    assert "image/png" in cap.outputs[0].data and "<details" not in _html(cap.outputs)[0]
