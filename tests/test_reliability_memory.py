"""Reliability: encoding many images keeps peak memory bounded (streamed batches), measured in a subprocess.

A child process encodes N generated tiny 8×8 RGB images with the untrained stand-in (the cheapest encoder kplib offers:
ViT-224/32, 4 layers, width 256) through :meth:`kplib.io.encoders.Encoder.encode_images`, in batches of 64. The images
come from a generator, decoded one by one as the encoder consumes them (what ``kplib.pipeline.embed_images`` does with
the files it has to encode). The child reports its own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``).

The child runs one torch thread: under ``make test`` the other xdist worker keeps the second core busy, and two
threads sharing one free core wait on each other at every operation (the post-encoding bench's small workloads ran
about 9x slower that way on this machine). Set ``KPL_MEMTEST_N`` to a smaller number for a quicker check (the bound
scales with it).

What "bounded" means here: the peak for N images may exceed the peak for a small run only by what must grow with N —
the output (N × 256 float32 embeddings, held a few times while stacking) and ~1 kB of bookkeeping per image — never
by the preprocessed pixels (N × 3 × 224 × 224 float32 = 600 kB per image: 30 GB for 50,000 images if the batches
were not streamed), nor by the allocator's heap growing with the number of batches.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
N_LARGE = int(os.environ.get("KPL_MEMTEST_N", "50000"))
N_SMALL = 2000
#: Measured (2-core shared machine, stand-in, batch 64): peak RSS 663 MB for 2,000 images and 766 MB for 50,000
#: (+103 MB: the output buffer of 65,536 × 256 float32 rows is 64 MB, its trimmed copy 49 MB). Before the encoder wrote
#: each batch into an output allocated up front, the per-batch output tensors kept until the end fragmented glibc's heap
#: and the peak grew ~100-150 kB per image (2,000 → 10,000 images: +128 MB).
#: Allowed growth from N_SMALL to N_LARGE: the output held twice (2 × 256 × 4 bytes per image) + ~1 kB per image,
#: plus a fixed 100 MB for allocator noise: 247 MB for 50,000 images.
PER_IMAGE_BYTES = 2 * 256 * 4 + 1024
FIXED_MARGIN_MB = 100
#: Absolute ceiling: 1.5 GB, twice the measured 766 MB (a margin for torch/transformers versions).
CEILING_MB = 1536

CHILD = (
    "import resource, sys, warnings\n"
    "import numpy as np\n"
    "from PIL import Image\n"
    "from kplib.io.encoders import load_encoder\n"
    "warnings.simplefilter('ignore')\n"
    "n = int(sys.argv[1])\n"
    "enc = load_encoder('standin', batch_size=64)\n"
    "rng = np.random.default_rng(n)\n"
    "images = (Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n))\n"
    "emb = enc.encode_images(images)\n"
    "print(f'{emb.shape[0]} images, dim {emb.shape[1]}, unit rows {bool((emb.norm(dim=1) - 1).abs().max() < 1e-4)}')\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)


def peak_rss_mb(n: int, cache_dir: Path) -> tuple[float, float, str]:
    """Encode n generated images in a child; return (peak RSS MB, seconds, stdout)."""
    env = dict(os.environ, KPL_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1", PYTHONHASHSEED="0",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=3600)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK_RSS_KB")]
    assert line, proc.stderr[-2000:]
    return int(line[-1].split()[1]) / 1024.0, seconds, proc.stdout


@pytest.mark.slow
def test_encoding_many_small_images_keeps_peak_rss_bounded(tmp_path):
    rss_small, s_small, out_small = peak_rss_mb(N_SMALL, tmp_path / "cache")
    rss_large, s_large, out_large = peak_rss_mb(N_LARGE, tmp_path / "cache")
    print(f"\npeak RSS {N_SMALL} images: {rss_small:.0f} MB ({s_small:.0f}s); {N_LARGE} images: {rss_large:.0f} MB "
          f"({s_large:.0f}s)")

    # every image was encoded (nothing silently dropped), into unit rows
    assert f"{N_SMALL} images, dim 256, unit rows True" in out_small
    assert f"{N_LARGE} images, dim 256, unit rows True" in out_large

    allowed_growth_mb = (N_LARGE - N_SMALL) * PER_IMAGE_BYTES / 2**20 + FIXED_MARGIN_MB
    assert rss_large - rss_small <= allowed_growth_mb, (
        f"peak RSS grew by {rss_large - rss_small:.0f} MB from {N_SMALL} to {N_LARGE} images "
        f"(allowed {allowed_growth_mb:.0f} MB): encoding is not streamed")
    assert rss_large <= CEILING_MB, f"peak RSS {rss_large:.0f} MB for {N_LARGE} images exceeds {CEILING_MB} MB"
