"""Reliability (issue 7): the same ``kpl run`` command twice gives byte-identical prediction files, metadata and
metrics — in separate processes (fresh interpreter, different ``PYTHONHASHSEED``), the first with a cold embedding
cache and the second reading everything from it, on a generated folder with the stand-in encoder.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _fixtures_images import CLASSES, messy_dataset, small_kb

REPO = Path(__file__).resolve().parents[1]


def run_kpl(args: list[str], cache: Path, hashseed: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KPL_CACHE_DIR=str(cache), PYTHONHASHSEED=hashseed, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", "import sys; from kplib.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics_block(stdout: str) -> str:
    """The printed metrics lines (accuracy, balanced accuracy, macro-F1 with their bootstrap intervals)."""
    return "\n".join(ln for ln in stdout.splitlines() if ln.startswith("  "))


@pytest.mark.slow
@pytest.mark.parametrize("method, mode, suffix", [("kpl", "reference", ".csv"), ("kpl", "corrected", ".json")])
def test_same_command_twice_gives_identical_files(tmp_path, method, mode, suffix):
    data = tmp_path / "data"
    messy_dataset(data, with_bad=True)          # includes undecodable files: skipped identically both times
    kb = small_kb(tmp_path / "kb.json", n_desc=5)
    cache = tmp_path / "cache"
    n_good = 19   # messy_dataset: 25 image-named files, 6 of them undecodable
    outs = []
    for i, hashseed in enumerate(("0", "4242")):
        out = tmp_path / f"run{i}" / f"preds{suffix}"
        out.parent.mkdir()
        proc = run_kpl(["run", str(data), "--model", "standin", "--method", method, "--mode", mode, "--kb", str(kb),
                        "--on-error", "skip", "--k", "3", "--iters-proxy", "50", "--n-bootstrap", "200",
                        "--predictions", str(out), "--no-progress"], cache, hashseed)
        outs.append((out, proc))
    (a, pa), (b, pb) = outs
    assert f"embeddings: 0 from the store, {n_good} encoded" in pa.stdout        # cold cache ...
    assert f"embeddings: {n_good} from the store, 0 encoded" in pb.stdout        # ... then every readable image cached
    assert a.read_bytes() == b.read_bytes()
    meta_a, meta_b = (p.with_name(p.stem + ".meta.json") for p in (a, b))
    assert meta_a.read_bytes() == meta_b.read_bytes()
    assert metrics_block(pa.stdout) == metrics_block(pb.stdout)
    assert "accuracy" in metrics_block(pa.stdout) and re.search(r"interval \d+\.\d+.\d+\.\d+\)",
                                                                  metrics_block(pa.stdout))
    # the files are real: every readable image has a prediction, the stand-in is named
    meta = json.loads(meta_a.read_text(encoding="utf-8"))
    assert meta["encoder"]["is_standin"] is True and len(meta["dataset"]["skipped"]) == 6
    assert meta["config"]["mode"] == mode and meta["method"] == method
    text = a.read_text(encoding="utf-8")
    n_rows = len(json.loads(text)["predictions"]) if suffix == ".json" else len(text.splitlines()) - 1
    assert n_rows == meta["dataset"]["n_images"] == sum(meta["dataset"]["counts"].values()) == n_good
    assert set(meta["dataset"]["counts"]) == set(CLASSES)


def test_in_process_methods_are_deterministic():
    """Every method twice on the same inputs: identical tensors (no hidden global RNG state)."""
    import torch

    from kplib.method.methods import METHODS, KPLConfig, run_method
    from kplib.method.simulate import make_world

    w = make_world(n_images=40, n_classes=3, dim=32, n_descriptions=8, seed=3)
    for method, spec in METHODS.items():
        cfg = None
        if spec.config is KPLConfig and spec.modes:
            make = KPLConfig.corrected if spec.fixed_mode == "corrected" else KPLConfig.reference
            cfg = make(iters_proxy=20, k=4, no_transport_baseline=True)
        torch.manual_seed(1)
        r1 = run_method(method, w.image_embeddings, w.text, config=cfg)
        torch.manual_seed(2)   # a different global seed must not matter
        r2 = run_method(method, w.image_embeddings, w.text, config=cfg)
        assert torch.equal(r1.predictions, r2.predictions), method
        assert torch.equal(r1.logits, r2.logits), method
        if r1.transport is not None:
            assert torch.equal(r1.transport.plan, r2.transport.plan), method
            assert torch.equal(r1.proxies, r2.proxies), method
            assert torch.equal(r1.no_transport_predictions, r2.no_transport_predictions), method
