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
    # Mixture-of-experts models only: exact per-layer sizes of the largest pruned layer for the
    # cluster estimates (rose.resources.DETAIL_KEYS), where a dense layer's formula is far off.
    layer_parameters: int | None = None
    active_layer_parameters: int | None = None
    hessian_elements: int | None = None
    hessian_token_flops: float | None = None
    sweep_flops: float | None = None

    def to_json(self) -> dict:
        """model.json's content (the optional sizes only when known)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in _SIZES}

    @classmethod
    def load(cls, path: str | Path) -> ModelInfo:
        raw = read_json(path)
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ArtifactError(
                f"{path}: not a model.json written by this version; delete it"
            ) from exc


_SIZES = (
    "layer_parameters",
    "active_layer_parameters",
    "hessian_elements",
    "hessian_token_flops",
    "sweep_flops",
)


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
        raise ArtifactError(
            f"{path}: the prepared checkpoint {info.path} cannot be read ({exc}); delete it and rerun"
        ) from exc
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
        **_moe_sizes(config, cfg.layers or num_layers),
    )
    atomic_write_json(out_json, info.to_json())
    return info


def _moe_sizes(config, depth: int) -> dict[str, float]:
    """Sizes of the largest of the first `depth` layers of a mixture-of-experts model, as the
    stages prune it (every expert's gate/up and down Hessians; each expert's gate/up computed
    for every token, as with moe.calibrate_all_experts, the default); {} for dense models."""
    if family.family_for(config).experts is None:
        return {}
    best: dict[str, float] = {}
    for index in range(depth):
        units = family.layer_units(config, index)
        shapes = family.unit_shapes(config, index)
        parameters = sum(math.prod(s) for s in family.expected_shapes(config, index).values())
        routed = sum(math.prod(shapes[n]) for n, u in units.units.items() if u.expert is not None)
        share = (
            min(1.0, config.num_experts_per_tok / units.num_experts) if units.num_experts else 1.0
        )
        hessian = sum(shapes[g[0]][1] ** 2 for g in units.groups)
        gate_up = sum(
            2 * shapes[n][0] * shapes[n][1]
            for n, u in units.units.items()
            if u.part in ("gate", "up")
        )
        sizes = {
            "layer_parameters": parameters,
            "active_layer_parameters": int(parameters - routed * (1 - share)),
            "hessian_elements": hessian,
            "hessian_token_flops": float(2 * hessian + gate_up),
            "sweep_flops": float(
                sum(shapes[n][0] * shapes[n][1] ** 2 + shapes[n][1] ** 3 for n in units.units)
            ),
        }
        if not best or (sizes["layer_parameters"], hessian) > (
            best["layer_parameters"],
            best["hessian_elements"],
        ):
            best = sizes
    return best


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
