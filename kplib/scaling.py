"""How the post-encoding stages of KPL (transport + proxy learning) scale with the number of images N.

Two sources, never mixed up:

* :func:`load_post_encoding_benchmark` reads ``artifacts/bench_post_encoding.json``, written by ``make bench``
  (``benchmarks/bench_post_encoding.py``: one process per cell, up to N = 1,000,000, against a plain transcription of
  the released code);
* :func:`measure_post_encoding` is a **small in-process measurement** the book can afford at build time: reference
  vs corrected mode on simulator embeddings (``kplib.simulate.make_world``) for a few N, timing each call of
  ``run_method("kpl", ...)`` (encoding excluded) and sampling the process's resident memory while it runs.

:func:`compare_modes` puts KPL results side by side (accuracy, iterations, time, the row scale of the transported
pseudo-labels, how many rows hardening fired on, and how strong the pull term ``Yᵀ X`` of proxy learning is).

Simulated embeddings only exercise speed and memory; the accuracy column they carry is a sanity check of the run,
not a result. :func:`scaling_exponents` fits ``time ∝ N^b`` per mode so a reader can say what the table shows.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from . import config
from .errors import KPLInputError

__all__ = [
    "BENCHMARK_FILE",
    "default_benchmark_file",
    "load_post_encoding_benchmark",
    "measure_post_encoding",
    "scaling_exponents",
    "peak_rss_mb",
    "compare_modes",
]

#: Where ``make bench`` leaves its raw numbers (relative to the repository root).
BENCHMARK_FILE = Path("artifacts") / "bench_post_encoding.json"
_MODES = ("reference", "corrected")
_BENCH_COLUMNS = ("n", "c", "reference_s", "corrected_s")


def default_benchmark_file() -> Path:
    """``<repo>/artifacts/bench_post_encoding.json`` (the file ``make bench`` writes)."""
    return config.REPO_ROOT / BENCHMARK_FILE


def load_post_encoding_benchmark(path: str | os.PathLike | None = None) -> pd.DataFrame | None:
    """The rows of ``bench_post_encoding.json`` as a DataFrame, or ``None`` when the file does not exist.

    A file that exists but is not a list of benchmark rows raises :class:`~kplib.errors.KPLInputError` (a stale or
    foreign file must not be shown as a measurement).
    """
    file = Path(path) if path is not None else default_benchmark_file()
    if not file.is_file():
        return None
    try:
        rows = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise KPLInputError(f"cannot read the benchmark file {file}: {exc}; re-run `make bench` or delete it") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise KPLInputError(f"{file} must hold a non-empty JSON list of benchmark rows (written by `make bench`)")
    df = pd.DataFrame(rows)
    missing = [c for c in _BENCH_COLUMNS if c not in df]
    if missing:
        raise KPLInputError(f"{file} lacks columns {missing}; it was not written by benchmarks/bench_post_encoding.py "
                            "— re-run `make bench`")
    return df


# ------------------------------------------------------------------------------------------------ memory sampling
def _rss_bytes() -> int | None:
    """Current resident set size of this process (Linux ``/proc``); ``None`` where unavailable."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class _RssSampler:
    """Samples the resident memory every ``interval`` seconds in a thread; ``peak_increase`` is the largest
    excess over the value at entry (bytes), or ``None`` where the platform gives no current RSS."""

    def __init__(self, interval: float):
        self.interval = interval
        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = _rss_bytes()
            if now is not None and self.peak is not None:
                self.peak = max(self.peak, now)
            self._stop.wait(self.interval)

    def __enter__(self) -> "_RssSampler":
        if self.start is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.start is not None:
            self._stop.set()
            self._thread.join()
            now = _rss_bytes()
            if now is not None:
                self.peak = max(self.peak, now)

    @property
    def peak_increase(self) -> int | None:
        return None if self.start is None else max(0, self.peak - self.start)


# ----------------------------------------------------------------------------------------------- measurement
def _check_ns(ns: Sequence[int]) -> list[int]:
    if isinstance(ns, (str, bytes)) or not isinstance(ns, Sequence) or len(ns) == 0:
        raise KPLInputError(f"ns must be a non-empty sequence of image counts, got {ns!r}")
    out = []
    for n in ns:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise KPLInputError(f"ns must hold positive integers (numbers of images), got {n!r}")
        out.append(int(n))
    return out


