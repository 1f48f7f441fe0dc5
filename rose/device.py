"""Where the tensor stages run, and the dtypes they compute and store in.

Every stage of a run asks here, so the workflow and the runner do the same
arithmetic and their artifacts stay bit-identical.
"""

from __future__ import annotations

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
