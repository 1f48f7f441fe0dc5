"""Assembly: the pruned Linears plus every untouched tensor -> a loadable HF model directory.

Tensors are streamed in checkpoint order, one pruned layer file in memory at a
time, and a `pruning.json` manifest records what was done and with which versions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rose import checkpoint as ckpt
from rose import family
from rose.artifacts import atomic_path, atomic_write_json, check_provenance, read_json, read_pruned
from rose.config import RunConfig
from rose.model_info import ModelInfo, open_model
from rose.provenance import layer_provenance, versions


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
    checkpoint, fam = open_model(info)
    if len(pruned_paths) != info.prune_layers or len(stats_paths) != info.prune_layers:
        raise ValueError(f"assemble {variant.name}: expected {info.prune_layers} pruned layers")
    replacements: dict[str, Path] = {}
    for layer, path in enumerate(pruned_paths):
        for name in fam.linear_names():
            replacements[fam.layer_prefix.format(index=layer) + name + ".weight"] = Path(path)
    linears: dict[str, Any] = {}
    prune_seconds = 0.0
    numerics: set[tuple[str, int]] = set()
    for layer, path in enumerate(stats_paths):
        stats = read_json(path)
        check_provenance(Path(path), stats.get("provenance", {}), layer_provenance(cfg, info, "pruned", variant, layer))
        if "numerics" in stats:
            numerics.add((stats["numerics"]["device"], stats["numerics"]["torch_threads"]))
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
                expected = layer_provenance(cfg, info, "pruned", variant, layer)
                current = (source, read_pruned(source, expected))
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
        # (device, torch threads) the layers were pruned with; more than one after a resume elsewhere
        "numerics": [{"device": d, "torch_threads": t} for d, t in sorted(numerics)],
        "total_linears": len(linears),
        "linears": linears,
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        ckpt.save_sharded(tmp, [specs[name] for name in order], tensors(), metadata={"format": "pt"})
        ckpt.copy_side_files(Path(info.path), tmp)
        atomic_write_json(tmp / "pruning.json", manifest)


def _layer_index(fam: family.Family, name: str) -> int:
    """Sort key: the decoder layer a tensor belongs to, -1 for embeddings, final norm and head."""
    head = fam.layer_prefix.split("{index}")[0]
    if not name.startswith(head):
        return -1
    digits = name[len(head) :].split(".", 1)[0]
    return int(digits) if digits.isdigit() else -1
