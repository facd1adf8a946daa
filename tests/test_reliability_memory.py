"""Reliability: encoding a large folder keeps peak memory bounded (streamed batches), measured in a subprocess.

``kplib.experiment.embed_dataset`` (what ``kpl encode`` runs) runs in a child process on generated folders of tiny
8×8 PNGs with the untrained stand-in (the cheapest encoder kplib offers: ViT-224/32, 4 layers, width 256;
``cache=False`` so the measurement is the encoding itself, not 50,000 cache files). The child reports its own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``).

Run time (measured): writing the 52,000 PNGs takes ~17 s; encoding 50,000 took 868 s on the shared 2-core machine
under heavy load (other jobs; ~4.8 ms per image when it was quieter, i.e. ~4-5 min on 2 idle cores). Set
``KPL_MEMTEST_N`` to a smaller number for a quicker check (the bound scales with it).

What "bounded" means here: the peak for N images may exceed the peak for a small folder only by what must grow
with N — the output (N × 256 float32 embeddings, held a few times while stacking) and the list of N paths —
never by the preprocessed pixels (N × 3 × 224 × 224 float32 = 600 kB per image: 30 GB for 50,000 images if the
batches were not streamed). Bounds (measured on the 2-core machine, see the constants) carry a stated margin.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
N_LARGE = int(os.environ.get("KPL_MEMTEST_N", "50000"))
N_SMALL = 2000
#: Measured (2-core shared machine, stand-in, batch 64, 2 decode threads): peak RSS 802 MB for 2,000 images and
#: 851 MB for 50,000 (+49 MB; the 50,000 × 256 float32 output alone is 51 MB). Before encoders released freed heap
#: memory after each batch, the peak grew ~100 kB per image (5,000 images: +314 MB over 1,000), i.e. ~5 GB here.
#: Allowed growth from N_SMALL to N_LARGE: the output held twice (2 × 256 × 4 bytes per image) + ~1 kB per image
#: for its path objects, plus a fixed 100 MB for allocator noise: 247 MB for 50,000 images (5× the measured 49).
PER_IMAGE_BYTES = 2 * 256 * 4 + 1024
FIXED_MARGIN_MB = 100
#: Absolute ceiling: measured 851 MB for 50,000 images; 1.5 GB leaves a ~1.8× margin (torch/transformers versions).
CEILING_MB = 1536


def write_folder(root: Path, n: int) -> Path:
    """``root/<c0|c1>/<i>.png``: n distinct random 8×8 RGB PNGs split over two classes (~1 ms per file)."""
    rng = np.random.default_rng(n)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
    pixels = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(pixels[i]).save(buf, "PNG", compress_level=1)
        (root / f"c{i % 2}" / f"{i:06d}.png").write_bytes(buf.getvalue())
    return root


CHILD = (
    "import resource, sys, warnings\n"
    "from kplib.encoders import load_encoder\n"
    "from kplib.experiment import embed_dataset\n"
    "warnings.simplefilter('ignore')\n"
    "enc = load_encoder('standin')\n"
    "emb = embed_dataset(sys.argv[1], enc, cache=False, batch_size=64, progress=False)\n"
    "print(f'{len(emb)} images, {len(emb.class_names)} classes, dim {emb.embeddings.shape[1]}')\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)


def peak_rss_mb(folder: Path, cache_dir: Path) -> tuple[float, float, str]:
    """Encode FOLDER (``embed_dataset``, stand-in, no cache, batches of 64) in a child; return (peak RSS MB, seconds, stdout)."""
    env = dict(os.environ, KPL_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="2", PYTHONHASHSEED="0",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=3600,
    )
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK_RSS_KB")]
    assert line, proc.stderr[-2000:]
    return int(line[-1].split()[1]) / 1024.0, seconds, proc.stdout


@pytest.mark.slow
def test_encoding_many_small_images_keeps_peak_rss_bounded(tmp_path):
    small = write_folder(tmp_path / "small", N_SMALL)
    t0 = time.monotonic()
    large = write_folder(tmp_path / "large", N_LARGE)
    gen_s = time.monotonic() - t0

    rss_small, s_small, out_small = peak_rss_mb(small, tmp_path / "cache")
    rss_large, s_large, out_large = peak_rss_mb(large, tmp_path / "cache")
    print(f"\nwrote {N_LARGE} PNGs in {gen_s:.0f}s; peak RSS {N_SMALL} images: {rss_small:.0f} MB "
          f"({s_small:.0f}s); {N_LARGE} images: {rss_large:.0f} MB ({s_large:.0f}s)")

    # every image was encoded (nothing silently dropped)
    assert f"{N_SMALL} images, 2 classes" in out_small
    assert f"{N_LARGE} images, 2 classes" in out_large

    allowed_growth_mb = (N_LARGE - N_SMALL) * PER_IMAGE_BYTES / 2**20 + FIXED_MARGIN_MB
    assert rss_large - rss_small <= allowed_growth_mb, (
        f"peak RSS grew by {rss_large - rss_small:.0f} MB from {N_SMALL} to {N_LARGE} images "
        f"(allowed {allowed_growth_mb:.0f} MB): encoding is not streamed")
    assert rss_large <= CEILING_MB, f"peak RSS {rss_large:.0f} MB for {N_LARGE} images exceeds {CEILING_MB} MB"
