"""The four per-layer stages: Hessians, ROSE order, pruning, and the next layer's inputs.

Each runs one decoder layer rebuilt from the checkpoint (never the whole
model) on the calibration hidden states streamed from HDF5, so memory stays
at one layer whatever the model size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rose import family
from rose.artifacts import (
    ArtifactError,
    H5Artifact,
    H5StreamWriter,
    atomic_write_json,
    prefetch,
    read_pruned,
    write_h5,
    write_pruned,
)
from rose.config import RunConfig
from rose.device import compute_dtype, resolve_device, storage_dtype
from rose.hessian import HessianAccumulator
from rose.methods import NEEDS_HESSIAN, prune_weight, reconstruction_error
from rose.model_info import ModelInfo, open_model
from rose.ordering import Ordering, loss_map, rose_order
from rose.provenance import layer_inputs_provenance, layer_provenance
from rose.stages.calibration import HIDDEN

log = logging.getLogger("rose")



def _layer_context(cfg: RunConfig, model_json: str | Path, variant_name: str):
    """What a stage that runs a decoder layer needs: model info, variant, device, dtype, weights, family."""
    info = ModelInfo.load(model_json)
    variant = cfg.variant(variant_name)
    device = resolve_device(cfg.device)
    dtype = compute_dtype(cfg, info, device)
    checkpoint, fam = open_model(info)
    return info, variant, device, dtype, checkpoint, fam


def _layer_module(checkpoint, fam, layer: int, device, dtype, replace: dict[str, torch.Tensor] | None = None):
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


def _hidden_batches(path: Path, expected: dict[str, Any], batch: int) -> tuple[H5Artifact, Iterator[np.ndarray]]:
    artifact = H5Artifact(path, expected)
    return artifact, prefetch(artifact.iter_batches(HIDDEN, batch))


def _log_progress(stage: str, done: int, total: int, started: float) -> None:
    elapsed = time.perf_counter() - started
    eta = elapsed / max(done, 1) * (total - done)
    log.info("%s: %d/%d samples, %.1fs elapsed, ETA %.1fs", stage, done, total, elapsed, eta)


def compute_hessians(
    cfg: RunConfig, model_json: str | Path, variant_name: str, layer: int, inputs_h5: str | Path, out_h5: str | Path
) -> None:
    """H = (2/N) sum X^T X for every input group of the dense layer."""
    info, variant, device, dtype, checkpoint, fam = _layer_context(cfg, model_json, variant_name)
    module = _layer_module(checkpoint, fam, layer, device, dtype)
    for name in fam.linear_names():
        if not bool(torch.isfinite(module.get_submodule(name).weight).all()):
            raise ValueError(f"layer {layer} {name}: the weight has NaN/Inf (corrupt checkpoint)")
    accumulators: dict[str, HessianAccumulator] = {}
    hooks = []
    for group in fam.input_groups:
        linear = module.get_submodule(group[0])
        acc = HessianAccumulator(linear.in_features, device=device)
        accumulators[group[0]] = acc
        hooks.append(linear.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0].float())))
    expected = layer_inputs_provenance(cfg, info, variant, layer)
    artifact, batches = _hidden_batches(Path(inputs_h5), expected, cfg.calibration.batch_size)
    started, done, total = time.perf_counter(), 0, artifact.shape(HIDDEN)[0]
    try:
        with torch.no_grad():
            for batch in batches:
                family.layer_forward(module, checkpoint.config, torch.from_numpy(batch).to(device, dtype))
                done += batch.shape[0]
                _log_progress(f"layer {layer} hessians", done, total, started)
    finally:
        for hook in hooks:
            hook.remove()
        artifact.close()
    datasets, dataset_attrs = {}, {}
    for group in fam.input_groups:
        hessian = accumulators[group[0]].finalize()
        if not bool(torch.isfinite(hessian).all()):
            raise ValueError(f"layer {layer} {group[0]}: the Hessian has NaN/Inf (diverging activations)")
        datasets[group[0]] = hessian
        dataset_attrs[group[0]] = {"linears": ",".join(group), "sequences": accumulators[group[0]].sequences}
    write_h5(out_h5, datasets, layer_provenance(cfg, info, "hessians", variant, layer), dataset_attrs)


def _hessian_for(fam: family.Family, name: str) -> str:
    for group in fam.input_groups:
        if name in group:
            return group[0]
    raise KeyError(name)


def _read_hessians(cfg, info, variant, layer, fam, hessians_h5, device) -> dict[str, torch.Tensor]:
    with H5Artifact(hessians_h5, layer_provenance(cfg, info, "hessians", variant, layer)) as art:
        return {g[0]: torch.from_numpy(art.read(g[0])).to(device) for g in fam.input_groups}


def compute_order(
    cfg: RunConfig, model_json: str | Path, variant_name: str, layer: int, hessians_h5: str | Path, out_h5: str | Path
) -> None:
    """ROSE's column/block losses, relative range, columnar flag and permutation per Linear."""
    info = ModelInfo.load(model_json)
    variant = cfg.variant(variant_name)
    device = resolve_device(cfg.device)
    checkpoint, fam = open_model(info)
    hessians = _read_hessians(cfg, info, variant, layer, fam, hessians_h5, device)
    prefix = fam.layer_prefix.format(index=layer)
    reorder = cfg.prune.reorder if variant.method == "rose" else "never"
    datasets, group_attrs = {}, {}
    for name in fam.linear_names():
        weight = checkpoint.read(prefix + name + ".weight").to(device)
        order = rose_order(
            weight, hessians[_hessian_for(fam, name)], variant.sparsity, cfg.prune.blocksize, cfg.prune.threshold, reorder
        )
        datasets[f"{name}/permutation"] = order.permutation
        datasets[f"{name}/block_widths"] = torch.tensor(order.block_widths, dtype=torch.int64)
        datasets[f"{name}/block_loss"] = order.block_loss
        datasets[f"{name}/column_loss"] = order.column_loss
        datasets[f"{name}/loss_map"] = loss_map(
            weight, hessians[_hessian_for(fam, name)], variant.sparsity, cfg.prune.blocksize
        )
        group_attrs[name] = {
            "relative_range": order.relative_range,
            "columnar": bool(order.columnar),
            "reordered": bool(order.reordered),
            "threshold": order.threshold,
        }
    write_h5(out_h5, datasets, layer_provenance(cfg, info, "order", variant, layer), group_attrs=group_attrs)


