"""The four per-layer stages: Hessians, ROSE order, pruning, and the next layer's inputs.

Each runs one decoder layer rebuilt from the checkpoint (never the whole
model) on the calibration hidden states streamed from HDF5, so memory stays
at one layer whatever the model size.

What a layer prunes is its units (`family.LayerUnits`): each Linear, and in a
mixture-of-experts layer each routed expert's gate, up and down matrices (slices
of transformers' stacked parameters or the checkpoint's per-expert tensors).
A routed expert's Hessians are built from the tokens the layer's own router
sends it (all tokens with `moe.calibrate_all_experts`), captured at the experts
module's input during the dense layer's forward; the layer output, which feeds
the next layer, always uses the real routing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rose import family
from rose.artifacts import (
    ArtifactError,
    H5Artifact,
    H5StreamWriter,
    MemoryH5,
    atomic_write_json,
    check_provenance,
    open_h5,
    prefetch,
    read_json,
    read_pruned,
    write_h5,
    write_pruned,
)
from rose.config import RunConfig, Variant
from rose.device import compute_dtype, resolve_device, storage_dtype
from rose.handoff import Handoff
from rose.hessian import HessianAccumulator, HessianWriter, available_memory
from rose.methods import NEEDS_HESSIAN, prune_weight, reconstruction_error
from rose.model_info import ModelInfo, open_model
from rose.ordering import NaNScoresError, Ordering, rose_order
from rose.provenance import (
    allocation_provenance,
    hessians_provenance,
    layer_inputs_provenance,
    layer_provenance,
)
from rose.sparsity import Sparsity
from rose.stages.calibration import HIDDEN

log = logging.getLogger("rose")


@dataclass(frozen=True)
class MoeSettings:
    """The `moe:` section of the config (mixture-of-experts models only)."""

    # Every expert's Hessians from all calibration tokens (llm-compressor's default), so
    # rarely chosen experts are not pruned blind; the layer output still uses the real routing.
    calibrate_all_experts: bool = True
    # Prune the router gates (`mlp.gate`, Qwen2-MoE's `shared_expert_gate`) too.
    prune_router: bool = False


def moe_settings(cfg: RunConfig) -> MoeSettings:
    """The one place the `moe:` settings are read (defaults for a config without the section)."""
    raw = cfg.raw.get("moe") or {}
    defaults = MoeSettings()
    return MoeSettings(
        calibrate_all_experts=bool(
            raw.get("calibrate_all_experts", defaults.calibrate_all_experts)
        ),
        prune_router=bool(raw.get("prune_router", defaults.prune_router)),
    )


def layer_units(cfg: RunConfig, checkpoint, fam: family.Family, layer: int) -> family.LayerUnits:
    """What layer `layer` prunes, named as the checkpoint names its tensors."""
    names = checkpoint.layer_names(fam.layer_prefix.format(index=layer))
    return family.layer_units(checkpoint.config, layer, names, moe_settings(cfg).prune_router)


def read_unit(checkpoint, prefix: str, unit: family.Unit) -> torch.Tensor:
    """A unit's weight [out, in] from the checkpoint (one expert's slice of a stacked tensor)."""
    if unit.index is None:
        return checkpoint.read(prefix + unit.tensor)
    return checkpoint.read_slice(prefix + unit.tensor, unit.index, unit.rows)


def _layer_context(cfg: RunConfig, model_json: str | Path, variant_name: str | None):
    """What a stage that runs a decoder layer needs: model info, variant (None: the dense
    layer on the shared inputs), device, dtype, weights, family."""
    info = ModelInfo.load(model_json)
    variant = cfg.variant(variant_name) if variant_name is not None else None
    device = resolve_device(cfg.device)
    dtype = compute_dtype(cfg, info, device)
    checkpoint, fam = open_model(info)
    return info, variant, device, dtype, checkpoint, fam


def _layer_module(
    checkpoint, fam, layer: int, device, dtype, replace: dict[str, torch.Tensor] | None = None
):
    tensors = checkpoint.read_prefix(fam.layer_prefix.format(index=layer))
    for name, tensor in (replace or {}).items():
        if name not in tensors:
            raise ArtifactError(f"layer {layer}: pruned tensor {name} is not part of the model")
        if tuple(tensor.shape) != tuple(tensors[name].shape):
            raise ArtifactError(
                f"layer {layer}: pruned {name} has shape {tuple(tensor.shape)}, "
                f"the model has {tuple(tensors[name].shape)}"
            )
        tensors[name] = tensor
    return family.build_layer(checkpoint.config, layer, tensors, device=device, dtype=dtype)


def _hidden_batches(
    path: Path, expected: dict[str, Any], batch: int, handoff: Handoff | None = None
) -> tuple[H5Artifact | MemoryH5, Iterator[torch.Tensor]]:
    artifact = open_h5(path, expected, handoff)
    return artifact, prefetch(artifact.iter_tensors(HIDDEN, batch))


def _log_progress(stage: str, done: int, total: int, started: float) -> None:
    elapsed = time.perf_counter() - started
    eta = elapsed / max(done, 1) * (total - done)
    log.info("%s: %d/%d samples, %.1fs elapsed, ETA %.1fs", stage, done, total, elapsed, eta)


def _module_weight(module: torch.nn.Module, unit: family.Unit) -> torch.Tensor:
    """A unit's weight inside the built layer (transformers' names and layout)."""
    if unit.expert is None:
        return module.get_submodule(unit.module).weight
    experts = module.get_submodule(family.EXPERTS)
    if unit.part == "down":
        return experts.down_proj[unit.expert]
    inter = experts.gate_up_proj.shape[1] // 2
    return (
        experts.gate_up_proj[unit.expert, :inter]
        if unit.part == "gate"
        else experts.gate_up_proj[unit.expert, inter:]
    )


def _expert_intermediate(experts: torch.nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """act(gate(x)) * up(x) of one expert: the input of its down projection, computed with the
    experts module's own gating function (the one its forward applies)."""
    gate_up = torch.nn.functional.linear(x, experts.gate_up_proj[expert])
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


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


