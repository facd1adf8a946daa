"""The benchmark scripts still run against the library (speed itself is measured by ``make bench``, never here)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_encoding as be  # noqa: E402
import bench_store as bs  # noqa: E402

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
        "patch_size": 32, "image_size": 224, "projection_dim": 32}


def test_encoding_bench_times_every_step_of_a_tiny_tower(capsys):
    r = be.measure(TINY, batch=2, repeats=1)
    for dtype in ("fp32", "bf16"):
        assert all(math.isfinite(r[dtype][k]) and r[dtype][k] > 0 for k in ("gemm", "forward", "preprocess", "encode"))
    assert r["cosine"] > 0.99  # bf16 autocast embeddings against fp32 ones
    be.report("tiny", TINY, 2, 1, r)
    printed = capsys.readouterr().out
    assert "fraction of GEMM bound" in printed and "bf16 autocast over fp32" in printed


def test_store_bench_quick_run(capsys, tmp_path):
    assert bs.main(["--quick", "--repeats", "1", "--dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "get / load" in printed and "10,000" in printed
