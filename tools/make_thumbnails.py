"""Thumbnails of the landing page's chapter cards (book/intro.md), drawn from the SIMULATOR with kplib.book.figures.

Every thumbnail is a real figure of the library on a simulated world with known ground truth (never the untrained
stand-in encoder): the same figure functions the chapters call, at a small size. Each PNG is fitted into a fixed
560 x 350 canvas (so the cards line up) and reduced to a 64-colour palette: a few tens of kB each.

Usage::

    .venv/bin/python tools/make_thumbnails.py [--out book/_static/thumbnails]

Re-run it when a figure function changes; the PNGs are committed (the book build does not run this script).
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from kplib.book import analysis, figures, widgets
from kplib.method.methods import run_method
from kplib.method.metrics import evaluate
from kplib.method.simulate import SIMULATED_ENCODER, preset, text_rows

SIZE = (560, 350)  # the card image canvas, in pixels
COLOURS = 64
SIM = {"n_images": 400, "dim": 128, "seed": 0}


def _png(fig, path: Path) -> int:
    """Render ``fig``, fit it into the canvas, quantise, write ``path``; returns its size in bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    image = Image.open(buf).convert("RGB")
    image.thumbnail(SIZE, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", SIZE, "white")
    canvas.paste(image, ((SIZE[0] - image.width) // 2, (SIZE[1] - image.height) // 2))
    canvas.quantize(colors=COLOURS).save(path, optimize=True)
    return path.stat().st_size


def _sweep_imbalance() -> pd.DataFrame:
    rows = []
    for imbalance in (1.0, 3.0, 10.0, 30.0):
        world = preset("imbalanced", imbalance=None if imbalance == 1.0 else imbalance, **SIM)
        for method in ("zero_shot", "kpl_reference", "kpl_corrected"):
            pred = run_method(method, world.image_embeddings, world.text).predictions
            ev = evaluate(world.labels, pred, world.class_names, n_bootstrap=0)
            rows.append({"imbalance": imbalance, "method": method, "balanced_accuracy": ev["balanced_accuracy"]})
    return pd.DataFrame(rows)


def thumbnails() -> dict[str, object]:
    """name -> matplotlib Figure, one per card."""
    enc = SIMULATED_ENCODER
    world = preset("balanced_collapse", **SIM)
    x, y, text, names = world.image_embeddings, world.labels, world.text, world.class_names
    ref = run_method("kpl_reference", x, text, record_every=100)
    cor = run_method("kpl_corrected", x, text)
    out = {}
    out["method"] = figures.plans({"P0": ref.pseudo_labels, "released routine": ref.transport.plan,
                                   "semi-dual (corrected)": cor.transport.plan}, y, names, encoder=enc)
    out["01_knowledge_base"] = figures.score_vs_discrimination(
        analysis.description_ranking(x, text, k=8, labels=y), encoder=enc)
    out["02_zero_shot_and_modality_gap"] = figures.gap_hist(analysis.gap_projection(x, text_rows(text)), encoder=enc)
    names_w = torch.nn.functional.normalize(text.name_embeddings.mean(1), dim=1)
    out["03_text_proxies"], projection = figures.embedding_map(
        x, y, names, {"class-name prompts": names_w, "text proxies": ref.text.proxies}, method="pca", encoder=enc)
    out["04_proxy_learning"] = figures.trajectory(projection, ref, x, y, encoder=enc)
    rows = [{"method": m, **evaluate(y, run_method(m, x, text).predictions, names, n_bootstrap=200)}
            for m in ("zero_shot", "descriptor_mean", "inmap", "kpl_reference", "kpl_corrected")]
    out["05_benchmark"] = figures.metrics_bar(pd.DataFrame(rows), encoder=enc)
    out["06_playground"] = widgets.knob_panel("k", methods=["kpl_reference", "kpl_corrected"], **SIM)[0]
    out["07_balancing_study"] = figures.sweep(_sweep_imbalance(), "imbalance", "balanced_accuracy", logx=True,
                                              encoder=enc)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "book" / "_static"
                        / "thumbnails")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for name, fig in thumbnails().items():
        print(f"{name}.png: {_png(fig, out / f'{name}.png') / 1024:.0f} kB")


if __name__ == "__main__":
    main()