def compute_hessians(
    cfg: RunConfig,
    model_json: str | Path,
    variant_name: str | None,
    layer: int,
    inputs_h5: str | Path,
    out_h5: str | Path,
    memory_budget: int | None = None,
    handoff: Handoff | None = None,
) -> dict[str, Any]:
    """H = (2/N) sum X^T X for every input group of the dense layer.

    Routed experts: X holds the tokens the router sends the expert (all tokens with
    `moe.calibrate_all_experts`), for gate/up the block's input and for down
    act(gate(x)) * up(x); N is still the number of calibration sequences. When
    all expert Hessians do not fit in `memory_budget` bytes (default: half the
    device's free memory), the calibration inputs are run through the layer once per
    group of experts that fits, and each group's Hessians are written to the
    artifact and freed before the next. Returns {"passes", "experts_per_pass"}.

    Layer 0 (`variant_name` None) reads the shared embeddings: one file serves every variant.
    """
    info, variant, device, dtype, checkpoint, fam = _layer_context(cfg, model_json, variant_name)
    settings = moe_settings(cfg)
    units = layer_units(cfg, checkpoint, fam, layer)
    module = _layer_module(checkpoint, fam, layer, device, dtype)
    widths: dict[str, int] = {}
    for name in units.names():
        weight = _module_weight(module, units.units[name])
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"layer {layer} {name}: the weight has NaN/Inf (corrupt checkpoint)")
        widths[name] = weight.shape[1]
    if memory_budget is None:
        memory_budget = available_memory(device) // 2
    passes = _expert_passes(units, widths, memory_budget)
    expected = layer_inputs_provenance(cfg, info, variant, layer)
    with open_h5(Path(inputs_h5), expected, handoff) as probe:
        total = probe.shape(HIDDEN)[0]
    if len(passes) > 1:
        log.info(
            "layer %d hessians: %d experts' Hessians do not fit in %.1f GiB; %d passes of up to %d experts",
            layer,
            units.num_experts,
            memory_budget / 2**30,
            len(passes),
            len(passes[0]),
        )
    total_bytes = sum(4 * widths[g[0]] ** 2 for g in units.groups)
    provenance = hessians_provenance(cfg, info, variant, layer)
    routed = [0] * units.num_experts
    with HessianWriter(out_h5, provenance, total_bytes, handoff=handoff) as writer:
        for number, chunk in enumerate(passes):
            groups = [
                g
                for g in units.groups
                if (units.units[g[0]].expert is None and number == 0)
                or units.units[g[0]].expert in chunk
            ]
            accumulators = _hessian_pass(
                cfg,
                module,
                checkpoint.config,
                units,
                groups,
                chunk,
                widths,
                routed,
                settings,
                device,
                dtype,
                Path(inputs_h5),
                expected,
                f"layer {layer} hessians"
                + (f" (pass {number + 1}/{len(passes)})" if len(passes) > 1 else ""),
                total,
                handoff=handoff,
            )
            for group in groups:  # written and freed one by one
                _write_hessian(
                    writer, layer, group, units, accumulators.pop(group[0]), total, routed, settings
                )
    return {"passes": len(passes), "experts_per_pass": len(passes[0])}


