"""adapt() time (by stage) and peak RSS growth on the demo model (digits ViT, one batch of 256).

    OMP_NUM_THREADS=1 python bench/demo_adapt.py

A first adapt() warms up imports and lazy initialisation; the second is measured, so the RSS
growth is what adapt() itself needs (gradients, activations of the profiling batch, SVDs).
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import giva_fx  # noqa: E402
from models import load_base  # noqa: E402
from offline_data import digits_shifted  # noqa: E402


def main() -> None:
    model = load_base("digits_vit")
    data = digits_shifted()
    batch = (data.x_train[:256], data.y_train[:256])
    giva_fx.adapt(model, batch, rank=8, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    adapted = giva_fx.adapt(model, batch, rank=8, progress=False)
    wall = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    r = adapted.report
    print(f"adapt(): {wall:.2f} s (capture {r.capture_s:.2f}, profile {r.profile_s:.2f}, SVD {r.bases_s:.2f}, "
          f"rewrite {r.rewrite_s:.2f}); peak RSS growth {grown:.1f} MiB; model weights {size:.2f} MiB")


if __name__ == "__main__":
    main()
