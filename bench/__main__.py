"""`python -m bench [--quick] [--only quality width speed ...]`: regenerate the benchmark results.

Full results land in bench/results/ (committed); `--quick` is a smoke run of a few minutes whose
results land in bench/results/quick/ (not committed), so it never overwrites measured numbers.
"""
from __future__ import annotations

import argparse
import time

from bench.common import quiet
from bench.runs import default_jobs

STAGES = ("quality", "width", "speed")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
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
        else:
            from bench import speed

            path = speed.main(args.quick)
        print(f"{stage}: wrote {path} in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
