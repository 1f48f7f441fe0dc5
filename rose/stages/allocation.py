"""Non-uniform sparsity as stages: the dense statistics pass, the allocation, and its lookup.

`outlier_statistics` runs one dense decoder layer on the dense calibration inputs
(the embeddings for layer 0, the dense layer before's outputs after that), with
the hooks the Hessian stage uses, but collecting only each input column's norm:
enough for the Wanda score |W_ij| * ||X_j|| that OWL counts outliers of. A
routed expert's norms are over the tokens its router sends it, whatever
`moe.calibrate_all_experts` says (that setting is for the Hessians): OWL's X is
what the Linear sees. An expert no calibration token reaches has zero norms, so
its weights count in the layer's density as non-outliers (zero scores). It
writes the layer's outlier densities and its outputs (the next layer's dense
inputs). `allocate` turns every layer's densities into per-layer sparsities for
one target and writes allocation.json; the order and prune stages of every
variant with that target read their layer's fraction from it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from rose import allocation as alloc
from rose.artifacts import (
    ArtifactError,
    H5StreamWriter,
    atomic_write_json,
    check_provenance,
    open_h5,
    read_json,
)
from rose.config import ConfigError, RunConfig, Variant
from rose.device import compute_dtype, resolve_device, storage_dtype
from rose.handoff import Handoff
from rose.hessian import ColumnNorms
from rose.model_info import ModelInfo, open_model
from rose.provenance import (
    allocation_provenance,
    dense_inputs_provenance,
    outliers_provenance,
)
from rose.stages.calibration import HIDDEN
from rose.stages.layer import (
    _hessian_pass,
    _layer_module,
    _module_weight,
    layer_units,
    moe_settings,
    read_unit,
)

log = logging.getLogger("rose")


def outlier_statistics(
    cfg: RunConfig,
    model_json: str | Path,
    layer: int,
    inputs_h5: str | Path,
    out_json: str | Path,
    out_h5: str | Path,
    handoff: Handoff | None = None,
) -> dict[str, Any]:
    """The dense layer's outlier density for each configured m, and its outputs."""
    info = ModelInfo.load(model_json)
    device = resolve_device(cfg.device)
    dtype = compute_dtype(cfg, info, device)
    checkpoint, fam = open_model(info)
    units = layer_units(cfg, checkpoint, fam, layer)
    module = _layer_module(checkpoint, fam, layer, device, dtype)
    widths = {name: _module_weight(module, units.units[name]).shape[1] for name in units.names()}
    expected = dense_inputs_provenance(cfg, info, layer)
    with open_h5(Path(inputs_h5), expected, handoff) as probe:
        shape = probe.shape(HIDDEN)
    experts = list(range(units.num_experts))
    attrs = dense_inputs_provenance(cfg, info, layer + 1)
    with H5StreamWriter(
        out_h5, HIDDEN, shape, storage_dtype(dtype), attrs, handoff=handoff
    ) as writer:

        def write(out: torch.Tensor) -> None:
            if not bool(torch.isfinite(out).all()):
                raise ValueError(f"layer {layer}: the dense layer's outputs contain NaN/Inf")
            writer.write(out)

        norms = _hessian_pass(
            cfg,
            module,
            checkpoint.config,
            units,
            list(units.groups),
            experts,
            widths,
            [0] * units.num_experts,
            # the tokens each expert computes, not every token (calibrate_all_experts is for H)
            dataclasses.replace(moe_settings(cfg), calibrate_all_experts=False),
            device,
            dtype,
            Path(inputs_h5),
            expected,
            f"layer {layer} outlier statistics",
            shape[0],
            make_accumulator=ColumnNorms,
            on_output=write,
            handoff=handoff,
        )
        del module
        prefix = fam.layer_prefix.format(index=layer)
        weights = [read_unit(checkpoint, prefix, units.units[n]) for n in units.names()]
        columns = [norms[units.group_of(n)].norms().cpu() for n in units.names()]
        densities = {f"{m:g}": alloc.outlier_density(weights, columns, m) for m in cfg.owl_m_values}
    # written last: the layer's record marks the step done only once its outputs are in place
    record = {
        "provenance": outliers_provenance(cfg, info, layer),
        "layer": layer,
        "parameters": sum(w.numel() for w in weights),
        "linears": len(weights),
        "outlier_density": densities,
    }
    atomic_write_json(out_json, record)
    log.info(
        "layer %d outlier density: %s",
        layer,
        ", ".join(f"m={m} {d:.5f}" for m, d in densities.items()),
    )
    return record


def allocate(
    cfg: RunConfig,
    model_json: str | Path,
    variant: Variant,
    outlier_jsons: list[str | Path] | None,
    out_json: str | Path,
) -> dict[str, Any]:
    """Per-layer sparsities of `variant`'s target (any method with it), with what decided them."""
    info = ModelInfo.load(model_json)
    setting = variant.allocation
    depth = info.prune_layers
    if setting.kind == alloc.OWL:
        if not outlier_jsons or len(outlier_jsons) != depth:
            raise ArtifactError(f"allocate {variant.target}: need {depth} outlier statistics")
        records = []
        for layer, path in enumerate(outlier_jsons):
            record = read_json(path)
            check_provenance(
                Path(path), record.get("provenance", {}), outliers_provenance(cfg, info, layer)
            )
            records.append(record)
        parameters = [int(r["parameters"]) for r in records]
        densities = [float(r["outlier_density"][f"{setting.m:g}"]) for r in records]
        target = variant.sparsity.fraction
        try:
            fractions = alloc.owl_sparsities(
                densities, parameters, target, setting.lam, key=setting.key
            )
        except alloc.AllocationError as exc:
            raise ConfigError(f"config: {exc}") from None
        statistics = [
            {"layer": i, "parameters": p, "outlier_density": d}
            for i, (p, d) in enumerate(zip(parameters, densities, strict=True))
        ]
    else:
        parameters = layer_parameters(cfg, info)
        fractions = list(setting.fractions)
        target = None
        statistics = [{"layer": i, "parameters": p} for i, p in enumerate(parameters)]
        try:
            alloc.check_sparsities(fractions, parameters, None, setting.key)
        except alloc.AllocationError as exc:
            raise ConfigError(f"config: {exc}") from None
    record = {
        "provenance": allocation_provenance(cfg, info, variant),
        "target": variant.target,
        "settings": setting.settings(),
        "sparsity": target,
        # the mean the model gets: every layer's fraction weighted by its pruned parameters
        "weighted_mean": alloc.weighted_mean(fractions, parameters),
        "layers": [{**stat, "sparsity": f} for stat, f in zip(statistics, fractions, strict=True)],
    }
    atomic_write_json(out_json, record)
    log.info(
        "allocation %s: layer sparsities %.4f..%.4f, weighted mean %.4f",
        variant.target,
        min(fractions),
        max(fractions),
        record["weighted_mean"],
    )
    return record


def layer_parameters(cfg: RunConfig, info: ModelInfo) -> list[int]:
    """Pruned weights per decoder layer, from the checkpoint's tensor shapes (nothing read)."""
    checkpoint, fam = open_model(info)
    specs = checkpoint.specs()
    out = []
    for layer in range(info.prune_layers):
        units = layer_units(cfg, checkpoint, fam, layer)
        total = 0
        for unit in units.units.values():
            shape = specs[fam.layer_prefix.format(index=layer) + unit.tensor].shape
            rows = (unit.rows[1] - unit.rows[0]) if unit.rows else shape[-2]
            total += rows * shape[-1]
        out.append(total)
    return out
