"""Cached re-run: the book's heaviest notebook (05_benchmark) executed twice by papermill, first run vs re-run.

Both runs execute the real notebook exactly as ``make book`` and the test suite do (papermill, a fresh
``python3`` kernel each time) with a fresh temporary ``KPL_CACHE_DIR``: the first run encodes every image and
prompt and computes every method; the re-run finds the embeddings in the store and recomputes the methods (there is
no method-result cache: this measurement says whether a chapter would need one). The script prints both wall times,
their ratio, the same ratio for the cells alone (without kernel start), and where the re-run's time goes, cell by
cell.

Encoders (``--model``):

* ``standin`` (default): the UNTRAINED stand-in, a deliberately tiny CLIP (ViT-224/32, width 256, 4+4 layers). Its
  encoding is so cheap that this is the *least* favourable case for the ratio: fixed costs (kernel start, imports,
  figures) dominate the re-run.
* ``random-vit-b16``: the real ViT-B/16 CLIP architecture with random weights, written with ``save_pretrained``
  into a temporary folder and loaded through the same ``from_pretrained`` path as a user's checkpoint. Encoding
  time does not depend on the weights' values, so this measures what a re-run saves with a real-size model; the
  notebook's accuracy numbers in this run are meaningless (random weights) and are thrown away with the folder.
* any other ``load_encoder`` argument (hub id or folder).

Nothing here is an accuracy result: the executed notebooks live in a temporary folder and are deleted.

Run: ``python benchmarks/bench_cached_rerun.py [--quick] [--model standin|random-vit-b16|PATH]
[--limit-per-class N]``. The default (``make bench``) measures the stand-in on the notebook's defaults (every image)
and then ``random-vit-b16`` on 20 images per class (a full run of that would encode ~5,800 images, ~12 min here);
``--quick`` = the stand-in on 10 images per class.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NOTEBOOK = REPO / "notebooks" / "05_benchmark.ipynb"
RANDOM_VIT_B16 = "random-vit-b16"


def write_random_vit_b16(folder: Path) -> Path:
    """A random-weight CLIP with ViT-B/16's image tower, saved like a user's checkpoint (weights, tokenizer, image
    processor) and loaded through the same ``from_pretrained`` path. The folder name says it is not pretrained."""
    sys.path.insert(0, str(HERE))
    from bench_encoding import VIT_B16, build_encoder

    path = folder / "random-vit-b16-NOT-PRETRAINED"
    enc = build_encoder(VIT_B16, "float32")
    for part in (enc.model, enc.tokenizer, enc.processor):
        part.save_pretrained(path)
    return path


def cell_label(cell: dict) -> str:
    """A short name for a code cell: its first comment or first line."""
    lines = [ln.strip() for ln in "".join(cell["source"]).splitlines() if ln.strip()]
    tags = cell.get("metadata", {}).get("tags", [])
    if "parameters" in tags:
        return "parameters"
    first = next((ln for ln in lines if not ln.startswith("%")), "")
    return (first[:60] + "…") if len(first) > 61 else first


def execute(notebook: Path, out: Path, parameters: dict, cwd: Path) -> tuple[float, list[tuple[str, float]]]:
    """Run the notebook with papermill in a fresh kernel; wall seconds and (label, seconds) per code cell."""
    import papermill as pm

    t0 = time.perf_counter()
    pm.execute_notebook(str(notebook), str(out), parameters=parameters, kernel_name="python3", cwd=str(cwd),
                        progress_bar=False, log_output=False)
    wall = time.perf_counter() - t0
    nb = json.loads(out.read_text())
    cells = [(cell_label(c), float(c["metadata"].get("papermill", {}).get("duration") or 0.0))
             for c in nb["cells"] if c["cell_type"] == "code"]
    return wall, cells


def measure(model_arg: str, limit: int | None, notebook: Path) -> dict:
    """First run and cached re-run of ``notebook`` with a fresh cache; prints the table and returns the figures."""
    with tempfile.TemporaryDirectory(prefix="kpl-bench-rerun-") as tmp:
        tmp = Path(tmp)
        model = str(write_random_vit_b16(tmp)) if model_arg == RANDOM_VIT_B16 else model_arg
        os.environ["KPL_CACHE_DIR"] = str(tmp / "cache")  # the kernels inherit it: a fresh, empty cache
        print(f"\n== notebook {notebook.name}, model {model_arg}, images per class: {limit or 'all'}, load average "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; fresh KPL_CACHE_DIR", flush=True)
        runs = []
        for i, name in enumerate(("first run (empty cache)", "re-run (cache warm)")):
            params = {"MODEL": model, "LIMIT_PER_CLASS": limit, "OUTPUT_DIR": str(tmp / f"out{i}")}
            wall, cells = execute(notebook, tmp / f"run{i}.ipynb", params, tmp)
            runs.append((name, wall, cells))
        cache_mb = sum(f.stat().st_size for f in (tmp / "cache").rglob("*") if f.is_file()) / 1e6

    (_, w1, c1), (_, w2, c2) = runs
    s1, s2 = sum(d for _, d in c1), sum(d for _, d in c2)
    print(f"  {'run':26s} {'wall s':>8s} {'cells s':>8s} {'kernel+papermill s':>19s}")
    for name, wall, cells in runs:
        cs = sum(d for _, d in cells)
        print(f"  {name:26s} {wall:8.1f} {cs:8.1f} {wall - cs:19.1f}")
    print(f"  cache size {cache_mb:.1f} MB")
    print(f"  cached re-run / first run: wall {w2 / w1:.3f}, cells only {s2 / s1:.3f}")
    print("  where the re-run's time goes (cells >= 0.1 s; first-run seconds beside them):")
    for (label, d1), (_, d2) in sorted(zip(c1, c2), key=lambda p: -p[1][1]):
        if d2 >= 0.1:
            print(f"    {d2:6.2f} s  (first {d1:6.2f} s)  {label}")
    print(f"    {w2 - s2:6.2f} s  (first {w1 - s1:6.2f} s)  kernel start + papermill", flush=True)
    return {"model": model_arg, "limit": limit, "first_s": w1, "rerun_s": w2, "ratio": w2 / w1,
            "cells_ratio": s2 / s1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the stand-in, 10 images per class")
    ap.add_argument("--model", default=None,
                    help=f"one encoder: standin, {RANDOM_VIT_B16}, or any load_encoder argument (hub id or folder); "
                         f"default: the stand-in on every image, then {RANDOM_VIT_B16} on 20 images per class")
    ap.add_argument("--limit-per-class", type=int, default=None,
                    help="images per class (seeded subset) for --model; default: every image")
    ap.add_argument("--notebook", default=str(NOTEBOOK), help="notebook to run (default: 05_benchmark)")
    args = ap.parse_args(argv)
    if args.quick:
        plan = [("standin", 10)]
    elif args.model is not None:
        plan = [(args.model, args.limit_per_class or None)]
    else:  # the least favourable encoder on the notebook's defaults, then a real-size architecture on a subset
        plan = [("standin", None), (RANDOM_VIT_B16, 20)]
    results = [measure(model, limit, Path(args.notebook)) for model, limit in plan]
    print("\nsummary (cached re-run / first run, wall):")
    for r in results:
        print(f"  {r['model']:>16s}, images per class {str(r['limit'] or 'all'):>4s}: first {r['first_s']:6.1f} s, "
              f"re-run {r['rerun_s']:5.1f} s, ratio {r['ratio']:.3f} (cells only {r['cells_ratio']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
