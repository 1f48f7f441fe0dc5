"""model.json: the prepared checkpoint every stage reads (`rose.stages.model` writes it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from rose import checkpoint as ckpt
from rose import family
from rose.artifacts import ArtifactError, read_json
from rose.sizing import DETAIL_KEYS


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
    # cluster estimates (rose.sizing.DETAIL_KEYS), where a dense layer's formula is far off.
    layer_parameters: int | None = None
    active_layer_parameters: int | None = None
    hessian_elements: int | None = None
    hessian_token_flops: float | None = None
    sweep_flops: float | None = None

    def to_json(self) -> dict:
        """model.json's content (the optional sizes only when known)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in DETAIL_KEYS}

    @classmethod
    def load(cls, path: str | Path) -> ModelInfo:
        raw = read_json(path)
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ArtifactError(
                f"{path}: not a model.json written by this version; delete it"
            ) from exc


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
