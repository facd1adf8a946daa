"""`make bench`: run every benchmark script in turn; each prints ratios against a baseline measured in the same run.

Pass --quick to run the small workloads only.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_post_encoding.py", "bench_encoding.py", "bench_store.py", "bench_transclip.py", "bench_cached_rerun.py"]


def main() -> int:
    extra = sys.argv[1:]
    failed = []
    for script in SCRIPTS:
        path = HERE / script
        if not path.exists():
            print(f"== {script}: missing", flush=True)
            failed.append(script)
            continue
        print(f"\n== {script} {' '.join(extra)}", flush=True)
        if subprocess.run([sys.executable, str(path), *extra]).returncode != 0:
            failed.append(script)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
