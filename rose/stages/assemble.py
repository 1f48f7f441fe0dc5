"""Assembly: the pruned Linears plus every untouched tensor -> a loadable HF model directory.

Tensors are streamed in checkpoint order, one pruned layer file in memory at a
time, and a `pruning.json` manifest records what was done and with which versions.
Pruned layers hold the checkpoint's own tensors (mixture of experts: stacked or
per-expert, as the checkpoint has them), so the reassembled model keeps the
source's layout and tensor names.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rose import checkpoint as ckpt
from rose import family
from rose.artifacts import (
    ArtifactError,
    atomic_path,
    atomic_write_json,
    check_provenance,
    read_json,
    read_pruned,
)
from rose.config import RunConfig
from rose.model_card import model_card_text, per_layer_sparsity
from rose.provenance import layer_provenance, versions
from rose.stages.layer_pass import layer_units
from rose.stages.spec import Stage, StageContext


def assemble_model(ctx: StageContext) -> None:
    """Pruned Linears + every untouched tensor -> a loadable HF model directory."""
    cfg, info, variant = ctx.cfg, ctx.model_info, ctx.variant
    checkpoint, fam = ctx.checkpoint, ctx.family
    pruned_paths, stats_paths = ctx.inputs["pruned"], ctx.inputs["stats"]
    out_dir = ctx.outputs["model_dir"]
    if len(pruned_paths) != info.prune_layers or len(stats_paths) != info.prune_layers:
        raise ValueError(f"assemble {variant.name}: expected {info.prune_layers} pruned layers")
    replacements: dict[str, Path] = {}
    experts = 0
    for layer, path in enumerate(pruned_paths):
        units = layer_units(cfg, checkpoint, layer)
        experts = max(experts, units.num_experts)
        for tensor in units.tensors():
            replacements[fam.layer_prefix.format(index=layer) + tensor] = Path(path)
    layer_of = {Path(path): layer for layer, path in enumerate(pruned_paths)}
    linears: dict[str, Any] = {}
    targets: list[float | str | None] = []  # each layer's, from its stats.json
    prune_seconds = 0.0
    numerics: set[tuple[str, int]] = set()
    for layer, path in enumerate(stats_paths):
        stats = read_json(path)
        check_provenance(
            Path(path),
            stats.get("provenance", {}),
            layer_provenance(cfg, info, "pruned", variant, layer),
        )
        if "numerics" in stats:
            numerics.add((stats["numerics"]["device"], stats["numerics"]["torch_threads"]))
        for name, entry in stats["linears"].items():
            linears[fam.layer_prefix.format(index=layer) + name] = entry
            prune_seconds += entry["seconds"]
        targets.append(stats.get("target"))

    order = sorted(checkpoint.names(), key=lambda n: (_layer_index(fam, n), n))
    specs = checkpoint.specs()
    # Each verified pruned-layer file (checksum, provenance) that holds exactly its layer's
    # pruned tensors under their checkpoint names becomes the model's shard of them; an older
    # run's file (layer-relative names) has its tensors written anew, one layer at a time.
    linkable: dict[int, Path] = {}
    for layer, path in enumerate(pruned_paths):
        names = set(_read_layer(ctx, layer, Path(path)))
        wanted = {name for name, source in replacements.items() if source == Path(path)}
        if not wanted <= names:
            raise ArtifactError(
                f"{path}: no tensor {sorted(wanted - names)[0]} (written for another layout); "
                "delete it and rerun"
            )
        if names == wanted and ckpt.is_shard(Path(path)):
            linkable[layer] = Path(path)
    linked = {name for name, source in replacements.items() if layer_of[source] in linkable}
    rest = [name for name in order if name not in linked]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        current: tuple[Path, dict[str, torch.Tensor]] | None = None  # one layer in memory
        for name in rest:
            source = replacements.get(name)
            if source is None:
                yield name, checkpoint.read(name)
                continue
            if current is None or current[0] != source:
                current = (source, _read_layer(ctx, layer_of[source], source))
            yield name, current[1][name]

    total_zero, total = 0, 0
    for entry in linears.values():
        n = entry["shape"][0] * entry["shape"][1]
        total_zero += entry["sparsity"] * n
        total += n
    manifest = {
        "variant": variant.name,
        "method": variant.method,
        "sparsity": str(variant.sparsity),
        "allocation": variant.allocation.settings(),
        "blocksize": cfg.prune.blocksize,
        "percdamp": cfg.prune.percdamp,
        "threshold": cfg.prune.threshold,
        "reorder": cfg.prune.reorder,
        **({"admm": dataclasses.asdict(cfg.admm)} if variant.uses_admm else {}),
        "pruned_layers": info.prune_layers,
        "calibration": cfg.raw["calibration"],
        "model": {"source": info.source, "fingerprint": info.fingerprint},
        "versions": versions(),
        "prune_seconds": prune_seconds,
        "achieved_sparsity": total_zero / total if total else 0.0,
        "reordered_linears": sum(1 for e in linears.values() if e.get("reordered")),
        # the mean over Linears of tr(D H D^T) / tr(W H W^T) (refits: also before the refit)
        **_mean_errors(linears),
        # (device, torch threads) the layers were pruned with; more than one after a resume elsewhere
        "numerics": [{"device": d, "torch_threads": t} for d, t in sorted(numerics)],
        "total_linears": len(linears),
        # per decoder layer: the allocated target and the zeros its pruned Linears got (counted
        # as the model card counts them)
        "layers": [
            {
                "layer": row["layer"],
                "target": targets[row["layer"]],
                "achieved": row["sparsity"],
                "parameters": row["weights"],
            }
            for row in per_layer_sparsity({"linears": linears})
        ],
        "linears": linears,
        # the model's shards that are the pruned-layer files themselves: "hard link", or "copy"
        # where results_dir cannot link (the disk is then paid twice)
        "layer_shards": {},
    }
    if experts:
        manifest["experts"] = _experts_summary(cfg, linears, experts)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        beside = {}
        for layer, path in linkable.items():
            shard = f"model-layer-{layer:05d}.safetensors"
            manifest["layer_shards"][shard] = _link(path, tmp / shard)
            beside.update({name: shard for name in linked if layer_of[replacements[name]] == layer})
        ckpt.save_sharded(
            tmp, [specs[name] for name in rest], tensors(), metadata={"format": "pt"}, beside=beside
        )
        ckpt.copy_side_files(Path(info.path), tmp)
        atomic_write_json(tmp / "pruning.json", manifest)
        # The card here cannot quote evaluations (they read this directory); the exports'
        # cards (<variant>/export/<format>/README.md) carry them.
        (tmp / "README.md").write_text(
            model_card_text(
                manifest, run=cfg.run, num_layers=info.num_layers, evaluations_pending=True
            )
        )


def _read_layer(ctx: StageContext, layer: int, path: Path) -> dict[str, torch.Tensor]:
    """A pruned-layer file's tensors (verified) under their checkpoint names."""
    expected = layer_provenance(ctx.cfg, ctx.model_info, "pruned", ctx.variant, layer)
    prefix = ctx.family.layer_prefix.format(index=layer)
    return {prefix + n.removeprefix(prefix): t for n, t in read_pruned(path, expected).items()}


