"""One function per pipeline stage; each reads artifacts and writes one atomically.

The Snakemake rules and the in-process runner (`rose.runner`) call exactly these
functions, so the workflow and `python -m rose run` produce identical bytes.
Every artifact carries provenance (model fingerprint, layer, variant, config
hash) and is refused on read if it was produced for something else.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import rose
from rose import checkpoint as ckpt
from rose import data, family
from rose.artifacts import (
    ArtifactError,
    H5Artifact,
    H5StreamWriter,
    atomic_path,
    atomic_write_json,
    check_provenance,
    config_hash,
    prefetch,
    read_json,
    tensor_checksum_many,
    write_h5,
)
from rose.config import RunConfig, Variant
from rose.hessian import HessianAccumulator
from rose.layout import DENSE
from rose.methods import NEEDS_HESSIAN, prune_weight, reconstruction_error
from rose.ordering import Ordering, loss_map, rose_order

log = logging.getLogger("rose")

PROVENANCE_KEY = "rose_provenance"
HIDDEN = "hidden"
TOKENS = "tokens"
METHODS_WITH_ORDER = {"rose", "sparsegpt"}


# ---------------------------------------------------------------- helpers


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


def versions() -> dict[str, str]:
    import h5py
    import transformers

    return {
        "rose": rose.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "h5py": h5py.__version__,
    }


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: cuda was requested but no CUDA device is available")
        # TF32 matmuls would change the sweep's float32 arithmetic (and its determinism contract).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    return torch.device("cpu")


def compute_dtype(cfg: RunConfig, info: ModelInfo, device: torch.device) -> torch.dtype:
    """float32 on CPU; on GPU the checkpoint's dtype unless the config says otherwise."""
    if cfg.model.dtype != "auto":
        return getattr(torch, cfg.model.dtype)
    if device.type == "cpu":
        return torch.float32
    return getattr(torch, info.dtype) if info.dtype in ("float16", "bfloat16") else torch.float32


def storage_dtype(dtype: torch.dtype) -> np.dtype:
    """HDF5 has no bfloat16; fp16 stays fp16, everything else is stored as fp32."""
    return np.dtype(np.float16) if dtype == torch.float16 else np.dtype(np.float32)


def _provenance(cfg: RunConfig, info: ModelInfo, kind: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "model_fingerprint": info.fingerprint, **extra}


def calibration_provenance(cfg: RunConfig, info: ModelInfo, kind: str) -> dict[str, Any]:
    return _provenance(cfg, info, kind, config_hash=config_hash(cfg.calibration_provenance()))


def layer_provenance(cfg: RunConfig, info: ModelInfo, kind: str, variant: Variant, layer: int) -> dict[str, Any]:
    return _provenance(
        cfg,
        info,
        kind,
        variant=variant.name,
        layer=layer,
        config_hash=config_hash(cfg.variant_provenance(variant)),
    )


def _open(info: ModelInfo) -> tuple[ckpt.Checkpoint, family.Family]:
    checkpoint = ckpt.Checkpoint.open(Path(info.path))
    return checkpoint, family.family_for(checkpoint.config)


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


# ---------------------------------------------------------------- stages


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def run_identity(cfg: RunConfig) -> dict[str, Any]:
    """What every artifact of a run depends on: a run directory holds one of these."""
    return {"model": cfg.raw["model"], "calibration": cfg.raw["calibration"], "prune": cfg.raw["prune"]}


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
    fam = family.family_for(config)
    num_layers = checkpoint.num_layers()
    if cfg.layers is not None and cfg.layers > num_layers:
        raise ValueError(f"prune.layers = {cfg.layers} but the model has only {num_layers} layers")
    _check_layers_match_config(checkpoint, fam, num_layers, path)
    parameters = 0
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
        parameters=parameters or _count_parameters(checkpoint),
    )
    atomic_write_json(out_json, asdict(info))
    return info


def _check_layers_match_config(checkpoint, fam, num_layers: int, path) -> None:
    """Every layer's tensors must be what the config describes (read from headers only)."""
    expected = family.expected_shapes(checkpoint.config)
    specs = checkpoint.specs()
    for layer in range(num_layers):
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


def _count_parameters(checkpoint) -> int:
    total = 0
    with_index = getattr(checkpoint, "shapes", None)
    if callable(with_index):
        return sum(int(np.prod(s)) for s in with_index().values())
    for name in checkpoint.names():
        total += checkpoint.read(name).numel()
    return total


def capture_calibration(cfg: RunConfig, model_json: str | Path, out_h5: str | Path) -> None:
    """Sample the calibration windows (tokens) by the paper's protocol."""
    info = ModelInfo.load(model_json)
    c = cfg.calibration
    if info.max_positions and c.seqlen > info.max_positions:
        raise ValueError(
            f"calibration.seqlen = {c.seqlen} exceeds the model's context ({info.max_positions} tokens)"
        )
    tokenizer = data.tokenizer_for(Path(info.path), trust_remote_code=cfg.model.trust_remote_code)
    tokens = data.calibration_windows(tokenizer, c.source, c.nsamples, c.seqlen, c.seed)
    attrs = calibration_provenance(cfg, info, "calibration-tokens")
    attrs.update(source=str(asdict(c.source)), nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed)
    write_h5(out_h5, {TOKENS: tokens.to(torch.int32)}, attrs)