def measure_post_encoding(
    ns: Sequence[int] = (250, 500, 1000, 2000),
    modes: Sequence[str] = _MODES,
    n_classes: int = 4,
    dim: int = 256,
    repeats: int = 1,
    seed: int = 0,
    sample_interval: float = 0.002,
    warmup: bool = True,
    **config_overrides,
) -> pd.DataFrame:
    """Time and memory of KPL's post-encoding stages (``run_method("kpl", ...)``) per mode and N, on simulator worlds.

    For every N one world is built (``make_world(n_images=N, n_classes, dim, seed)``, not timed); each mode runs
    ``repeats`` times and the fastest run is kept (the usual way to time on a shared machine). Columns: ``n``,
    ``n_classes``, ``dim``, ``mode``, ``seconds`` (wall time of the call), the per-stage ``timings`` of the
    result prefixed ``t_``, ``ot_iterations``, ``proxy_iterations``, ``peak_rss_increase_mb`` (largest resident
    memory above the value before the call, sampled every ``sample_interval`` s — approximate, NaN where the
    platform has no ``/proc``), ``input_mb`` (size of the (N, d) float32 embeddings, for scale), ``row_sum_mean``
    (mean row sum of the transported pseudo-labels: 1/N in reference mode, 1 in corrected mode),
    ``accuracy_simulated`` (a sanity check, not a result) and ``encoder`` (the simulator's label).
    ``warmup`` first runs each mode once, untimed, on the smallest world: the first call in a process pays for
    lazy imports (POT, SciPy) and allocator growth, which is not a cost of N.
    ``config_overrides`` go to both modes' :class:`~kplib.methods.KPLConfig` (e.g. ``iters_proxy=500``).
    """
    from .methods import KPLConfig, run_method
    from .simulate import make_world

    ns = _check_ns(ns)
    modes = list(modes)
    bad = [m for m in modes if m not in _MODES]
    if not modes or bad:
        raise KPLInputError(f"modes must be a non-empty subset of {list(_MODES)}, got {modes!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise KPLInputError(f"repeats must be a positive integer, got {repeats!r}")
    if not (isinstance(sample_interval, (int, float)) and 0 < sample_interval <= 1):
        raise KPLInputError(f"sample_interval must be in (0, 1] seconds, got {sample_interval!r}")
    rows = []
    if warmup:
        small = make_world(n_images=max(min(ns), n_classes), n_classes=n_classes, dim=dim, seed=seed)
        for mode in modes:
            run_method("kpl", small.image_embeddings, small.text,
                       config=getattr(KPLConfig, mode)(seed=seed, **config_overrides))
    for n in ns:
        world = make_world(n_images=n, n_classes=n_classes, dim=dim, seed=seed)
        x = world.image_embeddings
        for mode in modes:
            cfg = getattr(KPLConfig, mode)(seed=seed, **config_overrides)
            best = None
            for _ in range(repeats):
                with _RssSampler(sample_interval) as mem:
                    t0 = time.perf_counter()
                    res = run_method("kpl", x, world.text, config=cfg)
                    seconds = time.perf_counter() - t0
                if best is None or seconds < best[0]:
                    best = (seconds, res, mem.peak_increase)
            seconds, res, peak = best
            plan = res.pseudo_labels_transported
            row = {
                "n": n, "n_classes": n_classes, "dim": dim, "mode": mode, "seconds": seconds,
                **{f"t_{k}": float(v) for k, v in (res.timings or {}).items()},
                "ot_iterations": res.transport.iterations if res.transport is not None else None,
                "proxy_iterations": res.proxy_learning.iterations if res.proxy_learning is not None else None,
                "peak_rss_increase_mb": float("nan") if peak is None else peak / 2**20,
                "input_mb": x.numel() * x.element_size() / 2**20,
                "row_sum_mean": float(plan.sum(1).mean()) if plan is not None else float("nan"),
                "accuracy_simulated": float((res.predictions == world.labels).float().mean()),
                "encoder": world.text.meta.get("encoder", "SIMULATED"),
            }
            rows.append(row)
    return pd.DataFrame(rows)


def scaling_exponents(df: pd.DataFrame, time_column: str = "seconds", by: str = "mode",
                      n_column: str = "n") -> pd.DataFrame:
    """Least-squares slope ``b`` of ``log(time) = a + b log(N)`` per group (b ≈ 1: linear in N).

    Works on :func:`measure_post_encoding`'s table (``by="mode"``) and, after reshaping, on the benchmark file.
    Needs at least two distinct N per group.
    """
    for col in (time_column, by, n_column):
        if col not in df:
            raise KPLInputError(f"df has no column {col!r}; columns are {list(df.columns)}")
    rows = []
    for key, sub in df.groupby(by, sort=False):
        sub = sub[(sub[time_column] > 0) & (sub[n_column] > 0)].sort_values(n_column)
        if sub[n_column].nunique() < 2:
            raise KPLInputError(f"group {key!r} has fewer than two distinct {n_column} values with positive "
                                f"{time_column}; cannot fit a scaling exponent")
        b, a = np.polyfit(np.log(sub[n_column].to_numpy(float)), np.log(sub[time_column].to_numpy(float)), 1)
        rows.append({by: key, "exponent": float(b), "seconds_at_min_n": float(sub[time_column].iloc[0]),
                     "seconds_at_max_n": float(sub[time_column].iloc[-1]),
                     "n_min": int(sub[n_column].min()), "n_max": int(sub[n_column].max())})
    return pd.DataFrame(rows)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB) — ``getrusage``; for the notebook's environment line."""
    import resource   # POSIX only; imported here so the module itself imports everywhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)