def _hessian_pass(
    cfg,
    module,
    config,
    units,
    groups,
    chunk,
    widths,
    routed,
    settings,
    device,
    dtype,
    inputs_h5,
    expected,
    stage,
    total,
    make_accumulator=None,
    on_output=None,
    handoff: Handoff | None = None,
) -> dict[str, Any]:
    """One pass of the calibration inputs through the dense layer, accumulating `groups`' Hessians
    (the routed experts in `chunk`, counting their routed tokens into `routed`).

    `make_accumulator(columns, device=...)` collects something else from the same inputs (the
    OWL pass: column norms); `on_output(batch)` receives the layer's outputs."""
    make_accumulator = make_accumulator or HessianAccumulator
    accumulators = {g[0]: make_accumulator(widths[g[0]], device=device) for g in groups}
    hooks = []
    for group in groups:
        unit = units.units[group[0]]
        if unit.expert is None:
            acc = accumulators[group[0]]
            hooks.append(
                module.get_submodule(unit.module).register_forward_pre_hook(
                    lambda _m, args, acc=acc: acc.add_rows(args[0].float())
                )
            )
    if chunk:
        ins = {e: accumulators[units.group_of(_expert_unit(units, e, "gate"))] for e in chunk}
        mids = {e: accumulators[units.group_of(_expert_unit(units, e, "down"))] for e in chunk}

        def capture(experts, args, kwargs):
            # the experts module's call: the block's input and the router's real choice
            x = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            chosen = torch.stack([(index == e).any(dim=-1) for e in chunk])  # [experts, tokens]
            for e, mask, count in zip(chunk, chosen, chosen.sum(dim=-1).tolist(), strict=True):
                routed[e] += count
                xe = x if settings.calibrate_all_experts else x[mask]
                if xe.shape[0]:
                    ins[e].add_rows(xe.float())
                    mids[e].add_rows(_expert_intermediate(experts, e, xe).float())

        hooks.append(
            module.get_submodule(family.EXPERTS).register_forward_pre_hook(
                capture, with_kwargs=True
            )
        )
    artifact, batches = _hidden_batches(inputs_h5, expected, cfg.calibration.batch_size, handoff)
    started, done = time.perf_counter(), 0
    try:
        with torch.no_grad():
            for batch in batches:
                out = family.layer_forward(module, config, batch.to(device, dtype))
                if on_output is not None:
                    on_output(out)
                done += batch.shape[0]
                _log_progress(stage, done, total, started)
    finally:
        for hook in hooks:
            hook.remove()
        artifact.close()
    if done != total:
        raise ArtifactError(f"{inputs_h5}: {done} of {total} sequences could be read")
    return accumulators


def _expert_unit(units: family.LayerUnits, expert: int, part: str) -> str:
    for name, unit in units.units.items():
        if unit.expert == expert and unit.part == part:
            return name
    raise KeyError(f"expert {expert} {part}")


def _write_hessian(writer, layer, group, units, acc, sequences, routed, settings) -> None:
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
            calibrate_all_experts=settings.calibrate_all_experts,
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


def layer_sparsity(
    cfg: RunConfig,
    info: ModelInfo,
    variant: Variant,
    layer: int,
    allocation_json: str | Path | None,
) -> Sparsity:
    """The target of one layer: the variant's own, or its entry in allocation.json."""
    if variant.allocation.is_uniform:
        return variant.sparsity
    if allocation_json is None:
        raise ArtifactError(f"{variant.name} layer {layer}: its allocation file was not given")
    record = read_json(allocation_json)
    check_provenance(
        Path(allocation_json),
        record.get("provenance", {}),
        allocation_provenance(cfg, info, variant),
    )
    layers = record.get("layers", [])
    if layer >= len(layers):
        raise ArtifactError(f"{allocation_json}: no entry for layer {layer}")
    return Sparsity(fraction=float(layers[layer]["sparsity"]))


