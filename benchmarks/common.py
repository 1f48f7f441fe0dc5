"""Shared by the benchmark scripts: a header naming the machine, and markdown tables.

Every table is printed under the header so that a pasted number always says
where it came from (CPU, GPU, library versions, and how loaded the machine was:
timings on a shared 2-core box move by 2x with a neighbour's test run).
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load unknown"
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def header() -> list[str]:
    """Lines naming date, machine, device and versions; print them above every table."""
    import torch
    import transformers

    device = "cpu (no CUDA device)"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = (
            f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
            f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible"
        )
    return [
        f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine: {_cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {_load()}",
        f"device: {device}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
    ]


def table(rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> str:
    """A markdown table; every row must have one cell per column."""
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(
                f"table row has {len(row)} cells, expected {len(columns)}: {list(row)!r}"
            )
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def workdir(given: str | None, name: str) -> Path:
    """The benchmark's working directory: `given` (made if missing), else a fresh one under the
    repository's gitignored results/; announced on stderr."""
    if given:
        path = Path(given).resolve()
        path.mkdir(parents=True, exist_ok=True)
    else:
        results = Path(__file__).resolve().parents[1] / "results"
        results.mkdir(exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=results))
    print(f"{name}: working in {path}", file=sys.stderr)
    return path
