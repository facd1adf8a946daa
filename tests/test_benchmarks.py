"""The benchmark scripts still run against the library (speed itself is measured by ``make bench``, never here)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_encoding as be  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, patch_size=32,
            image_size=224, projection_dim=32)


def test_encoding_bench_times_every_variant_of_a_tiny_tower(capsys):
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    variants = ["fp32 (sdpa, inference_mode)", be.KPLIB_PATH, "bf16 autocast", be.KPLIB_BF16]
    out = be.measure_tower("tiny", TINY, pixels, batch=2, repeats=1, variants=variants, compile_=False)
    printed = capsys.readouterr().out
    assert set(out["timings"]) == set(variants)
    assert all(math.isfinite(t.wall) and t.wall > 0 for t in out["timings"].values())
    for name in variants[1:]:                       # every variant is checked against plain fp32
        assert name in printed
    assert printed.count("cosine to fp32") == len(variants) - 1
    assert out["flops"] == be.vit_flops(TINY)["total"]
