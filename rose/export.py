"""Exports of a pruned model: `<variant>/export/<format>/`, one directory per format.

Formats (`FORMATS`):

- `dense`: the reassembled model as it is (`<variant>/model/`), weights hard-linked
  (copied across filesystems), plus the model card and the export record.
- `compressed`: the pruned Linears in compressed-tensors' sparse formats, every
  other tensor as it is. 2:4 variants use `sparse-24-bitmask` (the kept half of each
  row, rows x cols/2, plus a bitmask); every other sparsity (unstructured, 4:8, ...)
  uses `sparse-bitmask` (the kept values, a bitmask, row offsets). `config.json`
  gets the `quantization_config` entry compressed-tensors writes for a sparse-only
  model (`quant_method: compressed-tensors`, `sparsity_config: {format, targets,
  ignore, global_sparsity, sparsity_structure}`), with `targets` naming exactly
  the compressed Linears.

Compression is lossless: a weight is kept in the bitmask when its *bits* are not
zero, so a -0.0 survives, and every compressed tensor is decompressed and compared
bit for bit with its source before it is written. `decompressed_tensors(dir)`
gives back the exact dense weights and `load_model(dir)` a model built from them.

Streaming: tensors are read from the dense directory one at a time and written
as they come, so memory holds one tensor whatever the model's size. A
`sparse-bitmask` values tensor has a length known only once its weight is read,
so each shard's header is reserved at its largest possible size (every values
tensor as long as its dense weight), written last and padded with spaces, which
the safetensors format allows. The export directory is written under a
temporary name and renamed into place when complete (`atomic_path`): a killed
export leaves no directory that looks finished, and the rerun starts it afresh.

`export.json` records the format, the sizes (`export_size`), the ratio of the
weights to the dense model's, a sha256 per file, and the provenance (variant,
model fingerprint, config hash) of what was exported.

Which libraries read the `compressed` directory (checked in tests/test_export.py):
compressed-tensors <= 0.14 with transformers 4.x decompresses it in
`AutoModelForCausalLM.from_pretrained`. compressed-tensors >= 0.15 dropped its
sparse compressors ("sparsity is removed for now"), and transformers 5 loads
such a directory without decompressing it; use `rose.export.load_model` there.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from rose import checkpoint as ckpt
from rose.artifacts import ArtifactError, atomic_path, atomic_write_json, read_json
from rose.sparsity import Sparsity

FORMATS = ("dense", "compressed")
EXPORT_RECORD = "export.json"
MODEL_CARD = "README.md"
PACKAGE = "compressed-tensors"
SPARSE_BITMASK = "sparse-bitmask"
SPARSE_24_BITMASK = "sparse-24-bitmask"
# The tensors each format stores per compressed weight, in the order they are written
# (64-bit tensors first, so they stay aligned within each group).
PARTS = {
    SPARSE_BITMASK: ("shape", "row_offsets", "compressed", "bitmask"),
    SPARSE_24_BITMASK: ("shape", "compressed", "bitmask"),
}


class ExportError(ValueError):
    """An export cannot be made as asked (unknown format, missing package, weights the format cannot hold)."""


# ---------------------------------------------------------------- formats


def compressed_tensors_available() -> bool:
    return importlib.util.find_spec("compressed_tensors") is not None


def check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """Refuse an unknown format, or `compressed` without its package, in one line (cheap: imports nothing)."""
    formats = tuple(formats)
    for fmt in formats:
        if fmt not in FORMATS:
            raise ExportError(f"export format {fmt!r} is unknown (known: {', '.join(FORMATS)})")
    if len(set(formats)) != len(formats):
        raise ExportError(f"export formats are listed twice: {list(formats)}")
    if "compressed" in formats and not compressed_tensors_available():
        raise ExportError(
            "export format 'compressed' needs the compressed-tensors package: "
            "pip install 'rose-pipeline[export]' (or pip install compressed-tensors)"
        )
    return formats


def sparse_format(sparsity: Sparsity) -> str:
    """compressed-tensors format for a variant: the 2:4 layout for 2:4, the general bitmask otherwise."""
    return SPARSE_24_BITMASK if (sparsity.n, sparsity.m) == (2, 4) else SPARSE_BITMASK


def sparsity_structure(sparsity: Sparsity) -> str:
    return f"{sparsity.n}:{sparsity.m}" if sparsity.is_nm else "unstructured"


def _ct() -> Any:
    """compressed-tensors' bitmask packing and config classes (imported when an export needs them)."""
    if not compressed_tensors_available():
        raise ExportError(
            "export format 'compressed' needs the compressed-tensors package: "
            "pip install 'rose-pipeline[export]' (or pip install compressed-tensors)"
        )
    import compressed_tensors
    from compressed_tensors import config as ct_config
    from compressed_tensors import utils as ct_utils

    return compressed_tensors, ct_config, ct_utils


