"""The layer chain: Hessians, ROSE order, pruning, and the next layer's inputs.

Per variant and decoder layer i: inputs_i -> hessians_i -> order_i -> pruned_i ->
inputs_{i+1}, where the forward step runs the *pruned* layer i on inputs_i.
Layer 0's inputs (the embeddings) and Hessians (the dense layer on them) are the
same for every variant, so they are made once (`embed_calibration`,
`shared_hessians`). Each step runs one decoder layer rebuilt from the checkpoint
on the calibration hidden states streamed from HDF5 (`rose.stages.layer_pass`),
so memory stays at one layer whatever the model size.

A routed expert's Hessians are built from the tokens the layer's own router
sends it (all tokens with `moe.calibrate_all_experts`), captured at the experts
module's input during the dense layer's forward; the layer output, which feeds
the next layer, always uses the real routing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rose import family
from rose.artifacts import (
    ArtifactError,
    H5StreamWriter,
    atomic_write_json,
    check_provenance,
    open_h5,
    read_json,
    read_pruned,
    write_h5,
    write_pruned,
)
from rose.config import Variant
from rose.device import available_memory, storage_dtype
from rose.handoff import Handoff
from rose.hessian import HessianWriter
from rose.layout import DENSE
from rose.methods import prune_weight, reconstruction_error
from rose.ordering import NaNScoresError, Ordering, rose_order
from rose.provenance import (
    allocation_provenance,
    hessians_provenance,
    layer_inputs_provenance,
    layer_provenance,
)
from rose.sizing import H5_OVERHEAD, ORDER_PER_LINEAR, STATS_PER_LINEAR, blocks
from rose.sparsity import Sparsity
from rose.stages.layer_pass import (
    HIDDEN,
    DenseLayer,
    build_module,
    hidden_batches,
    layer_units,
    log_progress,
    read_unit,
)
from rose.stages.spec import Stage, StageContext

log = logging.getLogger("rose")


# ---------------------------------------------------------------- Hessians


def _expert_passes(
    units: family.LayerUnits, widths: dict[str, int], budget: int
) -> list[list[int]]:
    """Experts per pass over the calibration inputs: all at once when their Hessians (float32,
    with the layer's other Hessians) fit in `budget` bytes, else as many as fit, at least one."""
    experts = list(range(units.num_experts))
    if not experts:
        return [[]]
    per_expert = {e: 0 for e in experts}
    other = 0
    for group in units.groups:
        size = 4 * widths[group[0]] ** 2
        unit = units.units[group[0]]
        if unit.expert is None:
            other += size
        else:
            per_expert[unit.expert] += size
    largest = max(per_expert.values())
    if other + sum(per_expert.values()) <= budget:
        return [experts]
    step = max(1, (budget - other) // largest) if budget > other else 1
    return [experts[i : i + step] for i in range(0, len(experts), step)]


def compute_hessians(ctx: StageContext, memory_budget: int | None = None) -> dict[str, Any]:
    """H = (2/N) sum X^T X for every input group of the dense layer.

    Routed experts: X holds the tokens the router sends the expert (all tokens with
    `moe.calibrate_all_experts`), for gate/up the block's input and for down
    act(gate(x)) * up(x); N is still the number of calibration sequences. When
    all expert Hessians do not fit in `memory_budget` bytes (default: half the
    device's free memory), the calibration inputs are run through the layer once per
    group of experts that fits, and each group's Hessians are written to the
    artifact and freed before the next. Returns {"passes", "experts_per_pass"}.

    Layer 0 (the shared_hessians step, no variant) reads the shared embeddings: one file
    serves every variant.
    """
    cfg, info, variant = ctx.cfg, ctx.model_info, ctx.variant
    layer = ctx.layer if variant is not None else 0
    all_tokens = cfg.moe.calibrate_all_experts
    dense = DenseLayer(
        ctx, layer, Path(ctx.inputs["inputs"]), layer_inputs_provenance(cfg, info, variant, layer)
    )
    units = dense.units
    if memory_budget is None:
        memory_budget = available_memory(ctx.device) // 2
    passes = _expert_passes(units, dense.widths, memory_budget)
    if len(passes) > 1:
        log.info(
            "layer %d hessians: %d experts' Hessians do not fit in %.1f GiB; %d passes of up to %d experts",
            layer,
            units.num_experts,
            memory_budget / 2**30,
            len(passes),
            len(passes[0]),
        )
    total_bytes = sum(4 * dense.widths[g[0]] ** 2 for g in units.groups)
    provenance = hessians_provenance(cfg, info, variant, layer)
    with HessianWriter(
        ctx.outputs["hessians"], provenance, total_bytes, handoff=ctx.handoff
    ) as writer:
        for number, chunk in enumerate(passes):
            groups = [
                g
                for g in units.groups
                if (units.units[g[0]].expert is None and number == 0)
                or units.units[g[0]].expert in chunk
            ]
            label = f"layer {layer} hessians" + (
                f" (pass {number + 1}/{len(passes)})" if len(passes) > 1 else ""
            )
            accumulators, routed = dense.accumulate(groups, chunk, label, all_tokens=all_tokens)
            for group in groups:  # written and freed one by one
                _write_hessian(
                    writer,
                    layer,
                    group,
                    units,
                    accumulators.pop(group[0]),
                    dense.sequences,
                    routed,
                    all_tokens,
                )
    return {"passes": len(passes), "experts_per_pass": len(passes[0])}


def _write_hessian(writer, layer, group, units, acc, sequences, routed, all_tokens) -> None:
    unit = units.units[group[0]]
    attrs: dict[str, Any] = {"linears": ",".join(group), "sequences": sequences}
    if acc.tokens == 0:
        # A routed expert no calibration token reached (calibrate_all_experts off): nothing
        # to weigh its inputs by, so H = I (SparseGPT then selects by magnitude per block).
        log.warning(
            "layer %d %s: no calibration token was routed to expert %d; pruned with H = identity",
            layer,
            group[0],
            unit.expert,
        )
        hessian = torch.eye(acc.columns)
        attrs["identity"] = True
    else:
        hessian = acc.finalize(sequences)
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(
            f"layer {layer} {group[0]}: the Hessian has NaN/Inf (diverging activations)"
        )
    if unit.expert is not None:
        attrs.update(
            expert=unit.expert,
            tokens=acc.tokens,
            routed_tokens=routed[unit.expert],
            calibrate_all_experts=all_tokens,
        )
    writer.write(group[0], hessian, attrs)


class _Hessians:
    """A layer's Hessians, read one group at a time as the units ask for them (units come
    group by group), so a mixture-of-experts layer's are never all in memory."""

    def __init__(
        self, path: str | Path, expected: dict[str, Any], device, handoff: Handoff | None = None
    ):
        self._art = open_h5(path, expected, handoff)
        self._device = device
        self._key: str | None = None
        self._value: torch.Tensor | None = None

    def get(self, key: str) -> torch.Tensor:
        if key != self._key:
            self._value = None
            self._value = torch.from_numpy(self._art.read(key)).to(self._device)
            self._key = key
        return self._value

    def attrs(self, key: str) -> dict[str, Any]:
        return self._art.dataset_attrs(key)

    def close(self) -> None:
        self._art.close()

    def __enter__(self) -> _Hessians:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- order and prune


def layer_sparsity(ctx: StageContext) -> Sparsity:
    """The target of the step's layer: the variant's own, or its entry in allocation.json."""
    variant, layer = ctx.variant, ctx.layer
    if variant.allocation.is_uniform:
        return variant.sparsity
    allocation_json = ctx.inputs.get("allocation")
    if allocation_json is None:
        raise ArtifactError(f"{variant.name} layer {layer}: its allocation file was not given")
    record = read_json(allocation_json)
    check_provenance(
        Path(allocation_json),
        record.get("provenance", {}),
        allocation_provenance(ctx.cfg, ctx.model_info, variant),
    )
    layers = record.get("layers", [])
    if layer >= len(layers):
        raise ArtifactError(f"{allocation_json}: no entry for layer {layer}")
    return Sparsity(fraction=float(layers[layer]["sparsity"]))


def compute_order(ctx: StageContext) -> None:
    """ROSE's column/block losses, relative range, columnar flag and permutation per unit."""
    cfg, info, variant, layer = ctx.cfg, ctx.model_info, ctx.variant, ctx.layer
    sparsity = layer_sparsity(ctx)
    units = layer_units(cfg, ctx.checkpoint, layer)
    prefix = ctx.family.layer_prefix.format(index=layer)
    reorder = cfg.prune.reorder if variant.base_method == "rose" else "never"
    datasets, group_attrs = {}, {}
    expected = hessians_provenance(cfg, info, variant, layer)
    with _Hessians(ctx.inputs["hessians"], expected, ctx.device, ctx.handoff) as hessians:
        for name in units.names():
            weight = read_unit(ctx.checkpoint, prefix, units.units[name]).to(ctx.device)
            hessian = hessians.get(units.group_of(name))
            try:
                order = rose_order(
                    weight,
                    hessian,
                    sparsity,
                    cfg.prune.blocksize,
                    cfg.prune.threshold,
                    reorder,
                    with_loss_map=True,  # one would-be-pruned selection for the order and the heatmap
                )
            except NaNScoresError as exc:
                raise ValueError(f"layer {layer} {name}: {exc} (ROSE ordering)") from None
            datasets[f"{name}/permutation"] = order.permutation
            datasets[f"{name}/block_widths"] = torch.tensor(order.block_widths, dtype=torch.int64)
            datasets[f"{name}/block_loss"] = order.block_loss
            datasets[f"{name}/column_loss"] = order.column_loss
            datasets[f"{name}/loss_map"] = order.loss_map
            group_attrs[name] = {
                "relative_range": order.relative_range,
                "columnar": bool(order.columnar),
                "reordered": bool(order.reordered),
                "threshold": order.threshold,
            }
    write_h5(
        ctx.outputs["order"],
        datasets,
        layer_provenance(cfg, info, "order", variant, layer),
        group_attrs=group_attrs,
        handoff=ctx.handoff,
    )


def _read_orders(ctx: StageContext, names: list[str]) -> dict[str, Ordering]:
    orders = {}
    expected = layer_provenance(ctx.cfg, ctx.model_info, "order", ctx.variant, ctx.layer)
    with open_h5(ctx.inputs["order"], expected, ctx.handoff) as art:
        for name in names:
            attrs = art.group_attrs(name)
            orders[name] = Ordering(
                permutation=torch.from_numpy(art.read(f"{name}/permutation")),
                block_widths=[int(w) for w in art.read(f"{name}/block_widths")],
                block_loss=torch.from_numpy(art.read(f"{name}/block_loss")),
                column_loss=torch.from_numpy(art.read(f"{name}/column_loss")),
                relative_range=float(attrs["relative_range"]),
                columnar=bool(attrs["columnar"]),
                reordered=bool(attrs["reordered"]),
                threshold=float(attrs["threshold"]),
            )
    return orders


def _write_back(
    checkpoint, prefix: str, units: family.LayerUnits, pruned: dict[str, torch.Tensor], layer: int
) -> dict[str, torch.Tensor]:
    """The pruned units as the checkpoint's own tensors: whole tensors as they are, an expert's
    slices put back into the stacked tensor they came from (every slice of it is a unit)."""
    out: dict[str, torch.Tensor] = {}
    for tensor, parts in units.tensors().items():
        if parts[0].index is None:
            out[tensor] = pruned[parts[0].name]
            continue
        stacked = checkpoint.read(prefix + tensor).clone()
        covered = torch.zeros(stacked.shape[:2], dtype=torch.int64)
        for unit in parts:
            rows = slice(*unit.rows) if unit.rows else slice(None)
            stacked[unit.index, rows] = pruned[unit.name].to(stacked.dtype)
            covered[unit.index, rows] += 1
        if not bool((covered == 1).all()):
            raise ValueError(
                f"layer {layer} {tensor}: the units do not cover every expert's rows exactly once"
            )
        out[tensor] = stacked.contiguous()
    return out


def prune_layer(ctx: StageContext) -> dict[str, Any]:
    """Prune every unit of one layer; write its weights (in the checkpoint's layout) and per-unit stats."""
    cfg, info, variant, layer = ctx.cfg, ctx.model_info, ctx.variant, ctx.layer
    sparsity = layer_sparsity(ctx)
    checkpoint = ctx.checkpoint
    units = layer_units(cfg, checkpoint, layer)
    hessians = (
        _Hessians(
            ctx.inputs["hessians"],
            hessians_provenance(cfg, info, variant, layer),
            ctx.device,
            ctx.handoff,
        )
        if variant.needs_hessian
        else None
    )
    orders = _read_orders(ctx, units.names()) if "order" in ctx.inputs else {}
    prefix = ctx.family.layer_prefix.format(index=layer)
    pruned: dict[str, torch.Tensor] = {}
    stats: dict[str, Any] = {}
    try:
        for name in units.names():
            unit = units.units[name]
            weight = read_unit(checkpoint, prefix, unit).to(ctx.device)
            group = units.group_of(name)
            hessian = hessians.get(group) if hessians is not None else None
            result = prune_weight(
                variant.method,
                weight,
                hessian,
                sparsity,
                cfg.prune,
                what=f"layer {layer} {name}",
                ordering=orders.get(name),
            )
            pruned[name] = result.weight.cpu().contiguous()
            order = result.ordering
            stats[name] = {
                "layer": layer,
                "name": name,
                "shape": list(weight.shape),
                "sparsity": result.sparsity,
                "relative_range": order.relative_range if order else None,
                "columnar": bool(order.columnar) if order else None,
                "reordered": bool(order.reordered) if order else False,
                "reconstruction_error": reconstruction_error(weight, result.weight, hessian)
                if hessian is not None
                else None,
                "seconds": result.seconds,
                "damping": result.damping,
                "damping_retries": result.damping_retries,
            }
            if result.unrefitted is not None:  # a refit: the method's own error, for the report
                stats[name]["reconstruction_error_before"] = reconstruction_error(
                    weight, result.unrefitted, hessian
                )
            if result.solver is not None:
                stats[name]["solver"] = result.solver.record()
            if unit.expert is not None:
                stats[name].update(
                    _expert_stats(layer, unit, weight, hessians.attrs(group) if hessians else None)
                )
            if result.damping_retries:
                log.warning(
                    "layer %d %s: Hessian needed percdamp %.3g", layer, name, result.damping
                )
    finally:
        if hessians is not None:
            hessians.close()
    provenance = layer_provenance(cfg, info, "pruned", variant, layer)
    written = _write_back(checkpoint, prefix, units, pruned, layer)
    # under the checkpoint's own names: the file is also a shard of the reassembled model
    write_pruned(
        ctx.outputs["pruned"],
        {prefix + name: tensor for name, tensor in written.items()},
        provenance,
        ctx.handoff,
    )
    # The sweep's float32 matmuls round differently with another thread count or device, so the
    # bytes are reproducible for the same (device, threads): recorded with every layer.
    numerics = {"device": str(ctx.device), "torch_threads": torch.get_num_threads()}
    atomic_write_json(
        ctx.outputs["stats"],
        {
            "provenance": provenance,
            "numerics": numerics,
            "target": _target(sparsity),
            "linears": stats,
        },
    )
    return stats


def _target(sparsity: Sparsity) -> float | str:
    """A layer's target as recorded: the fraction, or the N:M pattern."""
    return str(sparsity) if sparsity.is_nm else sparsity.fraction


def _expert_stats(
    layer: int, unit: family.Unit, weight: torch.Tensor, attrs: dict[str, Any] | None
) -> dict[str, Any]:
    """Where a routed expert's matrix lives and how many calibration tokens its Hessian saw."""
    out: dict[str, Any] = {"expert": unit.expert, "tensor": unit.tensor}
    if unit.index is not None:
        out["slice"] = [unit.index, *(unit.rows or (0, weight.shape[0]))]
    if attrs is not None:
        tokens = int(attrs["tokens"])
        # Only routed tokens (calibrate_all_experts off): fewer than the matrix has inputs
        # leaves H singular but for the damping, which is raised as needed (damping_retries).
        undersampled = not bool(attrs["calibrate_all_experts"]) and tokens < weight.shape[1]
        out.update(
            routed_tokens=int(attrs["routed_tokens"]),
            hessian_tokens=tokens,
            undersampled=undersampled,
            identity_hessian=bool(attrs.get("identity", False)),
        )
        if undersampled:
            log.warning(
                "layer %d %s: %d tokens were routed to expert %d, fewer than the %d inputs of this matrix",
                layer,
                unit.name,
                tokens,
                unit.expert,
                weight.shape[1],
            )
    return out


# ---------------------------------------------------------------- the next layer's inputs


def forward_layer(ctx: StageContext) -> None:
    """Run the calibration inputs through the pruned layer i - 1: layer i's inputs."""
    cfg, info, variant = ctx.cfg, ctx.model_info, ctx.variant
    layer = ctx.layer - 1
    pruned = read_pruned(
        ctx.inputs["pruned"], layer_provenance(cfg, info, "pruned", variant, layer), ctx.handoff
    )
    prefix = ctx.family.layer_prefix.format(index=layer)  # (files of older runs lack it)
    module = build_module(
        ctx, layer, replace={n.removeprefix(prefix): t for n, t in pruned.items()}
    )
    expected = layer_inputs_provenance(cfg, info, variant, layer)
    artifact, batches = hidden_batches(
        Path(ctx.inputs["inputs"]), expected, cfg.calibration.batch_size, ctx.handoff
    )
    shape = artifact.shape(HIDDEN)
    started, done = time.perf_counter(), 0
    try:
        attrs = layer_provenance(cfg, info, "layer-inputs", variant, layer + 1)
        with (
            H5StreamWriter(
                ctx.outputs["inputs"],
                HIDDEN,
                shape,
                storage_dtype(ctx.dtype),
                attrs,
                handoff=ctx.handoff,
            ) as writer,
            torch.no_grad(),
        ):
            for batch in batches:
                out = family.layer_forward(
                    module, ctx.checkpoint.config, batch.to(ctx.device, ctx.dtype)
                )
                if not bool(torch.isfinite(out).all()):
                    raise ValueError(f"layer {layer}: the pruned layer's outputs contain NaN/Inf")
                writer.write(out)
                done += batch.shape[0]
                log_progress(f"layer {layer} forward", done, shape[0], started)
    finally:
        artifact.close()


# ---------------------------------------------------------------- the records


def _variant_layers(first: int, has: Callable[[Variant], bool] = lambda v: True):
    """Steps of every variant whose chain `has` the stage, layers first..depth-1."""

    def steps(plan):
        return [
            {"variant": v.name, "layer": layer}
            for v in plan.variants.values()
            if has(v)
            for layer in range(first, plan.depth)
        ]

    return steps


def _with_allocation(plan, w, inputs: dict) -> dict:
    variant = plan.variants[w["variant"]]
    if not variant.allocation.is_uniform:
        inputs["allocation"] = plan.layout.allocation(variant.target)
    return inputs


def _prune_inputs(plan, w) -> dict:
    variant, layer = plan.variants[w["variant"]], int(w["layer"])
    inputs = {}
    if variant.needs_hessian:
        inputs["hessians"] = plan.layout.hessians(variant.name, layer)
    if variant.needs_order:
        inputs["order"] = plan.layout.order(variant.name, layer)
    return _with_allocation(plan, w, inputs)


def _hessians_bytes(s, name, w) -> float:
    layer = s.layer(w)
    return blocks(4 * layer.hessian_elements + H5_OVERHEAD + len(layer.groups()) * 1024)


def _order_bytes(s, name, w) -> float:
    total = H5_OVERHEAD
    for lin in s.layer(w).linears:
        n = -(-lin.cols // s.cfg.prune.blocksize)
        total += 16 * lin.cols + 16 * n + 4 * min(64, lin.rows) * n + ORDER_PER_LINEAR
    return blocks(total)


def _pruned_bytes(s, name, w) -> float:
    if name == "stats":
        return blocks(STATS_PER_LINEAR * len(s.layer(w).linears) + 1024)
    return s.pruned_layer(int(w["layer"]))


def _hessians_estimate(f) -> tuple[float, float]:
    host = 2 * f.weights32 + f.acts + f.hess
    return host, (f.forward_flops + f.tokens * f.hessian_token_flops) / f.flops + f.io(2 * f.acts)


def _hessians_gpu(g) -> float:
    return g.weights + g.acts + g.hess + g.batch_tokens * g.widest_in * 4


HESSIANS_DISK = {"hessians": "Hessians"}  # the category rose.preflight reports its size by

# What the two Hessian stages share: the call, its sizes, and that the Hessians go once pruned.
_HESSIANS = dict(
    estimate=_hessians_estimate,
    temporary=frozenset({"hessians"}),
    gpu=True,
    chain=True,
    gpu_memory=_hessians_gpu,
    writes=_hessians_bytes,
    disk=HESSIANS_DISK,
)

STAGES = (
    # Layer 0's Hessians: the dense layer on the shared embeddings, the same for every variant.
    Stage(
        "shared_hessians",
        compute_hessians,
        outputs=lambda L, w: {"hessians": L.shared_hessians},
        steps=lambda plan: [{}] if any(v.needs_hessian for v in plan.variants.values()) else [],
        inputs=lambda plan, w: {"inputs": plan.layout.inputs(DENSE, 0)},
        **_HESSIANS,
    ),
    Stage(
        "hessians",
        compute_hessians,
        outputs=lambda L, w: {"hessians": L.variant_hessians(w["variant"], w["layer"])},
        wildcards=("variant", "layer"),
        steps=_variant_layers(1, lambda v: v.needs_hessian),
        inputs=lambda plan, w: {"inputs": plan.layout.inputs(w["variant"], int(w["layer"]))},
        **_HESSIANS,
    ),
    Stage(
        "order",
        compute_order,
        outputs=lambda L, w: {"order": L.order(w["variant"], w["layer"])},
        estimate=lambda f: (
            2 * f.weights32 + 2 * f.hess,
            f.sweep_flops / f.flops + f.io(2 * f.hess),
        ),
        wildcards=("variant", "layer"),
        steps=_variant_layers(0, lambda v: v.needs_order),
        inputs=lambda plan, w: _with_allocation(
            plan, w, {"hessians": plan.layout.hessians(w["variant"], int(w["layer"]))}
        ),
        gpu=True,
        chain=True,
        gpu_memory=lambda g: g.hess + 4.0 * 4 * g.big.rows * g.big.cols,
        writes=_order_bytes,
        disk={"order": "order files"},
    ),
    Stage(
        "prune",
        prune_layer,
        outputs=lambda L, w: {
            "pruned": L.pruned(w["variant"], w["layer"]),
            "stats": L.stats(w["variant"], w["layer"]),
        },
        # ADMM variants: the solve's passes (f.solver_units sweeps), its factor and buffers
        estimate=lambda f: (
            3 * f.weights32 + 2 * f.hess + (f.hess / 2 + 6 * f.weights32 if f.solver_units else 0),
            (2 + f.solver_units) * f.sweep_flops / f.flops + f.io(2 * f.hess),
        ),
        wildcards=("variant", "layer"),
        steps=_variant_layers(0),
        inputs=_prune_inputs,
        gpu=True,
        chain=True,
        gpu_memory=lambda g: (
            g.hess
            + g.big.rows * g.big.cols * (g.cbytes + 3 * 4 + 1)
            + 5.0 * 4 * g.big.cols**2
            + g.solver
        ),
        writes=_pruned_bytes,
        disk={"pruned": "pruned layers"},
    ),
    # The pruned layer i-1 run on its inputs: layer i's inputs (layer >= 1; layer 0 is the embedding).
    Stage(
        "forward",
        forward_layer,
        outputs=lambda L, w: {"inputs": L.forward_inputs(w["variant"], w["layer"])},
        estimate=lambda f: (
            2 * f.weights32 + 2 * f.acts,
            f.forward_flops / f.flops + f.io(3 * f.acts),
        ),
        wildcards=("variant", "layer"),
        steps=_variant_layers(1, lambda v: v.needs_hessian),
        inputs=lambda plan, w: {
            "inputs": plan.layout.inputs(w["variant"], int(w["layer"]) - 1),
            "pruned": plan.layout.pruned(w["variant"], int(w["layer"]) - 1),
        },
        temporary=frozenset({"inputs"}),
        gpu=True,
        chain=True,
        gpu_memory=lambda g: g.weights + g.acts,
        writes=lambda s, name, w: s.inputs,
        disk={"inputs": "layer inputs"},
    ),
)
