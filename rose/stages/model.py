"""The first stage: the model source as a local safetensors checkpoint, described in model.json.

Stages never resolve the model source themselves: `prepare_model` turns it into
a local safetensors checkpoint once (a hub snapshot, a GGUF or pickle file
converted under run_dir/model, a local safetensors directory used in place),
checks every layer's tensors against its config, and records where it is and
what it is (fingerprint, shapes, dtype) for all later stages.
"""

from __future__ import annotations

import math
from pathlib import Path

from rose import checkpoint as ckpt
from rose import family
from rose.artifacts import atomic_write_json
from rose.model_info import ModelInfo
from rose.sizing import DOWNLOAD_RATE, MB, detail_sizes, model_shape
from rose.stages.spec import Stage, StageContext


def prepare_model(ctx: StageContext) -> ModelInfo:
    """Resolve the model source to a local safetensors checkpoint and describe it."""
    cfg = ctx.cfg
    path = ckpt.prepare_model(
        cfg.model.source,
        cfg.run_dir / "model",
        allow_pickle=cfg.model.allow_pickle,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
    )
    checkpoint = ckpt.Checkpoint.open(path)
    config = checkpoint.config
    fam = family.check_model(config)  # supported model_type, attention kinds and layer structure
    num_layers = checkpoint.num_layers()
    if cfg.layers is not None and cfg.layers > num_layers:
        raise ValueError(f"prune.layers = {cfg.layers} but the model has only {num_layers} layers")
    _check_layers_match_config(checkpoint, fam, num_layers, path)
    depth = cfg.layers or num_layers
    info = ModelInfo(
        path=str(Path(path).resolve()),
        source=cfg.model.source,
        fingerprint=checkpoint.fingerprint(),
        model_type=config.model_type,
        num_layers=num_layers,
        prune_layers=depth,
        hidden_size=config.hidden_size,
        max_positions=getattr(config, "max_position_embeddings", None),
        dtype=str(checkpoint.dtype()).removeprefix("torch."),
        parameters=_count_parameters(checkpoint),
        **moe_sizes(config, depth, cfg.moe.calibrate_all_experts),
    )
    atomic_write_json(ctx.outputs["model"], info.to_json())
    return info


def moe_sizes(config, depth: int, all_tokens: bool = True) -> dict[str, float]:
    """Mixture-of-experts models: the exact sizes of the largest of the first `depth` layers as
    the stages prune them (rose.sizing.DETAIL_KEYS), where a dense layer's formula is far off
    for the cluster estimates; {} for dense models."""
    if family.family_for(config).experts is None:
        return {}
    largest = model_shape(config).largest_layer(depth)
    return detail_sizes(largest, all_tokens)


def _check_layers_match_config(
    checkpoint: ckpt.Checkpoint, fam: family.Family, num_layers: int, path: Path
) -> None:
    """Every layer's tensors must be what the config describes (read from headers only).

    Each layer is built from the config (meta device): layers of different attention
    kinds (Gemma's sliding and full layers) are checked against their own shapes, and
    mixture-of-experts layers in the checkpoint's layout (stacked, or one tensor per expert).
    """
    specs = checkpoint.specs()
    for layer in range(num_layers):
        prefix = fam.layer_prefix.format(index=layer)
        expected = family.expected_shapes(checkpoint.config, layer, checkpoint.layer_names(prefix))
        for name, shape in expected.items():
            spec = specs.get(prefix + name)
            if spec is None:
                raise ValueError(
                    f"{path}: model/config mismatch: layer {layer} has no tensor {name}"
                )
            if spec.shape != shape:
                raise ValueError(
                    f"{path}: model/config mismatch: layer {layer} {name} has shape {spec.shape}, "
                    f"the config implies {shape}"
                )


def _count_parameters(checkpoint: ckpt.Checkpoint) -> int:
    """From the shard headers: no tensor of a possibly 70B checkpoint is read."""
    return sum(math.prod(shape) for shape in checkpoint.shapes().values())


def _estimate(f) -> tuple[float, float]:
    """Checking a safetensors checkpoint reads headers only; a GGUF file is dequantised whole
    through transformers (float32 model, its quantised tensors and the state dict it saves);
    pickle shards are streamed; a hub model is downloaded. Unknown (a cluster request before
    anything ran): a 70B download."""
    source = f.source
    if source is None:
        return 6 * 1024 * MB, 40 * 60.0
    seconds = 10.0 + 0.05 * f.num_layers
    host = 256e6
    if source.kind == "gguf":
        host += 3 * 4 * f.params
    elif source.kind == "pickle":
        host += 2 * min(source.copy_bytes, 2 * 1024**3)  # one shard read, one written
    if source.copy_bytes and source.kind != "prepared":
        seconds += f.io(2 * source.copy_bytes)
    if source.kind == "hub":
        seconds += source.model_bytes / DOWNLOAD_RATE
    return host, seconds


STAGES = (
    Stage(
        "prepare_model",
        prepare_model,
        outputs=lambda L, w: {"model": L.model_json},
        estimate=_estimate,
        reads_model=False,
    ),
)
