"""Calibration stages: sample the token windows, then embed them as layer 0's inputs.

Both artifacts are shared by every variant of a run, so their provenance names
the calibration settings only.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from rose import data, family
from rose.artifacts import H5Artifact, H5StreamWriter, write_h5
from rose.config import RunConfig
from rose.device import compute_dtype, resolve_device, storage_dtype
from rose.handoff import Handoff
from rose.model_info import ModelInfo, open_model
from rose.provenance import calibration_provenance

TOKENS = "tokens"
HIDDEN = "hidden"


def capture_calibration(cfg: RunConfig, model_json: str | Path, out_h5: str | Path) -> None:
    """Sample the calibration windows (tokens) by the paper's protocol."""
    info = ModelInfo.load(model_json)
    c = cfg.calibration
    if info.max_positions and c.seqlen > info.max_positions:
        raise ValueError(
            f"calibration.seqlen = {c.seqlen} exceeds the model's context ({info.max_positions} tokens)"
        )
    tokenizer = data.tokenizer_for(Path(info.path), trust_remote_code=cfg.model.trust_remote_code)
    tokens = data.calibration_windows(tokenizer, c.source, c.nsamples, c.seqlen, c.seed)
    attrs = calibration_provenance(cfg, info, "calibration-tokens")
    attrs.update(source=str(asdict(c.source)), nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed)
    write_h5(out_h5, {TOKENS: tokens.to(torch.int32)}, attrs)


def embed_calibration(
    cfg: RunConfig,
    model_json: str | Path,
    tokens_h5: str | Path,
    out_h5: str | Path,
    handoff: Handoff | None = None,
) -> None:
    """Layer 0's inputs: the embedding outputs of the calibration tokens."""
    info = ModelInfo.load(model_json)
    device = resolve_device(cfg.device)
    dtype = compute_dtype(cfg, info, device)
    with H5Artifact(tokens_h5, calibration_provenance(cfg, info, "calibration-tokens")) as art:
        tokens = torch.from_numpy(art.read(TOKENS).astype(np.int64))
    checkpoint, fam = open_model(info)
    weight = checkpoint.read(fam.embed_name).to(device, dtype)
    n, seqlen = tokens.shape
    attrs = calibration_provenance(cfg, info, "layer-inputs")
    attrs.update(layer=0, variant="*")
    shape = (n, seqlen, info.hidden_size)
    with H5StreamWriter(
        out_h5, HIDDEN, shape, storage_dtype(dtype), attrs, handoff=handoff
    ) as writer:
        for start in range(0, n, cfg.calibration.batch_size):
            batch = tokens[start : start + cfg.calibration.batch_size]
            hidden = family.embed(weight, batch, fam)
            writer.write(hidden)