# ---------------------------------------------------------------- one tensor


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same bytes as integers: exact comparisons, -0.0 and NaN included."""
    kind = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(kind)


def _count_zeros(tensor: torch.Tensor, chunk: int = 1 << 24) -> int:
    """Weights equal to zero (-0.0 included), counted in slices: no mask as large as the tensor."""
    flat = tensor.reshape(-1)
    return sum(int((flat[i : i + chunk] == 0).sum()) for i in range(0, flat.numel(), chunk))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return _ct()[2].pack_bitmasks(mask.contiguous())


def compress_weight(
    weight: torch.Tensor, fmt: str, name: str = "weight"
) -> dict[str, torch.Tensor]:
    """One 2-D weight -> the tensors `fmt` stores for it (local names: shape, compressed, ...)."""
    if weight.ndim != 2:
        raise ExportError(
            f"{name}: only 2-D weights are compressed, got shape {tuple(weight.shape)}"
        )
    rows, cols = weight.shape
    keep = _bits(weight) != 0
    if fmt == SPARSE_BITMASK:
        counts = keep.sum(dim=1)
        return {
            "shape": torch.tensor([rows, cols], dtype=torch.int64),
            "row_offsets": torch.cumsum(counts, 0) - counts,
            "compressed": weight[keep],
            "bitmask": _pack(keep),
        }
    if fmt == SPARSE_24_BITMASK:
        if cols % 4:
            raise ExportError(
                f"{name}: {SPARSE_24_BITMASK} needs a width that is a multiple of 4, got {cols}"
            )
        groups = keep.reshape(-1, 4)
        count = groups.sum(dim=1)
        if int(count.max()) > 2:
            bad = int((count > 2).nonzero()[0])
            raise ExportError(
                f"{name}: not 2:4 sparse (row {bad * 4 // cols}, columns {bad * 4 % cols}-{bad * 4 % cols + 3} "
                f"hold {int(count[bad])} nonzeros); {SPARSE_24_BITMASK} stores exactly 2 of every 4"
            )
        # A group with fewer than 2 nonzeros keeps its first zeros as stored values: exactly 2 per group.
        zero_rank = torch.cumsum((~groups).to(torch.int8), dim=1)
        mask = groups | (~groups & (zero_rank <= (2 - count).unsqueeze(1)))
        return {
            "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
            "compressed": weight.reshape(-1, 4)[mask].reshape(rows, cols // 2),
            "bitmask": _pack(mask.reshape(rows, cols)),
        }
    raise ExportError(f"unknown compressed-tensors sparse format {fmt!r}")


def decompress_weight(parts: Mapping[str, torch.Tensor], fmt: str) -> torch.Tensor:
    """The tensors of one compressed weight -> the dense weight (compressed-tensors' own unpacking)."""
    shape = [int(v) for v in parts["shape"].flatten().tolist()]
    mask = _ct()[2].unpack_bitmasks(parts["bitmask"], shape)
    values = parts["compressed"].flatten()
    if int(mask.sum()) != values.numel():
        raise ArtifactError(
            f"{fmt}: bitmask marks {int(mask.sum())} weights but {values.numel()} are stored"
        )
    out = torch.zeros(shape, dtype=values.dtype)
    out[mask] = values
    return out


def _upper_bound(spec: ckpt.TensorSpec, fmt: str) -> list[ckpt.TensorSpec]:
    """The tensors stored for a compressed weight, at their largest (values as long as the weight)."""
    rows, cols = spec.shape
    shapes = {
        "shape": (2,) if fmt == SPARSE_BITMASK else (2, 1),
        "row_offsets": (rows,),
        "compressed": (rows * cols,) if fmt == SPARSE_BITMASK else (rows, cols // 2),
        "bitmask": (rows, (cols + 7) // 8),
    }
    dtypes = {
        "shape": torch.int64,
        "row_offsets": torch.int64,
        "compressed": spec.dtype,
        "bitmask": torch.uint8,
    }
    module = spec.name.removesuffix(".weight")
    return [ckpt.TensorSpec(f"{module}.{part}", dtypes[part], shapes[part]) for part in PARTS[fmt]]


def _shard_plan(
    groups: list[list[ckpt.TensorSpec]], shard_bytes: int
) -> list[list[list[ckpt.TensorSpec]]]:
    """Groups of tensors (one source tensor each) -> shards, by their largest size."""
    shards: list[list[list[ckpt.TensorSpec]]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(spec.nbytes for spec in group)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(group)
        size += nbytes
    return shards


def _encode(name: str, tensor: torch.Tensor, fmt: str | None) -> list[tuple[str, torch.Tensor]]:
    """A source tensor -> what the export stores for it; a compressed weight is checked by decompressing it."""
    if fmt is None:
        return [(name, tensor)]
    parts = compress_weight(tensor, fmt, name)
    if not same_bits(decompress_weight(parts, fmt), tensor):
        raise ExportError(f"{name}: {fmt} does not give back the same weights; not exported")
    module = name.removesuffix(".weight")
    return [(f"{module}.{part}", parts[part]) for part in PARTS[fmt]]


# ---------------------------------------------------------------- sizes and checksums


def export_size(directory: str | Path) -> dict[str, int]:
    """Bytes on disk (file sizes) of a model directory: its weights (safetensors + index) and all files."""
    directory = Path(directory)
    weights = total = 0
    for item in sorted(directory.iterdir()):
        if not item.is_file():
            continue
        size = item.stat().st_size
        total += size
        if item.name.endswith(".safetensors") or item.name == ckpt.INDEX:
            weights += size
    return {"weights_bytes": weights, "total_bytes": total}


def file_sha256(path: Path) -> str:
    """sha256 of a file, read into one reused 4 MiB buffer (no memory that grows with the file)."""
    digest = hashlib.sha256()
    buffer = bytearray(4 << 20)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _files(
    directory: Path, known: Mapping[tuple[int, int], dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """{name: {bytes, sha256}} of every file but export.json; `known`: entries by (device, inode),
    so a hard-linked weight file is hashed once."""
    out = {}
    for item in sorted(directory.iterdir()):
        if item.is_file() and item.name != EXPORT_RECORD:
            stat = item.stat()
            entry = (known or {}).get((stat.st_dev, stat.st_ino))
            out[item.name] = (
                dict(entry) if entry else {"bytes": stat.st_size, "sha256": file_sha256(item)}
            )
    return out


def _by_inode(
    directory: Path, files: Mapping[str, dict[str, Any]]
) -> dict[tuple[int, int], dict[str, Any]]:
    return {
        (s.st_dev, s.st_ino): entry
        for name, entry in files.items()
        for s in [(directory / name).stat()]
    }


def verify_export(directory: str | Path) -> dict[str, Any]:
    """The export record, after checking every file's size and sha256 against it."""
    directory = Path(directory)
    record_path = directory / EXPORT_RECORD
    if not record_path.is_file():
        raise ArtifactError(
            f"{directory}: no {EXPORT_RECORD} (not a finished export); delete it and rerun"
        )
    record = read_json(record_path)
    present = {p.name for p in directory.iterdir() if p.is_file() and p.name != EXPORT_RECORD}
    if present != set(record["files"]):
        raise ArtifactError(
            f"{directory}: files differ from {EXPORT_RECORD} ({sorted(present ^ set(record['files']))})"
        )
    for name, entry in record["files"].items():
        path = directory / name
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise ArtifactError(
                f"{path}: checksum mismatch (corrupt or changed export); delete it and rerun"
            )
    return record


# ---------------------------------------------------------------- reading an export back


def _quantization_config(model_dir: Path) -> dict[str, Any] | None:
    return read_json(model_dir / "config.json").get("quantization_config")


def decompressed_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of an export (or of any model directory) as the dense model has it, one at a time.

    A compressed weight (its `<module>.shape/compressed/bitmask[/row_offsets]` tensors)
    comes back as `<module>.weight`, bit for bit the weight that was exported.
    """
    model_dir = Path(model_dir)
    quant = _quantization_config(model_dir) or {}
    fmt = (quant.get("sparsity_config") or {}).get("format")
    if fmt not in (None, "dense", *PARTS):
        raise ExportError(f"{model_dir}: compressed-tensors format {fmt!r} is not one rose reads")
    checkpoint = ckpt.Checkpoint.open(model_dir)
    names = checkpoint.names()
    parts = set(PARTS.get(fmt, ()))
    modules: dict[str, dict[str, str]] = {}
    for name in names:
        module, _, last = name.rpartition(".")
        if last in parts:
            modules.setdefault(module, {})[last] = name
    done: set[str] = set()
    for name in names:
        module, _, last = name.rpartition(".")
        if module in modules and last in parts:
            if module in done:
                continue
            found = modules[module]
            if set(found) != parts:
                raise ArtifactError(
                    f"{model_dir}: {module} has {sorted(found)}, {fmt} needs {sorted(parts)}"
                )
            done.add(module)
            yield (
                f"{module}.weight",
                decompress_weight({k: checkpoint.read(v) for k, v in found.items()}, fmt),
            )
        else:
            yield name, checkpoint.read(name)


def load_model(
    model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
):
    """A causal LM from an export directory, weights decompressed by rose (any transformers version)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = dict(decompressed_tensors(model_dir))
    dtype = dtype or next(iter(state.values())).dtype
    model_class = AutoModelForCausalLM._model_mapping[type(config)]  # the Auto class needs a path
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, output_loading_info=True
    )
    missing = set(info.get("missing_keys", ()))
    if getattr(config, "tie_word_embeddings", False):
        missing.discard("lm_head.weight")  # tied to the embedding
    if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise ExportError(
            f"{model_dir}: weights do not match config.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(info.get('unexpected_keys', ()))[:3]}, mismatched {sorted(info.get('mismatched_keys', ()))[:3]})"
        )
    return model.to(device).eval()


def decompress_export(model_dir: str | Path, out_dir: str | Path) -> Path:
    """A compressed export -> a plain dense HF directory (streamed, atomic)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    specs = []
    for name, tensor in decompressed_tensors(model_dir):
        specs.append(ckpt.TensorSpec(name, tensor.dtype, tuple(tensor.shape)))
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        ckpt.save_sharded(tmp, specs, decompressed_tensors(model_dir), metadata={"format": "pt"})
        for item in model_dir.iterdir():
            if item.is_file() and not ckpt.is_weight_file(item.name) and item.name != EXPORT_RECORD:
                shutil.copy2(item, tmp / item.name)
        config = read_json(tmp / "config.json")
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


# ---------------------------------------------------------------- the export stage


@dataclass(frozen=True)
class ExportRequest:
    """What one export step needs: the variant's dense directory and how to describe it."""

    variant: str
    sparsity: Sparsity
    model_dir: Path
    fingerprint: str
    config_hash: str
    run: str = ""


def export_directory(
    request: ExportRequest,
    fmt: str,
    out_dir: str | Path,
    run_dir: str | Path | None = None,
    shard_bytes: int = ckpt.SHARD_BYTES,
) -> dict[str, Any]:
    """The export itself, from an explicit request (no config needed)."""
    from rose.model_card import collect_evaluations, model_card_text

    check_formats([fmt])
    model_dir, out_dir = Path(request.model_dir), Path(out_dir)
    manifest = _check_source(request)
    dense_size = export_size(model_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        if fmt == "dense":
            details = _write_dense(model_dir, tmp)
        else:
            details = _write_compressed(model_dir, tmp, request, shard_bytes)
        size = export_size(tmp)
        ratio = (
            size["weights_bytes"] / dense_size["weights_bytes"]
            if dense_size["weights_bytes"]
            else None
        )
        sizes = {
            "weights_bytes": size["weights_bytes"],
            "dense_weights_bytes": dense_size["weights_bytes"],
            "ratio": ratio,
            "smaller_than_dense": bool(ratio is not None and ratio < 1.0),
            **details.pop("sizes", {}),
        }
        evaluations = (
            collect_evaluations(Path(run_dir), request.variant, request.fingerprint)
            if run_dir
            else {}
        )
        card = model_card_text(
            manifest,
            evaluations=evaluations,
            export={"format": fmt, **details, "sizes": sizes},
            run=request.run,
            num_layers=read_json(model_dir / "config.json").get("num_hidden_layers"),
        )
        (tmp / MODEL_CARD).write_text(card)
        source = {n: e for n, e in _files(model_dir).items() if ckpt.is_weight_file(n)}
        files = _files(tmp, known=_by_inode(model_dir, source))
        record = {
            "kind": "export",
            "format": fmt,
            "variant": request.variant,
            "method": manifest["method"],
            "sparsity": manifest["sparsity"],
            "model_fingerprint": request.fingerprint,
            "config_hash": request.config_hash,
            "source_files": source,
            **details,
            # total_bytes: every file of the directory but export.json itself
            "sizes": {**sizes, "total_bytes": sum(e["bytes"] for e in files.values())},
            "evaluations": evaluations.get("files", []),
            "versions": _versions(),
            "files": files,
        }
        atomic_write_json(tmp / EXPORT_RECORD, record)
    return record


def _check_source(request: ExportRequest) -> dict[str, Any]:
    """pruning.json of the dense directory, refused when it belongs to another model or variant."""
    path = request.model_dir / "pruning.json"
    if not path.is_file():
        raise ArtifactError(
            f"{request.model_dir}: no pruning.json (not a reassembled model); rerun the variant"
        )
    manifest = read_json(path)
    found = {
        "variant": manifest.get("variant"),
        "fingerprint": (manifest.get("model") or {}).get("fingerprint"),
    }
    want = {"variant": request.variant, "fingerprint": request.fingerprint}
    if found != want:
        raise ArtifactError(
            f"{path}: made for {found}, this export is for {want}; delete it and rerun"
        )
    return manifest


def _versions() -> dict[str, str | None]:
    from rose.provenance import versions

    out = versions()
    try:
        out[PACKAGE] = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        out[PACKAGE] = None
    return out


def _write_dense(model_dir: Path, out: Path) -> dict[str, Any]:
    """The reassembled directory as is: weights hard-linked (copied across filesystems), side files copied."""
    linked = True
    for item in sorted(model_dir.iterdir()):
        if not item.is_file() or item.name in (MODEL_CARD, EXPORT_RECORD):
            continue
        if ckpt.is_weight_file(item.name):
            try:
                os.link(item, out / item.name)
                continue
            except OSError:
                linked = False
        shutil.copy2(item, out / item.name)
    return {"compression": None, "hard_linked": linked}


def _write_compressed(
    model_dir: Path, out: Path, request: ExportRequest, shard_bytes: int
) -> dict[str, Any]:
    """Compress the pruned Linears (those in pruning.json) tensor by tensor; copy everything else."""
    compressed_tensors, ct_config, _ = _ct()
    manifest = read_json(model_dir / "pruning.json")
    fmt = sparse_format(request.sparsity)
    checkpoint = ckpt.Checkpoint.open(model_dir)
    specs = checkpoint.specs()
    names = checkpoint.names()
    targets = sorted(manifest["linears"])
    weights = {f"{module}.weight" for module in targets}
    missing = sorted(weights - set(names))
    if missing:
        raise ArtifactError(
            f"{model_dir}: pruning.json names {missing[0]}, which the weights do not have"
        )
    groups = [_upper_bound(specs[n], fmt) if n in weights else [specs[n]] for n in names]
    shards = _shard_plan(groups, shard_bytes)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    zeros = total = dense_linear = stored_linear = 0
    weight_map: dict[str, str] = {}
    source = iter(names)
    for file, shard in zip(files, shards, strict=True):
        with ckpt.SafetensorsWriter(
            out / file, [spec for group in shard for spec in group], {"format": "pt"}
        ) as writer:
            for _ in shard:
                name = next(source)
                tensor = checkpoint.read(name)
                zeros += _count_zeros(tensor)
                total += tensor.numel()
                stored = _encode(name, tensor, fmt if name in weights else None)
                for part, value in stored:
                    writer.write(part, value)
                    weight_map[part] = file
                if name in weights:
                    dense_linear += specs[name].nbytes
                    stored_linear += sum(v.numel() * v.element_size() for _, v in stored)
                del tensor, stored, value  # one source tensor in memory at a time
    if len(files) > 1:
        total_size = sum((out / f).stat().st_size for f in files)
        atomic_write_json(
            out / ckpt.INDEX, {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        )
    ckpt.copy_side_files(model_dir, out)
    with contextlib.suppress(FileNotFoundError):
        (out / MODEL_CARD).unlink()
    config_cls = (
        ct_config.Sparse24BitMaskConfig if fmt == SPARSE_24_BITMASK else ct_config.BitmaskConfig
    )
    sparsity_config = config_cls(
        targets=targets,
        ignore=[],
        global_sparsity=zeros / total if total else 0.0,
        sparsity_structure=sparsity_structure(request.sparsity),
    ).model_dump()
    config = read_json(out / "config.json")
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "sparsity_config": sparsity_config,
        "version": compressed_tensors.__version__,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {
        "compression": fmt,
        "sparsity_structure": sparsity_structure(request.sparsity),
        "compressed_linears": len(targets),
        "sizes": {
            "linear_dense_bytes": dense_linear,
            "linear_stored_bytes": stored_linear,
            "linear_ratio": stored_linear / dense_linear if dense_linear else None,
        },
    }
