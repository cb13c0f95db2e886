"""adapt() time (by stage) and peak RSS growth on the demo model (digits ViT, one batch of 256).

    OMP_NUM_THREADS=1 python bench/demo_adapt.py     # writes bench/results/demo_adapt.md

A first adapt() warms up imports and lazy initialisation; the second is measured, with the
process's peak-RSS counter reset before it and allocations served by mmap (`common.MMAP_ENV`, so
memory freed after the first call leaves the RSS), so the peak RSS growth is what adapt() itself
needs (gradients, activations of the profiling batch, SVDs).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench/ is a package

import torch  # noqa: E402

import giva_fx  # noqa: E402
from bench.common import MMAP_ENV, RESULTS, header, peak_kb, reset_peak, status_kb, write  # noqa: E402
from models import load_base  # noqa: E402
from offline_data import digits_shifted  # noqa: E402


def main() -> None:
    if any(os.environ.get(k) != v for k, v in MMAP_ENV.items()):  # glibc reads it at process start
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MMAP_ENV})
    load = os.getloadavg()
    model = load_base("digits_vit")
    data = digits_shifted()
    batch = (data.x_train[:256], data.y_train[:256])
    giva_fx.adapt(model, batch, rank=8, progress=False)
    before = status_kb("VmRSS")
    reset_peak()
    start = time.perf_counter()
    adapted = giva_fx.adapt(model, batch, rank=8, progress=False)
    wall = time.perf_counter() - start
    grown = (peak_kb() - before) / 1024
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    r = adapted.report
    line = (f"adapt(): {wall:.2f} s (capture {r.capture_s:.2f}, profile {r.profile_s:.2f}, SVD {r.bases_s:.2f}, "
            f"rewrite {r.rewrite_s:.2f}); peak RSS growth {grown:.1f} MiB; model weights {size:.2f} MiB")
    print(line)
    write(RESULTS / "demo_adapt.md", "\n".join([
        header("adapt() on the demo model", "OMP_NUM_THREADS=1 python bench/demo_adapt.py", load, torch.get_num_threads()),
        "The demo's digits ViT and one batch of 256 rotated digits, rank 8, init Vr; the second of two "
        "adapt() calls (the first warms up imports), so the RSS growth is what adapt() itself needs.", "",
        line, ""]))


if __name__ == "__main__":
    main()
