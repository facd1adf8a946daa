"""Cached re-run: the data path of the book's heaviest notebook (05_benchmark), first run against cached re-run.

The notebook loads the encoder, embeds every registered medical dataset (``embed_dataset``) and its curated knowledge
base (``embed_knowledge``), then runs every method. This script does exactly that twice in one process, with a fresh
temporary ``KPL_CACHE_DIR``: the first run encodes and fills the cache, the second reads it. It prints both times and
their ratio (target: cached re-run ≤ 10 % of the first run) for the data path; ``--methods`` adds the methods, which
are not cached (they cost the same in both runs; their speed is bench_post_encoding.py's subject).

The default encoder is the untrained stand-in (small and fast, so this is the *least* favourable case for the
ratio: a real CLIP spends far more per image). ``--model`` takes any ``load_encoder`` argument instead, e.g. a
folder written by ``CLIPModel.save_pretrained``. Nothing here is an accuracy result.

Run: ``python benchmarks/bench_cached_rerun.py [--quick] [--limit-per-class N] [--model standin]``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings

import torch

MEDICAL = ["brain_tumor_mri", "malaria_cells", "chest_xray_pneumonia", "tb_cxr_nitrd_da", "eye_diseases_4class",
           "aptos2019_dr_gaussian"]


def data_path(model: str, datasets: list[str], limit: int | None, seed: int):
    """Encoder load + image embeddings + KB text embeddings for every dataset, as the notebook does."""
    from kplib.encoders import load_encoder
    from kplib.experiment import default_kb_for, embed_dataset, embed_knowledge

    encoder = load_encoder(model)
    out, encoded, n = {}, 0, 0
    for name in datasets:
        emb = embed_dataset(name, encoder, limit_per_class=limit, seed=seed, progress=False)
        text = embed_knowledge(default_kb_for(name), encoder, emb.class_names)
        out[name] = (emb, text)
        encoded += (emb.cache_stats or {}).get("n_encoded", len(emb))
        n += len(emb)
    return out, encoded, n, encoder.identity.label


def methods_time(data: dict, methods: list[str]) -> float:
    from kplib.methods import run_method

    t = time.perf_counter()
    for emb, text in data.values():
        for m in methods:
            run_method(m, emb.embeddings, text)
    return time.perf_counter() - t


def main(argv=None) -> int:
    from kplib.methods import METHODS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 images per class")
    ap.add_argument("--limit-per-class", type=int, default=None,
                    help="images per class (seeded subset); 0 = every image (default 40, quick 10)")
    ap.add_argument("--model", default="standin", help="load_encoder argument (default: the untrained stand-in)")
    ap.add_argument("--methods", default="", help=f"also time these methods (comma-separated, from "
                                                   f"{','.join(METHODS)}; 'all' = every one); default: none")
    ap.add_argument("--datasets", default=",".join(MEDICAL))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    limit = args.limit_per_class if args.limit_per_class is not None else (10 if args.quick else 40)
    limit = None if limit == 0 else limit
    methods = list(METHODS) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)} or 'all'")
    datasets = args.datasets.split(",")
    warnings.filterwarnings("ignore")   # the stand-in's StandInWarning: this script reports no accuracy
    logging.getLogger("kplib").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory(prefix="kpl-bench-cache-") as tmp:
        os.environ["KPL_CACHE_DIR"] = tmp
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; fresh KPL_CACHE_DIR={tmp}")
        rows = []
        for run in ("first (empty cache)", "re-run (cached)"):
            t = time.perf_counter()
            data, encoded, n, label = data_path(args.model, datasets, limit, args.seed)
            t_data = time.perf_counter() - t
            t_methods = methods_time(data, methods)
            rows.append((run, t_data, t_methods, encoded, n))
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
    print(f"encoder: {label}; {len(datasets)} datasets, {n} images "
          f"(limit per class: {limit or 'none'}), methods: {', '.join(methods) or 'none'}; cache size {size / 1e6:.1f} MB")
    print(f"  {'run':22s} {'data path s':>12s} {'methods s':>10s} {'total s':>9s} {'images encoded':>15s}")
    for run, td, tm, enc, n_img in rows:
        print(f"  {run:22s} {td:12.2f} {tm:10.2f} {td + tm:9.2f} {enc:>9d}/{n_img}")
    (_, d1, m1, _, _), (_, d2, m2, encoded2, _) = rows
    with_methods = f", with methods {(d2 + m2) / (d1 + m1):.3f}" if methods else ""
    print(f"cached re-run / first run: data path {d2 / d1:.3f}{with_methods} (target ≤ 0.10)")
    if encoded2:
        print(f"ERROR: the re-run encoded {encoded2} image(s) again instead of reading them from the cache")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
