"""Where the tensor stages run, and the dtypes they compute and store in.

Every stage of a run asks here, so the workflow and the runner do the same
arithmetic and their artifacts stay bit-identical.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from rose.config import RunConfig
    from rose.model_info import ModelInfo


def resolve_device(setting: str) -> torch.device:
    """`device:` of the config (auto | cpu | cuda) -> the device to compute on."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: cuda was requested but no CUDA device is available")
        # TF32 matmuls would change the sweep's float32 arithmetic (and its determinism contract).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    return torch.device("cpu")


def compute_dtype(cfg: RunConfig, info: ModelInfo, device: torch.device) -> torch.dtype:
    """float32 on CPU; on GPU the checkpoint's dtype unless the config says otherwise."""
    if cfg.model.dtype != "auto":
        return getattr(torch, cfg.model.dtype)
    if device.type == "cpu":
        return torch.float32
    return getattr(torch, info.dtype) if info.dtype in ("float16", "bfloat16") else torch.float32


def storage_dtype(dtype: torch.dtype) -> np.dtype | str:
    """Layer inputs are stored in the compute dtype: fp16 as fp16, bfloat16 as its raw 16-bit
    words ("bfloat16": HDF5 has no such type), everything else as fp32."""
    if dtype == torch.bfloat16:
        return "bfloat16"
    return np.dtype(np.float16) if dtype == torch.float16 else np.dtype(np.float32)


def available_memory(device: torch.device | str) -> int:
    """Bytes a stage can still allocate on `device`: free GPU memory, or the host's available
    memory bounded by the job's cgroup limit (SLURM jobs see the node's /proc/meminfo)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    headroom = _cgroup_headroom()
    if headroom is not None:
        candidates.append(headroom)
    if not candidates:
        candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return max(0, min(candidates))


def _cgroup_headroom() -> int | None:
    """Memory limit minus usage of this process's cgroup (v2 or v1), None when unlimited."""
    root = Path("/sys/fs/cgroup")
    files = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                files += [
                    (root / path.lstrip("/"), "memory.max", "memory.current"),
                    (root, "memory.max", "memory.current"),
                ]
            elif "memory" in controllers.split(","):
                base = root / "memory"
                files += [
                    (base / path.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes"),
                    (base, "memory.limit_in_bytes", "memory.usage_in_bytes"),
                ]
    except (OSError, ValueError):
        return None
    found = []
    for directory, limit, usage in files:
        try:
            text = (directory / limit).read_text().strip()
            if text != "max" and int(text) < 1 << 60:
                found.append(int(text) - int((directory / usage).read_text().strip()))
        except (OSError, ValueError):
            continue
    return min(found) if found else None
