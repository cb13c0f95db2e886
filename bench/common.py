"""What every benchmark shares: paths, the offline examples, result headers and atomic writes.

Every table starts with the same header (command, date, versions, machine load at start, no GPU),
so a number can always be traced back to the run and the conditions that produced it.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from giva_fx.files import atomic_file

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
QUICK_RESULTS = RESULTS / "quick"  # smoke runs never overwrite the committed numbers
CACHE = ROOT / "bench" / "cache"
EXAMPLES = ROOT / "examples"


def examples_path() -> None:
    """Make `examples/` importable the way its scripts import each other (`import models`)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))


def quiet() -> None:
    """Silence the warnings the benchmarks trigger on purpose (rank clamps, PEFT notices)."""
    warnings.filterwarnings("ignore")
    import logging

    for name in ("transformers", "peft", "torch._export", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def results_dir(quick: bool) -> Path:
    return QUICK_RESULTS if quick else RESULTS


def header(title: str, command: str, load_at_start: tuple[float, float, float], threads: int) -> str:
    """The Markdown header every result table carries."""
    import peft
    import transformers

    load = ", ".join(f"{x:.2f}" for x in load_at_start)
    return "\n".join([
        f"# {title}",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"Python {platform.python_version()}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads per process: {threads}; load average (1, 5, 15 min) at start: {load}",
        "- CPU only: no GPU was available for these runs.",
        "",
    ])


#: glibc serves every allocation over 128 KiB with mmap, so freed tensors leave the RSS and the
#: peak-RSS counter follows torch's live memory (set before the measuring process starts)
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def status_kb(key: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: resident now; VmHWM: peak since `reset_peak`)."""
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def reset_peak() -> None:
    """Set this process's peak RSS counter to its current RSS, so earlier peaks (building, or the
    parent's across fork and exec) cannot mask the one measured next."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as e:
        raise RuntimeError(f"cannot reset the peak-RSS counter ({e}); peak memory cannot be measured here") from e


def peak_kb() -> int:
    """The kernel's peak RSS of this process since the last `reset_peak` (VmHWM, what ru_maxrss
    reports once the peak was reset)."""
    return status_kb("VmHWM")


def write(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def command_line(argv: Sequence[str] | None = None) -> str:
    args = " ".join(sys.argv[1:] if argv is None else argv)
    return f"python -m bench {args}".strip()
