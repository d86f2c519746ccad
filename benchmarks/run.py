"""`make bench`: every benchmark, one after another, each in its own process.

Pass ``--quick`` for a short smoke run. Tables are printed as markdown, ready for the README.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "bench_train_step.py",
    "bench_clip.py",
    "bench_adaptive.py",
    "bench_batchnorm.py",
    "bench_recovery.py",
    "bench_optimizers.py",
    "bench_attention.py",
    "bench_compile.py",
]


def main() -> int:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    failed = 0
    for name in BENCHMARKS:
        print(f"\n## {name}\n", flush=True)
        failed |= subprocess.call([sys.executable, str(HERE / name), *sys.argv[1:]], env=env)
    return failed


if __name__ == "__main__":
    sys.exit(main())
