"""Shared by the benchmark scripts: a header naming the machine, and markdown tables."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Sequence
from typing import Any


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header() -> list[str]:
    import torch
    import transformers

    device = "cpu"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB"
    return [
        f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine: {_cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        f"device: {device}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
    ]


def table(rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
