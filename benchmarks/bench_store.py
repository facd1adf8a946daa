"""The embedding store against a plain ``numpy.load`` of the same matrix, in one process.

For N cached d-dimensional embeddings (random unit rows, random 32-byte keys) it prints:

- write: ``numpy.save`` of the N × d matrix, one ``put`` of all N rows (sorted and written as one shard), and N rows
  written as 20 ``put`` calls (what incremental runs do; the store merges small shards), with the files left;
- warm read: ``get`` of every key in a shuffled order by a fresh store object (files in the page cache), next to
  ``numpy.load`` of the same N × d float32 matrix from a ``.npy`` file, and their ratio (the bar: at most 2×);
- a small incremental read: ``get`` of 10 new keys among N cached (10 misses).

Each figure is the best of ``--repeats`` rounds; the two reads alternate so both see the same machine load.

Run: ``python benchmarks/bench_store.py [--quick] [--sizes 100000 1000000] [--dim 768]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kplib.io.store import EmbeddingStore  # noqa: E402
from bench_encoding import timed  # noqa: E402


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), np.float32)
    for i in range(0, n, 65536):
        block = rng.standard_normal((min(65536, n - i), d), dtype=np.float32)
        x[i:i + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def best(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls."""
    return min(timed(fn) for _ in range(repeats))


def measure(n: int, d: int, repeats: int, work: Path) -> dict:
    ns = {"kind": "bench", "model": "random", "embed_dim": d, "n": n}
    rows = unit_rows(n, d, seed=n)
    keys_arr = np.random.default_rng(n + 1).integers(0, 256, (n, 32), dtype=np.uint8)
    keys = [k.tobytes() for k in keys_arr]
    plain = work / f"plain-{n}.npy"
    r = {"n": n, "save": best(lambda: np.save(plain, rows), 1)}
    store = EmbeddingStore(ns, root=work / "one")
    r["write"] = best(lambda: store.put(keys, rows), 1)
    r["files"] = len(list(store.folder.iterdir()))
    many = EmbeddingStore(ns, root=work / "many")
    step = -(-n // 20)
    r["write_many"] = best(lambda: [many.put(keys[i:i + step], rows[i:i + step]) for i in range(0, n, step)], 1)
    r["files_many"] = len(list(many.folder.iterdir()))
    shutil.rmtree(work / "many")
    rows = None  # free the matrix before the reads
    os.sync()  # reads below find the files in the page cache, not competing with their write-back

    # fresh key objects in query order, as a caller hashing files in that order has them
    shuffled = [k.tobytes() for k in keys_arr[np.random.default_rng(2).permutation(n)]]
    r["load"], r["get"] = float("inf"), float("inf")
    for _ in range(repeats):  # alternate, so both see the same machine load
        r["load"] = min(r["load"], best(lambda: np.load(plain), 1))
        fresh = EmbeddingStore(ns, root=work / "one")
        t = time.perf_counter()
        found, got = fresh.get(shuffled)
        r["get"] = min(r["get"], time.perf_counter() - t)
        assert bool(found.all()) and got.shape == (n, d)
        del got, found
    new = [os.urandom(32) for _ in range(10)]
    fresh = EmbeddingStore(ns, root=work / "one")
    r["small"] = best(lambda: fresh.get(new), repeats)
    assert fresh.stats.misses == 10 * repeats
    shutil.rmtree(work / "one")
    plain.unlink()
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10,000 rows only")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary folder)")
    args = ap.parse_args(argv)
    sizes = [10_000] if args.quick else args.sizes
    print(f"embedding store vs numpy.load, d = {args.dim}, best of {args.repeats} (warm page cache)")
    print(f"{'N':>9} | {'np.save':>8} | {'1 put':>7} | {'20 puts':>7} | {'files':>9} | {'np.load':>8} | "
          f"{'store get':>9} | {'get / load':>10} | {'10 new keys':>11}")
    with tempfile.TemporaryDirectory(prefix="kpl-bench-store-", dir=args.dir) as tmp:
        for n in sizes:
            r = measure(n, args.dim, args.repeats, Path(tmp))
            print(f"{r['n']:>9,} | {r['save']:>7.2f}s | {r['write']:>6.2f}s | {r['write_many']:>6.2f}s | "
                  f"{r['files']:>3} / {r['files_many']:>3} | {r['load']:>7.3f}s | {r['get']:>8.3f}s | "
                  f"{r['get'] / r['load']:>9.2f}x | {r['small'] * 1e3:>9.1f}ms", flush=True)
    print("np.save / np.load: the same N x d float32 matrix as one plain .npy file. files: in the store's folder after "
          "one put / after 20 puts (a shard is a .keys.npy + .rows.npy pair; plus namespace.json). store get: every "
          "key, shuffled, by a fresh store object. 10 new keys: a lookup that misses.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
