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
    read_json,
)
from rose.config import ConfigError, RunConfig
from rose.device import storage_dtype
from rose.hessian import ColumnNorms
from rose.layout import DENSE
from rose.model_info import ModelInfo, open_model
from rose.provenance import (
    allocation_provenance,
    dense_inputs_provenance,
    outliers_provenance,
)
from rose.sizing import MB
from rose.stages.layer_pass import HIDDEN, DenseLayer, layer_units, read_unit
from rose.stages.spec import Stage, StageContext

log = logging.getLogger("rose")


def outlier_statistics(ctx: StageContext) -> dict[str, Any]:
    """The dense layer's outlier density for each configured m, and its outputs."""
    cfg, info, layer = ctx.cfg, ctx.model_info, ctx.layer
    dense = DenseLayer(
        ctx, layer, Path(ctx.inputs["inputs"]), dense_inputs_provenance(cfg, info, layer)
    )
    units = dense.units
    attrs = dense_inputs_provenance(cfg, info, layer + 1)
    with H5StreamWriter(
        ctx.outputs["outputs"],
        HIDDEN,
        dense.shape,
        storage_dtype(ctx.dtype),
        attrs,
        handoff=ctx.handoff,
    ) as writer:

        def write(out: torch.Tensor) -> None:
            if not bool(torch.isfinite(out).all()):
                raise ValueError(f"layer {layer}: the dense layer's outputs contain NaN/Inf")
            writer.write(out)

        norms, _ = dense.accumulate(
            list(units.groups),
            list(range(units.num_experts)),
            f"layer {layer} outlier statistics",
            make_accumulator=ColumnNorms,
            # the tokens each expert computes, not every token (calibrate_all_experts is for H)
            all_tokens=False,
            on_output=write,
        )
        del dense
        prefix = ctx.family.layer_prefix.format(index=layer)
        weights = [read_unit(ctx.checkpoint, prefix, units.units[n]) for n in units.names()]
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
    atomic_write_json(ctx.outputs["outliers"], record)
    log.info(
        "layer %d outlier density: %s",
        layer,
        ", ".join(f"m={m} {d:.5f}" for m, d in densities.items()),
    )
    return record


def allocate(ctx: StageContext) -> dict[str, Any]:
    """Per-layer sparsities of one target (any method with it), with what decided them."""
    cfg, info = ctx.cfg, ctx.model_info
    variant = _target_variant(cfg, ctx.wildcards["allocation"])
    outlier_jsons = ctx.inputs.get("outliers")
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
    atomic_write_json(ctx.outputs["allocation"], record)
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
        units = layer_units(cfg, checkpoint, layer)
        total = 0
        for unit in units.units.values():
            shape = specs[fam.layer_prefix.format(index=layer) + unit.tensor].shape
            rows = (unit.rows[1] - unit.rows[0]) if unit.rows else shape[-2]
            total += rows * shape[-1]
        out.append(total)
    return out


def _target_variant(cfg: RunConfig, target: str):
    """A variant with this non-uniform target (every method's share its allocation)."""
    return next(v for v in cfg.variants if v.target == target and not v.allocation.is_uniform)


def _allocations(plan) -> list[dict[str, str]]:
    return [{"allocation": target} for target in plan.allocations]


def _allocate_inputs(plan, w) -> dict:
    if plan.allocations[w["allocation"]].allocation.kind != alloc.OWL:
        return {}
    return {"outliers": [plan.layout.outliers(i) for i in range(plan.depth)]}


STAGES = (
    # OWL's dense statistics pass: the dense layer on the dense inputs, measuring its
    # outliers; its outputs are the next layer's dense inputs (the last layer's go unread).
    Stage(
        "outliers",
        outlier_statistics,
        outputs=lambda L, w: {
            "outliers": L.outliers(w["layer"]),
            "outputs": L.dense_outputs(w["layer"]),
        },
        estimate=lambda f: (
            3 * f.weights32 + 2 * f.acts,
            f.forward_flops / f.flops + f.io(3 * f.acts) + f.io(2 * f.layer * f.dbytes),
        ),
        wildcards=("layer",),
        steps=lambda plan: [{"layer": i} for i in range(plan.depth)] if plan.uses_outliers else [],
        inputs=lambda plan, w: {"inputs": plan.layout.inputs(DENSE, int(w["layer"]))},
        temporary=frozenset({"outputs"}),
        gpu=True,
        chain=True,
        # the forward, plus column norms and one matrix's scores (float64)
        gpu_memory=lambda g: g.weights + g.acts + 8.0 * g.big.rows * g.big.cols,
        writes=lambda s, name, w: s.inputs if name == "outputs" else s.block,
        disk={"outputs": "layer inputs"},
    ),
    # Per-layer sparsities of one non-uniform target, shared by every method.
    Stage(
        "allocate",
        allocate,
        outputs=lambda L, w: {"allocation": L.allocation(w["allocation"])},
        estimate=lambda f: (256 * MB, 5.0),
        wildcards=("allocation",),
        steps=_allocations,
        inputs=_allocate_inputs,
        threads=1,
    ),
)
