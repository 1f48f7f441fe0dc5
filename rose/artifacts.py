"""Atomic, self-describing artifacts.

Every file the pipeline writes goes to a temporary name in the same directory,
is fsynced, and is renamed into place only when complete. A killed job therefore
leaves either nothing or a finished artifact, never a half-written file that a
later run would trust. Each artifact also carries provenance (what produced it)
and readers refuse one whose provenance does not match the run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from rose.handoff import Handoff

TMP_MARK = ".tmp-"
PROVENANCE_KEY = "rose_provenance"


class ArtifactError(ValueError):
    """A file on disk is missing, corrupt, or was produced for another run."""


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` on success.

    Works for files and directories. On any exception the temporary is removed
    and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = _tmp_name(path)
    remove_path(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        elif tmp.is_dir():
            for child in tmp.rglob("*"):
                if child.is_file():
                    with open(child, "rb") as fh:
                        os.fsync(fh.fileno())
        else:
            raise ArtifactError(f"{path}: the writer produced nothing")
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        remove_path(tmp)
        disk_full = _disk_full(exc, path)
        if disk_full is not None:
            raise disk_full from None
        raise


def _disk_full(exc: BaseException, path: Path) -> OSError | None:
    """A full disk as one OSError(ENOSPC) naming the artifact.

    h5py and safetensors report ENOSPC without a file name, or not as an OSError at
    all (h5py: RuntimeError on close; safetensors: SafetensorError with 'os error 28')."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    text = str(exc)
    if "No space left on device" in text or "os error 28" in text or "errno = 28" in text:
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    return None