def compare_modes(results: Mapping[str, Any], image_embeddings: Any, labels: Any) -> pd.DataFrame:
    """One row per KPL/InMaP result (``{name: MethodResult}``): what reference and corrected mode actually did.

    Columns: ``run``, ``mode``, ``transport`` (solver), ``n``, ``accuracy``, ``balanced_accuracy``,
    ``text_proxy_accuracy``, ``no_transport_accuracy`` (NaN unless run with ``no_transport_baseline=True``),
    ``ot_iterations``, ``ot_converged``, ``proxy_iterations``, ``proxy_converged``, ``seconds_total``,
    ``seconds_transport``, ``seconds_proxy_learning``, ``row_sum_mean`` (mean row sum of the transported
    pseudo-labels *as returned*: ≈ 1/N for the released routine), ``row_sum_times_n``, ``max_entry`` (largest
    transported entry, the quantity hardening compares with alpha), ``alpha``, ``hardened_rows``,
    ``hardened_fraction``, ``pull_norm`` (``||Yᵀ X||_F``, the fixed pull term of proxy learning, with the Y actually
    used) and ``pull_vs_probability_rows`` (``pull_norm`` divided by the same norm with Y's rows rescaled to sum
    to 1: ≈ 1/N in reference mode — the pull is N times too weak —, 1 in corrected mode).
    """
    import torch
    from sklearn.metrics import balanced_accuracy_score

    if not isinstance(results, Mapping) or not results:
        raise KPLInputError("results must be a non-empty mapping {name: MethodResult}")
    x = torch.as_tensor(image_embeddings)
    y = torch.as_tensor(labels).long().flatten()
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise KPLInputError(f"image_embeddings must be (N, d) with one row per label; got shape {tuple(x.shape)} "
                            f"for {y.shape[0]} labels")
    rows = []
    for name, res in results.items():
        if getattr(res, "proxy_learning", None) is None or getattr(res, "pseudo_labels_final", None) is None:
            raise KPLInputError(f"results[{name!r}] has no proxy-learning stage; pass kpl/inmap results only")
        if res.predictions.shape[0] != y.shape[0]:
            raise KPLInputError(f"results[{name!r}] has {res.predictions.shape[0]} predictions but labels has "
                                f"{y.shape[0]} entries")
        n = y.shape[0]
        plan = res.pseudo_labels_transported
        target = res.pseudo_labels_final.to(x.dtype)
        pull = float((target.T @ x).norm())
        unit = target / target.sum(1, keepdim=True)
        pull_unit = float((unit.T @ x).norm())
        rows.append({
            "run": name,
            "mode": res.config.get("mode"),
            "transport": res.config.get("transport"),
            "n": n,
            "accuracy": float((res.predictions == y).float().mean()),
            "balanced_accuracy": float(balanced_accuracy_score(y.numpy(), res.predictions.numpy())),
            "text_proxy_accuracy": (float((res.text_predictions == y).float().mean())
                                    if res.text_predictions is not None else float("nan")),
            "no_transport_accuracy": (float((res.no_transport_predictions == y).float().mean())
                                      if res.no_transport_predictions is not None else float("nan")),
            "ot_iterations": res.transport.iterations if res.transport is not None else 0,
            "ot_converged": res.transport.converged if res.transport is not None else None,
            "proxy_iterations": res.proxy_learning.iterations,
            "proxy_converged": res.proxy_learning.converged,
            "seconds_total": float(res.timings.get("total", float("nan"))),
            "seconds_transport": float(res.timings.get("transport", float("nan"))),
            "seconds_proxy_learning": float(res.timings.get("proxy_learning", float("nan"))),
            "row_sum_mean": float(plan.sum(1).mean()),
            "row_sum_times_n": float(plan.sum(1).mean()) * n,
            "max_entry": float(plan.max()),
            "alpha": float(res.config.get("alpha", float("nan"))),
            "hardened_rows": int(res.hardened.sum()),
            "hardened_fraction": float(res.hardened.float().mean()),
            "pull_norm": pull,
            "pull_vs_probability_rows": pull / pull_unit if pull_unit > 0 else float("nan"),
        })
    return pd.DataFrame(rows)
