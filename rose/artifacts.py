"""Atomic, self-describing artifacts.

Every file the pipeline writes goes to a temporary name in the same directory,
is fsynced, and is renamed into place only when complete. A killed job therefore
leaves either nothing or a finished artifact, never a half-written file that a
later run would trust. Each artifact also carries provenance (what produced it)
and readers refuse one whose provenance does not match the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

TMP_MARK = ".tmp-"


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
    tmp = _tmp_name(path)
    _remove(tmp)
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
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
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
    chunk_bytes: int = 4 << 20,
) -> None:
    """Write datasets plus provenance attributes atomically, with a checksum each.

    Datasets are float/int arrays, chunked (about 4 MiB) and uncompressed: the
    big ones (hidden states, Hessians) are read back whole and compression
    would only cost CPU time.
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            for key, value in attrs.items():
                fh.attrs[key] = value
            for name, value in datasets.items():
                array = _to_numpy(value)
                chunks = _chunks(array, chunk_bytes)
                dset = fh.create_dataset(name, data=array, chunks=chunks)
                dset.attrs["sha256"] = tensor_checksum(array)
                for key, attr in (dataset_attrs or {}).get(name, {}).items():
                    dset.attrs[key] = attr


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

    def names(self) -> list[str]:
        out: list[str] = []
        self._fh.visititems(lambda n, o: out.append(n) if isinstance(o, h5py.Dataset) else None)
        return out

    def read(self, name: str, verify: bool = True) -> np.ndarray:
        try:
            dset = self._fh[name]
            array = dset[()]
        except KeyError as exc:
            raise ArtifactError(f"{self.path}: no dataset '{name}'; delete it and rerun") from exc
        except OSError as exc:
            raise ArtifactError(
                f"{self.path}: dataset '{name}' is corrupt ({exc}); delete it and rerun"
            ) from exc
        if verify:
            want = dset.attrs.get("sha256")
            if want is not None and _normalise(want) != tensor_checksum(array):
                raise ArtifactError(
                    f"{self.path}: checksum mismatch in '{name}' (corrupt file); delete it and rerun"
                )
        return array

    def dataset_attrs(self, name: str) -> dict[str, Any]:
        return {k: _normalise(v) for k, v in self._fh[name].attrs.items()}

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> H5Artifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