def embed_calibration(cfg: RunConfig, model_json: str | Path, tokens_h5: str | Path, out_h5: str | Path) -> None:
    """Layer 0's inputs: the embedding outputs of the calibration tokens."""
    info = ModelInfo.load(model_json)
    device = resolve_device(cfg.device)
    dtype = compute_dtype(cfg, info, device)
    with H5Artifact(tokens_h5, calibration_provenance(cfg, info, "calibration-tokens")) as art:
        tokens = torch.from_numpy(art.read(TOKENS).astype(np.int64))
    checkpoint, fam = _open(info)
    weight = checkpoint.read(fam.embed_name).to(device, dtype)
    n, seqlen = tokens.shape
    attrs = calibration_provenance(cfg, info, "layer-inputs")
    attrs.update(layer=0, variant="*")
    shape = (n, seqlen, info.hidden_size)
    with H5StreamWriter(out_h5, HIDDEN, shape, storage_dtype(dtype), attrs) as writer:
        for start in range(0, n, cfg.calibration.batch_size):
            batch = tokens[start : start + cfg.calibration.batch_size]
            hidden = family.embed(weight, batch, fam)
            writer.write(hidden.float() if dtype == torch.bfloat16 else hidden)


def _layer_context(cfg: RunConfig, model_json: str | Path, variant_name: str):
    """What a stage that runs a decoder layer needs: model info, variant, device, dtype, weights, family."""
    info = ModelInfo.load(model_json)
    variant = cfg.variant(variant_name)
    device = resolve_device(cfg.device)
    dtype = compute_dtype(cfg, info, device)
    checkpoint, fam = _open(info)
    return info, variant, device, dtype, checkpoint, fam


def layer_inputs_provenance(cfg: RunConfig, info: ModelInfo, variant: Variant, layer: int) -> dict[str, Any]:
    if layer == 0:
        return {**calibration_provenance(cfg, info, "layer-inputs"), "layer": 0}
    return layer_provenance(cfg, info, "layer-inputs", variant, layer)


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
    checkpoint, fam = _open(info)
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
    checkpoint, fam = _open(info)
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
    with atomic_path(out_safetensors) as tmp:
        # One metadata key: safetensors writes several in random order, and the bytes must not vary.
        stamped = {**provenance, "sha256": _tensors_checksum(pruned)}
        save_file(pruned, str(tmp), metadata={PROVENANCE_KEY: json.dumps(stamped, sort_keys=True)})
    atomic_write_json(out_stats, {"provenance": provenance, "linears": stats})
    return stats


def read_pruned(cfg: RunConfig, info: ModelInfo, variant: Variant, layer: int, path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    expected = layer_provenance(cfg, info, "pruned", variant, layer)
    try:
        with safe_open(str(path), framework="pt") as fh:
            found = json.loads((fh.metadata() or {}).get(PROVENANCE_KEY, "{}"))
            check_provenance(path, found, expected)
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except FileNotFoundError:
        raise
    except ArtifactError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ArtifactError(f"{path}: corrupt or truncated safetensors ({exc}); delete it and rerun") from exc
    if found.get("sha256") != _tensors_checksum(tensors):
        raise ArtifactError(f"{path}: checksum mismatch (corrupt file); delete it and rerun")
    return tensors


def _tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    return tensor_checksum_many(tensors[name] for name in sorted(tensors))


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
    pruned = read_pruned(cfg, info, variant, layer, pruned_safetensors)
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


def assemble_model(
    cfg: RunConfig,
    model_json: str | Path,
    variant_name: str,
    pruned_paths: list[str | Path],
    stats_paths: list[str | Path],
    out_dir: str | Path,
) -> None:
    """Pruned Linears + every untouched tensor -> a loadable HF model directory."""
    info = ModelInfo.load(model_json)
    variant = cfg.variant(variant_name)
    checkpoint, fam = _open(info)
    if len(pruned_paths) != info.prune_layers or len(stats_paths) != info.prune_layers:
        raise ValueError(f"assemble {variant.name}: expected {info.prune_layers} pruned layers")
    replacements: dict[str, Path] = {}
    for layer, path in enumerate(pruned_paths):
        for name in fam.linear_names():
            replacements[fam.layer_prefix.format(index=layer) + name + ".weight"] = Path(path)
    linears: dict[str, Any] = {}
    prune_seconds = 0.0
    for layer, path in enumerate(stats_paths):
        stats = read_json(path)
        check_provenance(Path(path), stats.get("provenance", {}), layer_provenance(cfg, info, "pruned", variant, layer))
        for name, entry in stats["linears"].items():
            linears[fam.layer_prefix.format(index=layer) + name] = entry
            prune_seconds += entry["seconds"]

    layer_of = {Path(path): layer for layer, path in enumerate(pruned_paths)}

    order = sorted(checkpoint.names(), key=lambda n: (_layer_index(fam, n), n))
    specs = checkpoint.specs()

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        # Grouped by layer so each pruned file is read once; one layer in memory.
        current: tuple[Path, dict[str, torch.Tensor]] | None = None
        for name in order:
            source = replacements.get(name)
            if source is None:
                yield name, checkpoint.read(name)
                continue
            layer = layer_of[source]
            if current is None or current[0] != source:
                current = (source, read_pruned(cfg, info, variant, layer, source))
            yield name, current[1][name[len(fam.layer_prefix.format(index=layer)) :]]

    total_zero, total = 0, 0
    for entry in linears.values():
        n = entry["shape"][0] * entry["shape"][1]
        total_zero += entry["sparsity"] * n
        total += n
    manifest = {
        "variant": variant.name,
        "method": variant.method,
        "sparsity": str(variant.sparsity),
        "blocksize": cfg.prune.blocksize,
        "percdamp": cfg.prune.percdamp,
        "threshold": cfg.prune.threshold,
        "reorder": cfg.prune.reorder,
        "pruned_layers": info.prune_layers,
        "calibration": cfg.raw["calibration"],
        "model": {"source": info.source, "fingerprint": info.fingerprint},
        "versions": versions(),
        "prune_seconds": prune_seconds,
        "achieved_sparsity": total_zero / total if total else 0.0,
        "reordered_linears": sum(1 for e in linears.values() if e.get("reordered")),
        "total_linears": len(linears),
        "linears": linears,
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        ckpt.save_sharded(tmp, [specs[name] for name in order], tensors(), metadata={"format": "pt"})
        for item in Path(info.path).iterdir():
            if item.is_file() and not _is_weight_file(item.name):
                shutil.copy2(item, tmp / item.name)
        atomic_write_json(tmp / "pruning.json", manifest)


def _layer_index(fam: family.Family, name: str) -> int:
    head = fam.layer_prefix.split("{index}")[0]
    if not name.startswith(head):
        return -1
    digits = name[len(head) :].split(".", 1)[0]
    return int(digits) if digits.isdigit() else -1


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".gguf", ".pt", ".pth")) or name in (
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    )