def _read_orders(cfg, info, variant, layer, fam, order_h5) -> dict[str, Ordering]:
    orders = {}
    with H5Artifact(order_h5, layer_provenance(cfg, info, "order", variant, layer)) as art:
        for name in fam.linear_names():
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


def prune_layer(
    cfg: RunConfig,
    model_json: str | Path,
    variant_name: str,
    layer: int,
    hessians_h5: str | Path | None,
    order_h5: str | Path | None,
    out_safetensors: str | Path,
    out_stats: str | Path,
) -> dict[str, Any]:
    """Prune every Linear of one layer; write its weights and per-Linear stats."""
    info = ModelInfo.load(model_json)
    variant = cfg.variant(variant_name)
    device = resolve_device(cfg.device)
    checkpoint, fam = open_model(info)
    needs_hessian = variant.method in NEEDS_HESSIAN
    hessians = _read_hessians(cfg, info, variant, layer, fam, hessians_h5, device) if needs_hessian else {}
    orders = _read_orders(cfg, info, variant, layer, fam, order_h5) if order_h5 else {}
    prefix = fam.layer_prefix.format(index=layer)
    pruned: dict[str, torch.Tensor] = {}
    stats: dict[str, Any] = {}
    for name in fam.linear_names():
        weight = checkpoint.read(prefix + name + ".weight").to(device)
        hessian = hessians.get(_hessian_for(fam, name))
        result = prune_weight(
            variant.method,
            weight,
            hessian,
            variant.sparsity,
            cfg.prune,
            what=f"layer {layer} {name}",
            ordering=orders.get(name),
        )
        pruned[name + ".weight"] = result.weight.cpu().contiguous()
        order = result.ordering
        stats[name] = {
            "layer": layer,
            "name": name,
            "shape": list(weight.shape),
            "sparsity": result.sparsity,
            "relative_range": order.relative_range if order else None,
            "columnar": bool(order.columnar) if order else None,
            "reordered": bool(order.reordered) if order else False,
            "reconstruction_error": reconstruction_error(weight, result.weight, hessian) if hessian is not None else None,
            "seconds": result.seconds,
            "damping": result.damping,
            "damping_retries": result.damping_retries,
        }
        if result.damping_retries:
            log.warning("layer %d %s: Hessian needed percdamp %.3g", layer, name, result.damping)
    provenance = layer_provenance(cfg, info, "pruned", variant, layer)
    write_pruned(out_safetensors, pruned, provenance)
    # The sweep's float32 matmuls round differently with another thread count or device, so the
    # bytes are reproducible for the same (device, threads): recorded with every layer.
    numerics = {"device": str(device), "torch_threads": torch.get_num_threads()}
    atomic_write_json(out_stats, {"provenance": provenance, "numerics": numerics, "linears": stats})
    return stats


def forward_layer(
    cfg: RunConfig,
    model_json: str | Path,
    variant_name: str,
    layer: int,
    inputs_h5: str | Path,
    pruned_safetensors: str | Path,
    out_h5: str | Path,
) -> None:
    """Run the calibration inputs through the pruned layer: the next layer's inputs."""
    info, variant, device, dtype, checkpoint, fam = _layer_context(cfg, model_json, variant_name)
    pruned = read_pruned(pruned_safetensors, layer_provenance(cfg, info, "pruned", variant, layer))
    module = _layer_module(checkpoint, fam, layer, device, dtype, replace=pruned)
    expected = layer_inputs_provenance(cfg, info, variant, layer)
    artifact, batches = _hidden_batches(Path(inputs_h5), expected, cfg.calibration.batch_size)
    shape = artifact.shape(HIDDEN)
    started, done = time.perf_counter(), 0
    try:
        attrs = layer_provenance(cfg, info, "layer-inputs", variant, layer + 1)
        with H5StreamWriter(out_h5, HIDDEN, shape, storage_dtype(dtype), attrs) as writer, torch.no_grad():
            for batch in batches:
                out = family.layer_forward(module, checkpoint.config, torch.from_numpy(batch).to(device, dtype))
                if not bool(torch.isfinite(out).all()):
                    raise ValueError(f"layer {layer}: the pruned layer's outputs contain NaN/Inf")
                writer.write(out.float() if dtype == torch.bfloat16 else out)
                done += batch.shape[0]
                _log_progress(f"layer {layer} forward", done, shape[0], started)
    finally:
        artifact.close()
