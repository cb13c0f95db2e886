"""`python -m bench [--quick] [--only quality width speed ...]`: regenerate the benchmark results.

Full results land in bench/results/ (committed); `--quick` is a smoke run of a few minutes whose
results land in bench/results/quick/ (not committed), so it never overwrites measured numbers.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from bench.common import ROOT, quiet
from bench.runs import default_jobs

STAGES = ("quality", "width", "speed", "others")
#: the other benchmark scripts in bench/, as (full-run command, quick-run command or None)
OTHERS = (
    (["bench/conv_counts.py"], None),
    (["bench/adapter_size.py"], None),
    (["-m", "bench.ort_training"], ["-m", "bench.ort_training", "--quick"]),
    (["bench/distributed.py"], None),
    (["bench/demo_adapt.py"], None),
)


def others(quick: bool) -> str:
    """Run the other benchmark scripts (each writes its own results); a failure is reported, not fatal."""
    ran = []
    for full, short in OTHERS:
        args = short if quick else full
        if args is None or not (ROOT / (args[0] if args[0] != "-m" else args[1].replace(".", "/") + ".py")).exists():
            continue
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        code = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=False).returncode
        ran.append(f"{' '.join(args)}: {'ok' if code == 0 else f'failed (exit {code})'}")
    return "; ".join(ran) or "nothing to run"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Regenerate the benchmark results.")
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke run (results/quick/)")
    parser.add_argument("--only", nargs="+", choices=STAGES, default=STAGES, help="stages to run")
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="parallel training runs (1 thread each)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse training-run records stored in bench/cache/runs (same settings only)")
    args = parser.parse_args()
    quiet()
    for stage in args.only:
        start = time.perf_counter()
        if stage == "quality":
            from bench import quality

            path = quality.main(args.quick, args.jobs, args.reuse)
        elif stage == "width":
            from bench import width

            path = width.main(args.quick, args.jobs, args.reuse)
        elif stage == "speed":
            from bench import speed

            path = speed.main(args.quick)
        else:
            print(f"others: {others(args.quick)} in {time.perf_counter() - start:.0f} s", flush=True)
            continue
        print(f"{stage}: wrote {path} in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