def ensure_space(path: str | Path, nbytes: int) -> None:
    """Refuse a write that cannot fit before it starts: h5py cannot close a file whose
    flush hit a full disk (and crashes the interpreter when it later retries)."""
    path = Path(path)
    needed = int(nbytes * 1.01) + (64 << 10)  # HDF5 headers, chunk index, attributes
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise OSError(
            errno.ENOSPC, f"No space left on device (needs {needed} bytes, {free} free)", str(path)
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries left by a killed writer (its pid is gone) are never renamed; drop them."""
    for candidate in path.parent.glob(f"{path.name}{TMP_MARK}*"):
        suffix = candidate.name[len(path.name) + len(TMP_MARK) :]
        if suffix.isdigit() and not _pid_alive(int(suffix)):
            remove_path(candidate)


def hold_lock(path: str | Path, what: str):
    """Take the run directory's lock for as long as the returned file stays open
    (the Snakemake controller holds it for its lifetime; the OS drops it if killed)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a")  # noqa: SIM115 - the open file is the lock
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ArtifactError(
            f"{what} is in use by another run (lock {path}); wait for it to finish"
        ) from None
    return fh


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Refuse a second writer on the same run directory instead of letting two interleave."""
    fh = hold_lock(path, what)
    try:
        yield
    finally:
        fh.close()


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable JSON ({exc}); delete it and rerun") from exc


def config_hash(settings: Mapping[str, Any]) -> str:
    """Short, stable hash of the settings that decide an artifact's content."""
    blob = json.dumps(settings, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tensor_checksum(array: np.ndarray | torch.Tensor) -> str:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().contiguous()
        data = array.view(torch.uint8).numpy() if array.dtype == torch.bfloat16 else array.numpy()
    else:
        data = np.ascontiguousarray(array)
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------- provenance


def tensor_checksum_many(tensors: Iterable[torch.Tensor]) -> str:
    """One checksum over several tensors' bytes, in the given order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(_to_numpy(tensor).tobytes())
    return digest.hexdigest()[:16]


def check_provenance(path: Path, found: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Refuse an artifact produced by another model, layer, variant or config."""
    for key, want in expected.items():
        have = found.get(key)
        if have is None:
            raise ArtifactError(
                f"{path}: no provenance key '{key}' (written by another tool or version); "
                "delete it and rerun"
            )
        if _normalise(have) != _normalise(want):
            raise ArtifactError(
                f"{path}: provenance '{key}' is {have!r} but this run expects {want!r}; "
                "it belongs to another model or config: use another run name or delete it"
            )


def _normalise(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# ---------------------------------------------------------------- HDF5


def write_h5(
    path: str | Path,
    datasets: Mapping[str, np.ndarray | torch.Tensor],
    attrs: Mapping[str, Any],
    dataset_attrs: Mapping[str, Mapping[str, Any]] | None = None,
    group_attrs: Mapping[str, Mapping[str, Any]] | None = None,
    chunk_bytes: int = 4 << 20,
    handoff: Handoff | None = None,
) -> None:
    """Write datasets plus provenance attributes atomically, with a checksum each.

    Datasets are float/int arrays, chunked (about 4 MiB) and uncompressed: the
    big ones (hidden states, Hessians) are read back whole and compression
    would only cost CPU time. With a `handoff`, the arrays are also kept in memory
    for the next stage of this process (`rose.handoff`).
    """
    arrays = {name: _to_numpy(value) for name, value in datasets.items()}
    written_attrs = {
        name: {"sha256": tensor_checksum(array), **(dataset_attrs or {}).get(name, {})}
        for name, array in arrays.items()
    }
    with atomic_path(path) as tmp:
        ensure_space(tmp, sum(a.nbytes for a in arrays.values()))
        with h5py.File(tmp, "w") as fh:
            for key, value in attrs.items():
                fh.attrs[key] = value
            for name, array in arrays.items():
                chunks = _chunks(array, chunk_bytes)
                dset = fh.create_dataset(name, data=array, chunks=chunks)
                for key, attr in written_attrs[name].items():
                    dset.attrs[key] = attr
            for group, values in (group_attrs or {}).items():
                node = fh.require_group(group)
                for key, attr in values.items():
                    node.attrs[key] = attr
                node.attrs["sha256"] = _attrs_checksum(values)
    if handoff is not None:
        memory = MemoryH5(path, attrs, arrays, written_attrs, group_attrs)
        handoff.keep(path, memory, memory.nbytes)


def _attrs_checksum(values: Mapping[str, Any]) -> str:
    canonical = json.dumps(
        {k: _normalise(v) for k, v in values.items()}, sort_keys=True, default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# HDF5 has no bfloat16: such tensors are stored as their raw 16-bit words, tagged with this
# dataset attribute, and `H5Artifact.iter_tensors` gives them back as bfloat16, bit for bit.
WORDS_OF = "torch_dtype"


class H5StreamWriter:
    """Write one large dataset slice by slice (hidden states), atomically.

    Slices must arrive in order along the first axis; the checksum is computed
    as they pass, so it equals `tensor_checksum` of the whole array without
    ever holding it in memory. `dtype` "bfloat16" stores bfloat16 tensors as
    their raw words (half of float32 on disk, nothing rounded).
    """

    def __init__(
        self,
        path: str | Path,
        name: str,
        shape: tuple[int, ...],
        dtype: np.dtype | str,
        attrs: Mapping[str, Any],
        chunk_bytes: int = 4 << 20,
        handoff: Handoff | None = None,
    ):
        self.path = Path(path)
        self.name = name
        self.shape = shape
        self.words = dtype == "bfloat16"
        self.dtype = np.dtype(np.uint16) if self.words else np.dtype(dtype)
        self.attrs = dict(attrs)
        self.chunk_bytes = chunk_bytes
        self._written = 0
        nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self._handoff = handoff if handoff is not None and handoff.admits(nbytes) else None
        self._memory: np.ndarray | None = None

    def __enter__(self) -> H5StreamWriter:
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        try:
            ensure_space(tmp, int(np.prod(self.shape)) * self.dtype.itemsize)
        except BaseException as error:
            self._ctx.__exit__(type(error), error, error.__traceback__)
            raise
        self._fh = h5py.File(tmp, "w")
        for key, value in self.attrs.items():
            self._fh.attrs[key] = value
        probe = np.empty((1, *self.shape[1:]), dtype=self.dtype)
        self._dset = self._fh.create_dataset(
            self.name, shape=self.shape, dtype=self.dtype, chunks=_chunks(probe, self.chunk_bytes)
        )
        if self.words:
            self._dset.attrs[WORDS_OF] = "bfloat16"
        if self._handoff is not None:
            self._memory = np.empty(self.shape, dtype=self.dtype)
        self._hash = hashlib.sha256()
        return self

    def write(self, block: np.ndarray | torch.Tensor) -> None:
        if self.words:
            if not (isinstance(block, torch.Tensor) and block.dtype == torch.bfloat16):
                raise TypeError(f"{self.path}: a bfloat16 dataset takes bfloat16 tensors")
            array = block.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
        else:
            array = _to_numpy(block).astype(self.dtype, copy=False)
        end = self._written + array.shape[0]
        if end > self.shape[0]:
            raise ValueError(
                f"{self.path}: more rows written than declared ({end} > {self.shape[0]})"
            )
        self._dset[self._written : end] = array
        if self._memory is not None:
            self._memory[self._written : end] = array
        self._hash.update(np.ascontiguousarray(array).tobytes())
        self._written = end

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self._written != self.shape[0]:
                    raise ValueError(
                        f"{self.path}: only {self._written} of {self.shape[0]} rows were written"
                    )
                self._dset.attrs["sha256"] = self._hash.hexdigest()[:16]
            self._fh.close()
        except BaseException as error:
            self._memory = None
            self._ctx.__exit__(type(error), error, error.__traceback__)
            raise
        self._ctx.__exit__(exc_type, exc, tb)
        if exc_type is None and self._memory is not None:
            written = {"sha256": self._hash.hexdigest()[:16]}
            if self.words:
                written[WORDS_OF] = "bfloat16"
            memory = MemoryH5(
                self.path, self.attrs, {self.name: self._memory}, {self.name: written}
            )
            self._handoff.keep(self.path, memory, memory.nbytes)
        self._memory = None


def _to_numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.contiguous().numpy()
    return np.ascontiguousarray(value)


def _chunks(array: np.ndarray, chunk_bytes: int) -> tuple[int, ...] | None:
    if array.ndim == 0 or array.size == 0:
        return None
    row_bytes = max(1, array[0].nbytes if array.ndim > 1 else array.itemsize)
    rows = max(1, min(array.shape[0], chunk_bytes // row_bytes))
    return (rows, *array.shape[1:])


class H5Artifact:
    """Read access to an artifact written by `write_h5`, validated on open."""

    def __init__(self, path: str | Path, expected: Mapping[str, Any] | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: missing artifact")
        try:
            self._fh = h5py.File(self.path, "r")
        except OSError as exc:
            raise ArtifactError(
                f"{self.path}: corrupt or truncated HDF5 ({exc}); delete it and rerun"
            ) from exc
        self.attrs = {k: _normalise(v) for k, v in self._fh.attrs.items()}
        if expected:
            check_provenance(self.path, self.attrs, expected)

    def _dataset(self, name: str) -> tuple[h5py.Dataset, str]:
        """The dataset and the checksum it was written with; a file without one is refused."""
        try:
            dset = self._fh[name]
        except KeyError as exc:
            raise ArtifactError(f"{self.path}: no dataset '{name}'; delete it and rerun") from exc
        want = dset.attrs.get("sha256")
        if want is None:
            raise ArtifactError(
                f"{self.path}: dataset '{name}' has no checksum (not written by rose-pipeline, or damaged); "
                "delete it and rerun"
            )
        return dset, _normalise(want)

    def read(self, name: str) -> np.ndarray:
        dset, want = self._dataset(name)
        try:
            array = dset[()]
        except OSError as exc:
            raise ArtifactError(
                f"{self.path}: dataset '{name}' is corrupt ({exc}); delete it and rerun"
            ) from exc
        if want != tensor_checksum(array):
            raise ArtifactError(
                f"{self.path}: checksum mismatch in '{name}' (corrupt file); delete it and rerun"
            )
        return array

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return tuple(self._fh[name].shape)
        except (KeyError, OSError, RuntimeError) as exc:
            raise ArtifactError(
                f"{self.path}: dataset '{name}' is missing or corrupt ({exc}); delete it and rerun"
            ) from exc

    def iter_batches(self, name: str, batch: int):
        """Yield slices along the first axis; the checksum is verified after the last one.

        Callers must not commit any result before the iteration has finished,
        since a corrupt file is only detected at its end.
        """
        dset, want = self._dataset(name)
        digest = hashlib.sha256()
        for start in range(0, dset.shape[0], batch):
            try:
                array = dset[start : start + batch]
            except OSError as exc:
                raise ArtifactError(
                    f"{self.path}: dataset '{name}' is corrupt ({exc}); delete it and rerun"
                ) from exc
            digest.update(np.ascontiguousarray(array).tobytes())
            yield array
        if want != digest.hexdigest()[:16]:
            raise ArtifactError(
                f"{self.path}: checksum mismatch in '{name}' (corrupt file); delete it and rerun"
            )

    def iter_tensors(self, name: str, batch: int) -> Iterator[torch.Tensor]:
        """`iter_batches` as torch tensors; datasets of bfloat16 words come back as bfloat16."""
        dset, _ = self._dataset(name)
        words = _normalise(dset.attrs.get(WORDS_OF))
        if words not in (None, "bfloat16"):
            raise ArtifactError(
                f"{self.path}: dataset '{name}' claims words of {words!r}; delete it and rerun"
            )
        if words is None and dset.dtype == np.uint16:
            raise ArtifactError(
                f"{self.path}: dataset '{name}' holds 16-bit words without their dtype; "
                "delete it and rerun"
            )
        for array in self.iter_batches(name, batch):
            yield decode_words(torch.from_numpy(array), words)

    def group_attrs(self, group: str) -> dict[str, Any]:
        """A group's attributes, verified against the checksum written with them."""
        try:
            values = {k: _normalise(v) for k, v in self._fh[group].attrs.items()}
        except (KeyError, OSError, RuntimeError) as exc:
            raise ArtifactError(
                f"{self.path}: group '{group}' is missing or corrupt ({exc}); delete it and rerun"
            ) from exc
        want = values.pop("sha256", None)
        if want is None:
            raise ArtifactError(
                f"{self.path}: group '{group}' has no checksum; delete it and rerun"
            )
        if want != _attrs_checksum(values):
            raise ArtifactError(
                f"{self.path}: checksum mismatch in the attributes of '{group}' (corrupt file); delete it and rerun"
            )
        return values

    def dataset_attrs(self, name: str) -> dict[str, Any]:
        return {k: _normalise(v) for k, v in self._fh[name].attrs.items()}

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> H5Artifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_words(tensor: torch.Tensor, words: str | None) -> torch.Tensor:
    """A dataset slice as its tensor: raw bfloat16 words (`WORDS_OF`) back to bfloat16."""
    return tensor.view(torch.int16).view(torch.bfloat16) if words else tensor


class MemoryH5:
    """An HDF5 artifact's contents as its writer wrote them, with `H5Artifact`'s read interface.

    Reads return copies, so a reader that works in place cannot change what the next
    reader gets."""

    def __init__(
        self,
        path: str | Path,
        attrs: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray],
        dataset_attrs: Mapping[str, Mapping[str, Any]] | None = None,
        group_attrs: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.path = Path(path)
        self.attrs = {k: _normalise(v) for k, v in attrs.items()}
        self._arrays = dict(arrays)
        self._dataset_attrs = {
            name: {k: _normalise(v) for k, v in values.items()}
            for name, values in (dataset_attrs or {}).items()
        }
        self._group_attrs = {
            name: {k: _normalise(v) for k, v in values.items()}
            for name, values in (group_attrs or {}).items()
        }

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())

    def read(self, name: str) -> np.ndarray:
        return self._arrays[name].copy()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._arrays[name].shape)

    def iter_batches(self, name: str, batch: int) -> Iterator[np.ndarray]:
        array = self._arrays[name]
        for start in range(0, array.shape[0], batch):
            yield array[start : start + batch].copy()

    def iter_tensors(self, name: str, batch: int) -> Iterator[torch.Tensor]:
        words = self._dataset_attrs.get(name, {}).get(WORDS_OF)
        for array in self.iter_batches(name, batch):
            yield decode_words(torch.from_numpy(array), words)

    def group_attrs(self, group: str) -> dict[str, Any]:
        return dict(self._group_attrs[group])

    def dataset_attrs(self, name: str) -> dict[str, Any]:
        return dict(self._dataset_attrs.get(name, {}))

    def close(self) -> None:
        pass

    def __enter__(self) -> MemoryH5:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_h5(
    path: str | Path, expected: Mapping[str, Any] | None, handoff: Handoff | None = None
) -> H5Artifact | MemoryH5:
    """The artifact from the handoff when this process just wrote it, else from disk."""
    kept = handoff.take(path) if handoff is not None else None
    if isinstance(kept, MemoryH5):
        if expected:
            check_provenance(Path(path), kept.attrs, expected)
        return kept
    return H5Artifact(path, expected)


# ---------------------------------------------------------------- safetensors files


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsWriter:
    """One safetensors file written as its tensors arrive: one tensor in memory at a time.

    The header is reserved for the planned sizes and written last, padded with
    spaces to the reserved length (the format allows it). With `exact` every tensor
    must be as planned; without, a tensor may come out shorter (an export's sparse
    values, known only once its weight is read), so the header can only shrink.
    """

    def __init__(
        self,
        path: Path,
        planned: list[TensorSpec],
        metadata: dict[str, str] | None = None,
        exact: bool = False,
    ):
        self.path = path
        self.planned = planned
        self.metadata = metadata
        self.exact = exact
        self.actual: list[TensorSpec] = []
        self._reserved = len(self._header(planned))
        self._reserved += -self._reserved % 8
        self._fh = path.open("wb")
        self._fh.write(b"\0" * (8 + self._reserved))

    def _header(self, specs: list[TensorSpec]) -> bytes:
        header: dict[str, Any] = {"__metadata__": dict(self.metadata)} if self.metadata else {}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        return json.dumps(header, separators=(",", ":")).encode()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        plan = self.planned[len(self.actual)]
        shape = tuple(tensor.shape)
        if (
            name != plan.name
            or tensor.dtype != plan.dtype
            or len(shape) != len(plan.shape)
            or any(a > b for a, b in zip(shape, plan.shape, strict=True))
            or (self.exact and shape != tuple(plan.shape))
        ):
            raise ValueError(
                f"{self.path}: expected {plan.name} {plan.dtype} <= {plan.shape}, got {name} {tensor.dtype} {shape}"
            )
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            self._fh.write(flat.view(torch.uint8).numpy().data)  # no copy
        self.actual.append(TensorSpec(name, tensor.dtype, shape))

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._fh.close()
            return
        try:
            if len(self.actual) != len(self.planned):
                raise ValueError(
                    f"{self.path}: {len(self.actual)} of {len(self.planned)} tensors were written"
                )
            # The real header into the reserved space: it is never longer than the planned one.
            blob = self._header(self.actual)
            blob += b" " * (self._reserved - len(blob))
            self._fh.seek(0)
            self._fh.write(struct.pack("<Q", len(blob)))
            self._fh.write(blob)
        finally:
            self._fh.close()


# ---------------------------------------------------------------- pruned layers (safetensors)


@dataclass(frozen=True)
class MemoryTensors:
    """A `write_pruned` file's tensors and provenance as written, kept for the next stage."""

    provenance: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def write_pruned(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    provenance: Mapping[str, Any],
    handoff: Handoff | None = None,
) -> None:
    """One layer's pruned weights, atomically, stamped with provenance and a checksum.

    The file is also a shard of the reassembled model (rose.stages.assemble links it
    there): tensors under their checkpoint names, in name order, and the `format`
    metadata transformers' loaders ask for. Written by SafetensorsWriter, whose header
    keeps the metadata's order (safetensors' own writer orders keys at random, and the
    bytes must not vary between runs).
    """
    stamped = json.dumps({**provenance, "sha256": _tensors_checksum(tensors)}, sort_keys=True)
    names = sorted(tensors)
    specs = [TensorSpec(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
    with atomic_path(path) as tmp:
        metadata = {"format": "pt", PROVENANCE_KEY: stamped}
        with SafetensorsWriter(tmp, specs, metadata, exact=True) as writer:
            for name in names:
                writer.write(name, tensors[name])
    if handoff is not None:  # the provenance as a reader parses it from the file
        memory = MemoryTensors(
            json.loads(stamped),
            {name: t.detach().cpu().clone() for name, t in tensors.items()},
        )
        handoff.keep(path, memory, memory.nbytes)


def read_pruned(
    path: str | Path, expected_provenance: Mapping[str, Any], handoff: Handoff | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a `write_pruned` file; refused if made for another run or corrupt.
    With a `handoff`, the tensors this process just wrote there, if it still holds them."""
    path = Path(path)
    kept = handoff.take(path) if handoff is not None else None
    if isinstance(kept, MemoryTensors):
        check_provenance(path, kept.provenance, expected_provenance)
        return {name: t.clone() for name, t in kept.tensors.items()}
    try:
        with safe_open(str(path), framework="pt") as fh:
            found = json.loads((fh.metadata() or {}).get(PROVENANCE_KEY, "{}"))
            check_provenance(path, found, expected_provenance)
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (FileNotFoundError, ArtifactError):
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ArtifactError(
            f"{path}: corrupt or truncated safetensors ({exc}); delete it and rerun"
        ) from exc
    if found.get("sha256") != _tensors_checksum(tensors):
        raise ArtifactError(f"{path}: checksum mismatch (corrupt file); delete it and rerun")
    return tensors


def _tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    return tensor_checksum_many(tensors[name] for name in sorted(tensors))


# ---------------------------------------------------------------- reading ahead


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Read the next items (HDF5 slices) in a background thread while the caller computes.

    h5py releases the GIL for I/O and torch for compute, so disk reads of the
    next batch overlap the forward of this one. Order and values are unchanged;
    an exception in the reader is raised in the caller at the item it hit.
    """
    import queue
    import threading

    done = object()
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as exc:  # handed to the consumer
            put((done, exc))

    thread = threading.Thread(target=reader, name="rose-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()