def _link(source: Path, target: Path) -> str:
    """`target` as a hard link of `source` (the same bytes, stored once), else a copy."""
    try:
        os.link(source, target)
        return "hard link"
    except OSError:
        shutil.copyfile(source, target)
        return "copy"


def _experts_summary(cfg: RunConfig, linears: dict[str, Any], experts: int) -> dict[str, Any]:
    """Mixture of experts: the settings, and per layer how many calibration tokens each
    routed expert was sent (its Hessian's tokens: all of them with calibrate_all_experts)."""
    settings = cfg.moe
    routed: dict[str, dict[str, int]] = {}
    undersampled = []
    for name, entry in linears.items():
        if entry.get("expert") is None:
            continue
        if "routed_tokens" in entry:
            per_layer = routed.setdefault(str(entry["layer"]), {})
            per_layer[str(entry["expert"])] = entry["routed_tokens"]
        if entry.get("undersampled"):
            undersampled.append(name)
    return {
        "num_experts": experts,
        "calibrate_all_experts": settings.calibrate_all_experts,
        "prune_router": settings.prune_router,
        # layer -> expert -> calibration tokens its router sent it
        "routed_tokens": routed,
        # expert matrices whose Hessian saw fewer tokens than they have inputs
        "undersampled": sorted(undersampled),
    }


def _layer_index(fam: family.Family, name: str) -> int:
    """Sort key: the decoder layer a tensor belongs to, -1 for embeddings, final norm and head."""
    head = fam.layer_prefix.split("{index}")[0]
    if not name.startswith(head):
        return -1
    digits = name[len(head) :].split(".", 1)[0]
    return int(digits) if digits.isdigit() else -1


def _assemble_inputs(plan, w) -> dict:
    layers = range(plan.depth)
    return {
        "pruned": [plan.layout.pruned(w["variant"], i) for i in layers],
        "stats": [plan.layout.stats(w["variant"], i) for i in layers],
    }


STAGES = (
    Stage(
        "assemble",
        assemble_model,
        outputs=lambda L, w: {"model_dir": L.model_dir(w["variant"])},
        # one layer's pruned tensors and a few copies of a tensor, and one shard being written
        estimate=lambda f: (
            4 * f.layer * f.dbytes + min(5 * 1024**3, f.params * f.dbytes),
            f.io(2 * f.params * f.dbytes),
        ),
        wildcards=("variant",),
        steps=lambda plan: [{"variant": v} for v in plan.variants],
        inputs=_assemble_inputs,
        directories=frozenset({"model_dir"}),
        final=True,
        writes=lambda s, name, w: s.reassembled + s.block,
        disk={"model_dir": "reassembled models"},
    ),
)


def _mean_errors(linears: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key in ("reconstruction_error", "reconstruction_error_before"):
        values = [e[key] for e in linears.values() if e.get(key) is not None]
        if values:
            out[f"{key}_mean"] = sum(values) / len(values)
    return out