def compute_order(
    cfg: RunConfig,
    model_json: str | Path,
    variant_name: str,
    layer: int,
    hessians_h5: str | Path,
    out_h5: str | Path,
    allocation_json: str | Path | None = None,
    handoff: Handoff | None = None,
) -> None:
    """ROSE's column/block losses, relative range, columnar flag and permutation per unit."""
    info = ModelInfo.load(model_json)
    variant = cfg.variant(variant_name)
    sparsity = layer_sparsity(cfg, info, variant, layer, allocation_json)
    device = resolve_device(cfg.device)
    checkpoint, fam = open_model(info)
    units = layer_units(cfg, checkpoint, fam, layer)
    prefix = fam.layer_prefix.format(index=layer)
    reorder = cfg.prune.reorder if variant.method == "rose" else "never"
    datasets, group_attrs = {}, {}
    expected = hessians_provenance(cfg, info, variant, layer)
    with _Hessians(hessians_h5, expected, device, handoff) as hessians:
        for name in units.names():
            weight = read_unit(checkpoint, prefix, units.units[name]).to(device)
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
        out_h5,
        datasets,
        layer_provenance(cfg, info, "order", variant, layer),
        group_attrs=group_attrs,
        handoff=handoff,
    )


def _read_orders(cfg, info, variant, layer, names, order_h5, handoff) -> dict[str, Ordering]:
    orders = {}
    expected = layer_provenance(cfg, info, "order", variant, layer)
    with open_h5(order_h5, expected, handoff) as art:
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


def prune_layer(
    cfg: RunConfig,
    model_json: str | Path,
    variant_name: str,
    layer: int,
    hessians_h5: str | Path | None,
    order_h5: str | Path | None,
    out_safetensors: str | Path,
    out_stats: str | Path,
    allocation_json: str | Path | None = None,
    handoff: Handoff | None = None,
) -> dict[str, Any]:
    """Prune every unit of one layer; write its weights (in the checkpoint's layout) and per-unit stats."""
    info = ModelInfo.load(model_json)
    variant = cfg.variant(variant_name)
    sparsity = layer_sparsity(cfg, info, variant, layer, allocation_json)
    device = resolve_device(cfg.device)
    checkpoint, fam = open_model(info)
    units = layer_units(cfg, checkpoint, fam, layer)
    needs_hessian = variant.method in NEEDS_HESSIAN
    hessians = (
        _Hessians(hessians_h5, hessians_provenance(cfg, info, variant, layer), device, handoff)
        if needs_hessian
        else None
    )
    orders = (
        _read_orders(cfg, info, variant, layer, units.names(), order_h5, handoff)
        if order_h5
        else {}
    )
    prefix = fam.layer_prefix.format(index=layer)
    pruned: dict[str, torch.Tensor] = {}
    stats: dict[str, Any] = {}
    try:
        for name in units.names():
            unit = units.units[name]
            weight = read_unit(checkpoint, prefix, unit).to(device)
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
    write_pruned(
        out_safetensors, _write_back(checkpoint, prefix, units, pruned, layer), provenance, handoff
    )
    # The sweep's float32 matmuls round differently with another thread count or device, so the
    # bytes are reproducible for the same (device, threads): recorded with every layer.
    numerics = {"device": str(device), "torch_threads": torch.get_num_threads()}
    atomic_write_json(
        out_stats,
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


def forward_layer(
    cfg: RunConfig,
    model_json: str | Path,
    variant_name: str,
    layer: int,
    inputs_h5: str | Path,
    pruned_safetensors: str | Path,
    out_h5: str | Path,
    handoff: Handoff | None = None,
) -> None:
    """Run the calibration inputs through the pruned layer: the next layer's inputs."""
    info, variant, device, dtype, checkpoint, fam = _layer_context(cfg, model_json, variant_name)
    pruned = read_pruned(
        pruned_safetensors, layer_provenance(cfg, info, "pruned", variant, layer), handoff
    )
    module = _layer_module(checkpoint, fam, layer, device, dtype, replace=pruned)
    expected = layer_inputs_provenance(cfg, info, variant, layer)
    artifact, batches = _hidden_batches(
        Path(inputs_h5), expected, cfg.calibration.batch_size, handoff
    )
    shape = artifact.shape(HIDDEN)
    started, done = time.perf_counter(), 0
    try:
        attrs = layer_provenance(cfg, info, "layer-inputs", variant, layer + 1)
        with (
            H5StreamWriter(
                out_h5, HIDDEN, shape, storage_dtype(dtype), attrs, handoff=handoff
            ) as writer,
            torch.no_grad(),
        ):
            for batch in batches:
                out = family.layer_forward(module, checkpoint.config, batch.to(device, dtype))
                if not bool(torch.isfinite(out).all()):
                    raise ValueError(f"layer {layer}: the pruned layer's outputs contain NaN/Inf")
                writer.write(out)
                done += batch.shape[0]
                _log_progress(f"layer {layer} forward", done, shape[0], started)
    finally:
        artifact.close()
