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
from rose.device import storage_dtype
from rose.layout import DENSE
from rose.provenance import calibration_provenance
from rose.sizing import H5_OVERHEAD, MB, blocks
from rose.stages.layer_pass import HIDDEN
from rose.stages.spec import Stage, StageContext

TOKENS = "tokens"


def capture_calibration(ctx: StageContext) -> None:
    """Sample the calibration windows (tokens) by the paper's protocol."""
    cfg, info = ctx.cfg, ctx.model_info
    c = cfg.calibration
    if info.max_positions and c.seqlen > info.max_positions:
        raise ValueError(
            f"calibration.seqlen = {c.seqlen} exceeds the model's context ({info.max_positions} tokens)"
        )
    tokenizer = data.tokenizer_for(Path(info.path), trust_remote_code=cfg.model.trust_remote_code)
    tokens = data.calibration_windows(tokenizer, c.source, c.nsamples, c.seqlen, c.seed)
    attrs = calibration_provenance(cfg, info, "calibration-tokens")
    attrs.update(source=str(asdict(c.source)), nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed)
    write_h5(ctx.outputs["tokens"], {TOKENS: tokens.to(torch.int32)}, attrs)


def embed_calibration(ctx: StageContext) -> None:
    """Layer 0's inputs: the embedding outputs of the calibration tokens."""
    cfg, info = ctx.cfg, ctx.model_info
    expected = calibration_provenance(cfg, info, "calibration-tokens")
    with H5Artifact(ctx.inputs["tokens"], expected) as art:
        tokens = torch.from_numpy(art.read(TOKENS).astype(np.int64))
    weight = ctx.checkpoint.read(ctx.family.embed_name).to(ctx.device, ctx.dtype)
    n, seqlen = tokens.shape
    attrs = calibration_provenance(cfg, info, "layer-inputs")
    attrs.update(layer=0, variant="*")
    shape = (n, seqlen, info.hidden_size)
    with H5StreamWriter(
        ctx.outputs["inputs"], HIDDEN, shape, storage_dtype(ctx.dtype), attrs, handoff=ctx.handoff
    ) as writer:
        for start in range(0, n, cfg.calibration.batch_size):
            batch = tokens[start : start + cfg.calibration.batch_size]
            writer.write(family.embed(weight, batch, ctx.family))


STAGES = (
    Stage(
        "capture_calibration",
        capture_calibration,
        outputs=lambda L, w: {"tokens": L.tokens},
        # a local text is tokenised in seconds; a hub data set is downloaded first
        estimate=lambda f: (1024 * MB, 5.0 if f.calibration_local else 120.0),
        threads=2,
        writes=lambda s, name, w: blocks(s.tokens * 4 + H5_OVERHEAD),
        disk={"tokens": "calibration tokens"},
    ),
    Stage(
        "embed_calibration",
        embed_calibration,
        outputs=lambda L, w: {"inputs": L.inputs(DENSE, 0)},
        estimate=lambda f: (
            2 * f.acts + f.params / f.num_layers * f.dbytes,
            f.io(2 * f.acts),
        ),
        inputs=lambda plan, w: {"tokens": plan.layout.tokens},
        temporary=frozenset({"inputs"}),
        gpu=True,
        gpu_memory=lambda g: (
            g.shape.embedding_parameters * g.cbytes
            + 2 * g.batch_tokens * g.shape.hidden_size * g.cbytes
        ),
        writes=lambda s, name, w: s.inputs,
        disk={"inputs": "layer inputs"},
    ),
)
