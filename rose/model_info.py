"""model.json: the prepared checkpoint every stage reads, and the stage that writes it.

Stages never resolve the model source themselves: `prepare_model` turns it into
a local safetensors checkpoint once, checks it against its config, and records
where it is and what it is (fingerprint, shapes, dtype) for all later stages.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from rose import checkpoint as ckpt
from rose import family
from rose.artifacts import ArtifactError, atomic_write_json, read_json
from rose.config import RunConfig


@dataclass(frozen=True)
class ModelInfo:
    """model.json: where the prepared checkpoint is and what it is."""

    path: str
    source: str
    fingerprint: str
    model_type: str
    num_layers: int
    prune_layers: int
    hidden_size: int
    max_positions: int | None
    dtype: str
    parameters: int

    @classmethod
    def load(cls, path: str | Path) -> ModelInfo:
        raw = read_json(path)
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ArtifactError(f"{path}: not a model.json written by this version; delete it") from exc


def load_checked(path: str | Path, source: str) -> ModelInfo:
    """model.json, refused when it describes another model than the config's or when the
    weights it points at changed since it was written (every artifact of the run would mix
    two models)."""
    info = ModelInfo.load(path)
    if info.source != source:
        raise ArtifactError(
            f"{path}: written for model.source {info.source!r}, this config has {source!r}; "
            "delete it (and the run directory's artifacts) or use a new run name"
        )
    try:
        found = ckpt.Checkpoint.open(Path(info.path)).fingerprint()
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: the prepared checkpoint {info.path} cannot be read ({exc}); delete it and rerun") from exc
    if found != info.fingerprint:
        raise ArtifactError(
            f"{path}: the weights at {info.path} changed since it was written (fingerprint {found}, "
            f"recorded {info.fingerprint}); delete the run directory or use a new run name"
        )
    return info


def open_model(info: ModelInfo) -> tuple[ckpt.Checkpoint, family.Family]:
    """The prepared checkpoint (read tensor by tensor) and its architecture family."""
    checkpoint = ckpt.Checkpoint.open(Path(info.path))
    return checkpoint, family.family_for(checkpoint.config)


def prepare_model(cfg: RunConfig, out_json: str | Path) -> ModelInfo:
    """Resolve the model source to a local safetensors checkpoint and describe it."""
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
    info = ModelInfo(
        path=str(Path(path).resolve()),
        source=cfg.model.source,
        fingerprint=checkpoint.fingerprint(),
        model_type=config.model_type,
        num_layers=num_layers,
        prune_layers=cfg.layers or num_layers,
        hidden_size=config.hidden_size,
        max_positions=getattr(config, "max_position_embeddings", None),
        dtype=str(checkpoint.dtype()).removeprefix("torch."),
        parameters=_count_parameters(checkpoint),
    )
    atomic_write_json(out_json, asdict(info))
    return info


def _check_layers_match_config(checkpoint: ckpt.Checkpoint, fam: family.Family, num_layers: int, path: Path) -> None:
    """Every layer's tensors must be what the config describes (read from headers only).

    Each layer is built from the config (meta device): layers of different attention
    kinds (Gemma's sliding and full layers) are checked against their own shapes.
    """
    specs = checkpoint.specs()
    for layer in range(num_layers):
        expected = family.expected_shapes(checkpoint.config, layer)
        prefix = fam.layer_prefix.format(index=layer)
        for name, shape in expected.items():
            spec = specs.get(prefix + name)
            if spec is None:
                raise ValueError(f"{path}: model/config mismatch: layer {layer} has no tensor {name}")
            if spec.shape != shape:
                raise ValueError(
                    f"{path}: model/config mismatch: layer {layer} {name} has shape {spec.shape}, "
                    f"the config implies {shape}"
                )


def _count_parameters(checkpoint: ckpt.Checkpoint) -> int:
    """From the shard headers: no tensor of a possibly 70B checkpoint is read."""
    return sum(math.prod(shape) for shape in checkpoint.shapes().values())
