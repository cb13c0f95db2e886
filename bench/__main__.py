"""`python -m bench [--quick] [--only quality width speed others]`: regenerate the benchmark results.

Full results land in bench/results/ (committed); `--quick` is a smoke run of a few minutes whose
results land in bench/results/quick/ (not committed), so it never overwrites measured numbers.
It prints its plan first (training runs per stage, estimated minutes), then each stage's wall time
and the total.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from bench.common import ROOT, quiet
from bench.runs import default_jobs, estimate

STAGES = ("quality", "width", "speed", "others")
#: the other benchmark scripts in bench/, as (full-run command, quick-run command or None)
OTHERS = (
    (["bench/conv_counts.py"], None),
    (["bench/adapter_size.py"], None),
    (["-m", "bench.ort_training"], ["-m", "bench.ort_training", "--quick"]),
    (["bench/distributed.py"], None),
    (["bench/demo_adapt.py"], None),
)
#: seconds of the stages whose work is fixed, (quick, full), on a quiet 2-core machine (measured
#: 2026-12-05 at load average 0.3-2: speed BERT 225 + char GPT-2 80 + ViT 45, others 250 less ORT's
#: halved steps): for the plan line only
FIXED_S = {"speed": (30, 350), "others": (40, 215)}
POOL_START_S = 10  # the pool's workers import torch, transformers and peft once
EXTENSIONS = 0.05  # searches that step past their first round: ~5% more runs (12 of 245 on 2026-12-04's records)


def others(quick: bool) -> str:
    """Run the other benchmark scripts (each writes its own results); a failure is reported, not fatal."""
    ran = []
    for full, short in OTHERS:
        args = short if quick else full
        if args is None or not (ROOT / (args[0] if args[0] != "-m" else args[1].replace(".", "/") + ".py")).exists():
            continue
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        code = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=False).returncode
        ran.append(f"{' '.join(args)}: {'ok' if code == 0 else f'failed (exit {code})'} "
                   f"in {time.perf_counter() - start:.0f} s")
    return "; ".join(ran) or "nothing to run"


def plan(stages: tuple[str, ...], quick: bool, jobs: int) -> dict[str, tuple[str, float]]:
    """Per stage: (what it will run, estimated seconds)."""
    from bench import quality, speed, width

    out = {}
    for stage in stages:
        if stage in ("quality", "width"):
            module = quality if stage == "quality" else width
            runs, seconds = estimate((module.QUICK if quick else module.FULL).least_runs())
            out[stage] = (f">= {runs} training runs", POOL_START_S + (1 + EXTENSIONS) * seconds / max(1, jobs))
        elif stage == "speed":
            models = speed.speed_models(quick)
            configs = speed.QUICK_CONFIGS if quick else speed.CONFIGS
            out[stage] = (f"{len(models)} model(s) x {len(configs)} configurations", FIXED_S[stage][not quick])
        else:
            scripts = sum((short if quick else full) is not None for full, short in OTHERS)
            out[stage] = (f"{scripts} script(s)", FIXED_S[stage][not quick])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Regenerate the benchmark results.")
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke run (results/quick/)")
    parser.add_argument("--only", nargs="+", choices=STAGES, default=STAGES, help="stages to run")
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="parallel training runs (1 thread each)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse training-run records stored in bench/cache/runs (same settings only)")
    args = parser.parse_args()
    quiet()
    stages = tuple(s for s in STAGES if s in args.only)
    planned = plan(stages, args.quick, args.jobs)
    print("plan: " + "; ".join(f"{s} {what}" for s, (what, _) in planned.items())
          + f"; about {sum(t for _, t in planned.values()) / 60:.0f} min on a quiet machine with --jobs {args.jobs}"
          + (" (less with --reuse)" if args.reuse else ""), flush=True)
    took = {}
    for stage in stages:
        start = time.perf_counter()
        if stage == "quality":
            from bench import quality

            done = f"wrote {quality.main(args.quick, args.jobs, args.reuse)}"
        elif stage == "width":
            from bench import width

            done = f"wrote {width.main(args.quick, args.jobs, args.reuse)}"
        elif stage == "speed":
            from bench import speed

            done = f"wrote {speed.main(args.quick)}"
        else:
            done = others(args.quick)
        took[stage] = time.perf_counter() - start
        print(f"{stage}: {done} in {took[stage]:.0f} s (planned about {planned[stage][1]:.0f} s)", flush=True)
    print(f"total: {sum(took.values()) / 60:.1f} min (" + ", ".join(f"{s} {t:.0f} s" for s, t in took.items()) + ")",
          flush=True)


if __name__ == "__main__":
    main()