# ---------------------------------------------------------------- evaluation and report


def evaluated_model_dir(info: ModelInfo, layout_model_dir: Path, variant_name: str) -> Path:
    """The dense model is the prepared checkpoint; a variant is its reassembled directory."""
    return Path(info.path) if variant_name == DENSE else layout_model_dir


def evaluate_perplexity(
    cfg: RunConfig, model_json: str | Path, variant_name: str, metric_name: str, model_dir: str | Path, out_json: str | Path
) -> dict[str, Any]:
    """Token-level perplexity of one model on one evaluation text (paper protocol)."""
    from rose import evaluate

    info = ModelInfo.load(model_json)
    if cfg.evaluation is None:
        raise ValueError("evaluation is off in this config")
    spec = next((p for p in cfg.evaluation.perplexity if p.name == metric_name), None)
    if spec is None:
        raise ValueError(f"no perplexity evaluation named {metric_name!r} in the config")
    if variant_name != DENSE:
        cfg.variant(variant_name)
    if info.max_positions and spec.seqlen > info.max_positions:
        raise ValueError(f"evaluation {metric_name}: seqlen {spec.seqlen} exceeds the model's context ({info.max_positions})")
    tokenizer = data.tokenizer_for(Path(info.path), trust_remote_code=cfg.model.trust_remote_code)
    windows = data.eval_windows(tokenizer, spec.source, spec.seqlen, spec.max_windows)
    protocol = {
        "source": asdict(spec.source),
        "seqlen": spec.seqlen,
        "windows": int(windows.shape[0]),
        "max_windows": spec.max_windows,
        "definition": "exp(mean token NLL) over non-overlapping windows",
    }
    result = evaluate.perplexity_report(
        Path(model_dir), metric_name, windows, cfg.evaluation.batch_size, resolve_device(cfg.device), protocol
    )
    result["variant"] = variant_name
    result["model_fingerprint"] = info.fingerprint
    atomic_write_json(out_json, result)
    return result


def evaluate_zero_shot(
    cfg: RunConfig, model_json: str | Path, variant_name: str, model_dir: str | Path, out_json: str | Path
) -> dict[str, Any]:
    """lm-eval zero-shot accuracy of one model (acc_norm where the task has it)."""
    from rose import evaluate

    info = ModelInfo.load(model_json)
    if cfg.evaluation is None or cfg.evaluation.zero_shot is None:
        raise ValueError("zero-shot evaluation is off in this config")
    if variant_name != DENSE:
        cfg.variant(variant_name)
    result = evaluate.zero_shot_report(Path(model_dir), cfg.evaluation.zero_shot, resolve_device(cfg.device))
    result["variant"] = variant_name
    result["model_fingerprint"] = info.fingerprint
    atomic_write_json(out_json, result)
    return result


def build_report(cfg: RunConfig, run_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """summary.csv / summary.md and the plots for every variant plus dense."""
    from rose import report

    return report.build_report(Path(run_dir), [v.name for v in cfg.variants], Path(out_dir))
