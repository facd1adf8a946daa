"""kplib.scaling: the small in-notebook scaling measurement and the reader of `make bench`'s file."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kplib.errors import KPLInputError
from kplib.scaling import load_post_encoding_benchmark, measure_post_encoding, peak_rss_mb, scaling_exponents


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def table():
    # tiny worlds and few proxy steps: this checks the bookkeeping, not the speed
    return measure_post_encoding(ns=(40, 160), n_classes=3, dim=32, iters_proxy=50)


def test_measure_rows_and_columns(table):
    assert len(table) == 4
    assert set(table["mode"]) == {"reference", "corrected"}
    assert sorted(table["n"].unique()) == [40, 160]
    for col in ("seconds", "peak_rss_increase_mb", "input_mb", "ot_iterations", "proxy_iterations",
                "row_sum_mean", "accuracy_simulated", "encoder"):
        assert col in table, col
    assert (table["seconds"] > 0).all()
    assert table["encoder"].str.contains("SIMULATED").all()
    assert table["accuracy_simulated"].between(0, 1).all()
    # input size is exactly N * d * 4 bytes
    assert np.allclose(table["input_mb"], table["n"] * 32 * 4 / 2**20)


def test_measure_records_the_row_scale_of_each_mode(table):
    # the released transport returns rows summing to ~1/N; corrected mode returns probability rows
    ref = table[table["mode"] == "reference"]
    cor = table[table["mode"] == "corrected"]
    assert np.allclose(ref["row_sum_mean"] * ref["n"], 1.0, rtol=0.2)
    assert np.allclose(cor["row_sum_mean"], 1.0, atol=1e-3)
    # the reference mode runs exactly the configured number of proxy steps
    assert (ref["proxy_iterations"] == 50).all()
    assert peak_rss_mb() > 10     # this process holds torch: tens of MB at least


def test_measure_rejects_bad_input():
    with pytest.raises(KPLInputError, match="ns"):
        measure_post_encoding(ns=[])
    with pytest.raises(KPLInputError, match="ns"):
        measure_post_encoding(ns=[0, 10])
    with pytest.raises(KPLInputError, match="modes"):
        measure_post_encoding(ns=[10], modes=["fast"])
    with pytest.raises(KPLInputError, match="repeats"):
        measure_post_encoding(ns=[10], repeats=0)


def test_scaling_exponents_recovers_known_power():
    n = np.array([100, 200, 400, 800] * 2)
    df = pd.DataFrame({"n": n, "mode": ["a"] * 4 + ["b"] * 4,
                       "seconds": np.concatenate([1e-3 * n[:4], 1e-6 * n[4:] ** 2])})
    out = scaling_exponents(df).set_index("mode")
    assert out.loc["a", "exponent"] == pytest.approx(1.0, abs=1e-9)
    assert out.loc["b", "exponent"] == pytest.approx(2.0, abs=1e-9)
    shuffled = scaling_exponents(df.iloc[::-1]).set_index("mode")      # row order does not matter
    assert shuffled.loc["a", "seconds_at_min_n"] == pytest.approx(0.1) and shuffled.loc["a", "n_max"] == 800
    with pytest.raises(KPLInputError, match="two distinct"):
        scaling_exponents(df[df["n"] == 100])
    with pytest.raises(KPLInputError, match="no column"):
        scaling_exponents(df.drop(columns="seconds"))


def test_load_benchmark(tmp_path):
    assert load_post_encoding_benchmark(tmp_path / "absent.json") is None
    good = tmp_path / "bench.json"
    good.write_text(json.dumps([{"n": 662, "c": 2, "reference_s": 1.5, "corrected_s": 0.2, "baseline_s": 3.0}]))
    df = load_post_encoding_benchmark(good)
    assert list(df["n"]) == [662] and df["reference_s"].iloc[0] == 1.5
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(KPLInputError, match="make bench"):
        load_post_encoding_benchmark(bad)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps([{"n": 1}]))
    with pytest.raises(KPLInputError, match="lacks columns"):
        load_post_encoding_benchmark(foreign)


def test_compare_modes_shows_row_scale_hardening_and_pull():
    from kplib.methods import KPLConfig, run_method
    from kplib.scaling import compare_modes
    from kplib.simulate import make_world

    world = make_world(n_images=200, n_classes=3, dim=32, seed=0)
    res = {mode: run_method("kpl", world.image_embeddings, world.text,
                            config=getattr(KPLConfig, mode)(iters_proxy=100, no_transport_baseline=True))
           for mode in ("reference", "corrected")}
    df = compare_modes(res, world.image_embeddings, world.labels).set_index("run")
    ref, cor = df.loc["reference"], df.loc["corrected"]
    assert ref["mode"] == "reference" and cor["mode"] == "corrected"
    assert ref["row_sum_times_n"] == pytest.approx(1.0, rel=0.2) and cor["row_sum_mean"] == pytest.approx(1.0)
    assert ref["hardened_rows"] == 0 and ref["max_entry"] < ref["alpha"]     # 1/N rows: hardening never fires
    assert ref["pull_vs_probability_rows"] == pytest.approx(1 / 200, rel=0.2)
    assert cor["pull_vs_probability_rows"] == pytest.approx(1.0)
    assert 0 <= cor["no_transport_accuracy"] <= 1
    with pytest.raises(KPLInputError, match="proxy-learning"):
        compare_modes({"zs": run_method("zero_shot", world.image_embeddings, world.text)},
                      world.image_embeddings, world.labels)
    with pytest.raises(KPLInputError, match="one row per label"):
        compare_modes(res, world.image_embeddings[:10], world.labels)
