"""Helpers for the fault-injection suite: damage artifacts at known bytes, inject faults.

Damage is placed, not sprayed: each function finds the bytes it means to hit
(a dataset's stored data through h5py's chunk/offset API, an attribute's value,
a dataset's object header, a safetensors tensor's data or header entry), damages
them, and checks afterwards that it hit exactly that region (the file still opens
and only the target differs, or the header no longer parses), so a case cannot
pass because the damage landed in free space.

Faults in child processes are injected into unmodified commands (`python -m rose
run`, `snakemake`, Snakemake's job subprocesses) through a `sitecustomize.py`
put first on PYTHONPATH and switched on by the ROSE_FAULT environment variable;
the hook decides where the process pauses or dies, and leaves a `fired` file
saying where, so a test can tell a kill that landed from one that did not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pipeline_utils import REPO

TMP_MARK = ".tmp-"
XOR = 0x5A  # maps hex digits, decimal digits and quotes to other printable bytes

# ---------------------------------------------------------------- the hook in child processes

SITECUSTOMIZE = r'''
"""Fault hook for the rose fault-injection tests (active only with ROSE_FAULT set)."""
import json, os, signal, sys, time

_SPEC = json.loads(os.environ["ROSE_FAULT"]) if os.environ.get("ROSE_FAULT") else None
_COUNT = {"n": 0}


def _write(path, text):
    with open(path + ".part", "w") as fh:
        fh.write(text)
    os.replace(path + ".part", path)


def _fire(where):
    """The fault point is reached: say so (pid, where), then die or wait to be released."""
    _write(_SPEC["fired"], json.dumps({"pid": os.getpid(), "where": where}))
    if _SPEC["action"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    deadline = time.time() + 120
    while not os.path.exists(_SPEC["release"]) and time.time() < deadline:
        time.sleep(0.02)


def _due():
    _COUNT["n"] += 1
    return _COUNT["n"] == _SPEC.get("n", 1)


def _install_rename():
    """Fire before or after the rename that puts `match` (a path under `root`) into place."""
    real = os.replace
    target = os.path.join(_SPEC["root"], _SPEC["match"])

    def replace(src, dst, *args, **kwargs):
        hit = os.path.abspath(str(dst)) == target and _due()
        if hit and _SPEC.get("before"):
            _fire(f"before renaming {src} to {dst}")
        result = real(src, dst, *args, **kwargs)
        if hit and not _SPEC.get("before"):
            _fire(f"after renaming {src} to {dst}")
        return result

    os.replace = replace


def _install_h5_write():
    """Fire in the n-th slice written to an HDF5 file whose name contains `match`."""
    import h5py

    real = h5py.Dataset.__setitem__

    def setitem(self, key, value):
        if _SPEC["match"] in self.file.filename and _due():
            _fire(f"writing a slice of {self.file.filename}")
        return real(self, key, value)

    h5py.Dataset.__setitem__ = setitem


def _wrap_call(module):
    """Fire in module.func when one of its string arguments contains `contains`."""
    real = getattr(module, _SPEC["func"])

    def wrapped(*args, **kwargs):
        texts = [a for a in (*args, *kwargs.values()) if isinstance(a, str)]
        if any(_SPEC["contains"] in t for t in texts) and _due():
            _fire(f"{_SPEC['module']}.{_SPEC['func']}({', '.join(texts)})")
        return real(*args, **kwargs)

    setattr(module, _SPEC["func"], wrapped)


def _install_call():
    """Patch the function as its module is loaded, before anyone imports it by name."""
    import importlib.abc
    import importlib.util

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != _SPEC["module"]:
                return None
            sys.meta_path.remove(self)
            found = importlib.util.find_spec(name)
            run = found.loader.exec_module

            def exec_module(module):
                run(module)
                _wrap_call(module)

            found.loader.exec_module = exec_module
            return found

    sys.meta_path.insert(0, Finder())


if _SPEC is not None:
    {"rename": _install_rename, "h5-write": _install_h5_write, "call": _install_call}[_SPEC["at"]]()
'''


@dataclass
class Hook:
    """One fault for child processes: where (`at`: rename | h5-write | call), kill or pause."""

    directory: Path
    action: str
    at: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def fired_file(self) -> Path:
        return self.directory / "fired"

    @property
    def release_file(self) -> Path:
        return self.directory / "release"

    def env(self) -> dict[str, str]:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
        spec = {
            "action": self.action,
            "at": self.at,
            "fired": str(self.fired_file),
            "release": str(self.release_file),
            **self.params,
        }
        path = os.pathsep.join([str(self.directory), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        return {**os.environ, "PYTHONPATH": path, "ROSE_FAULT": json.dumps(spec)}

    def fired(self) -> dict[str, Any] | None:
        """{pid, where} once the fault point was reached, else None."""
        return json.loads(self.fired_file.read_text()) if self.fired_file.exists() else None

    def wait_paused(self, proc: subprocess.Popen, timeout: float = 120) -> int:
        """The pid of the process paused at the fault point (fails if `proc` ended first)."""
        wait_for(lambda: self.fired_file.exists() or proc.poll() is not None, timeout)
        assert self.fired_file.exists(), (
            f"the fault point {self.at} {self.params} was never reached (exit {proc.poll()})"
        )
        return int(self.fired()["pid"])

    def release(self) -> None:
        self.release_file.touch()


# ---------------------------------------------------------------- processes


def popen(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session so that the whole tree can be killed."""
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=REPO,
        env=env,
    )


def run(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def rose_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "rose", *args]


def wait_for(condition: Callable[[], bool], timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def kill_tree(proc: subprocess.Popen) -> str:
    """SIGKILL the process group of `proc` (started by `popen`); its output so far."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    return out or ""


def parent_of(pid: int) -> int:
    """The parent pid from /proc (0 when the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def is_descendant(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = parent_of(pid)
        if pid == ancestor:
            return True
    return False


def rose_cli(args: list[str]) -> tuple[int, list[str]]:
    """`rose.cli.main` in this process: exit code and its `rose: error:` lines."""
    from rose.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    return code, error_lines(err.getvalue())


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("rose: error:")]


def patch_everywhere(monkeypatch, module: str, name: str, replacement: Any) -> int:
    """Replace `module.name` and every `from module import name` copy in the rose package.

    The library is being reorganised; patching by identity keeps the tests independent
    of which rose module imports what. Returns how many places were patched.
    """
    import importlib

    source = importlib.import_module(module)
    original = getattr(source, name)
    places = 0
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (
            mod_name == module or mod_name == "rose" or mod_name.startswith("rose.")
        ):
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                monkeypatch.setattr(mod, attr, replacement)
                places += 1
    # a stage's record holds its function: the record runs the replacement too
    from rose.stages import STAGES

    for stage, record in list(STAGES.items()):
        if record.run is original:
            monkeypatch.setitem(STAGES, stage, dataclasses.replace(record, run=replacement))
            places += 1
    assert places, f"{module}.{name} is not used anywhere"
    return places


# ---------------------------------------------------------------- the state of a run directory


def temporaries(root: Path) -> list[Path]:
    """Files or directories left under a writer's temporary name."""
    return sorted(p for p in root.rglob(f"*{TMP_MARK}*"))


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@dataclass(frozen=True)
class RunState:
    """What a run directory holds: finished layers and models, temporaries."""

    layers_done: tuple[str, ...]  # "<variant>/layer_<i>" with pruned.safetensors and stats.json
    models: tuple[str, ...]  # variants whose reassembled model exists
    temporaries: tuple[str, ...]

    @classmethod
    def of(cls, run_dir: Path, variants: tuple[str, ...], depth: int) -> RunState:
        done = tuple(
            f"{v}/layer_{i}"
            for v in variants
            for i in range(depth)
            if (run_dir / v / f"layer_{i}" / "pruned.safetensors").exists()
            and (run_dir / v / f"layer_{i}" / "stats.json").exists()
        )
        models = tuple(v for v in variants if (run_dir / v / "model").exists())
        temps = tuple(str(p.relative_to(run_dir)) for p in temporaries(run_dir))
        return cls(done, models, temps)

    def describe(self) -> str:
        return (
            f"layers done {list(self.layers_done)}, models {list(self.models)}, "
            f"temporaries {list(self.temporaries)}"
        )


# ---------------------------------------------------------------- damage: whole files


def truncate(path: Path) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return f"cut to {len(data) // 2} of {len(data)} bytes"


def _occurrences(data: bytes, needle: bytes, start: int = 0, end: int | None = None) -> list[int]:
    end = len(data) if end is None else end
    out, at = [], data.find(needle, start, end)
    while at >= 0:
        out.append(at)
        at = data.find(needle, at + 1, end)
    return out


def _xor(path: Path, start: int, length: int) -> None:
    data = bytearray(path.read_bytes())
    assert 0 <= start and start + length <= len(data), (start, length, len(data))
    for offset in range(start, start + length):
        data[offset] ^= XOR
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- damage: HDF5


def _h5_snapshot(path: Path) -> dict[str, Any]:
    """Every dataset's values and every attribute, keyed by object path."""
    import h5py

    out: dict[str, Any] = {}
    with h5py.File(path, "r") as fh:
        out["/@"] = {k: np.asarray(v).tolist() for k, v in fh.attrs.items()}

        def visit(name, obj):
            out[f"{name}@"] = {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]

        fh.visititems(visit)
    return out


def _changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    keys = before.keys() | after.keys()
    out = []
    for key in sorted(keys):
        a, b = before.get(key), after.get(key)
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            same = a.shape == b.shape and a.tobytes() == b.tobytes()
        else:
            same = a == b
        if not same:
            out.append(key)
    return out


def _largest_dataset(path: Path) -> str:
    import h5py

    sizes: dict[str, int] = {}
    with h5py.File(path, "r") as fh:
        fh.visititems(
            lambda n, o: (
                sizes.__setitem__(n, o.id.get_storage_size())
                if isinstance(o, h5py.Dataset)
                else None
            )
        )
    return max(sizes, key=lambda n: (sizes[n], n))


def h5_data(path: Path, dataset: str | None = None, length: int = 16) -> str:
    """XOR `length` bytes in the middle of the stored data of `dataset` (default: the largest).

    Chunked datasets: the middle chunk, at the byte offset HDF5 reports for it
    (`get_chunk_info`); contiguous ones: `get_offset()`. Afterwards the file must
    still open, and only that dataset's values may differ.
    """
    import h5py

    dataset = dataset or _largest_dataset(path)
    before = _h5_snapshot(path)
    with h5py.File(path, "r") as fh:
        ds = fh[dataset]
        if ds.chunks:
            count = ds.id.get_num_chunks()
            index = count // 2
            info = ds.id.get_chunk_info(index)
            start, size = info.byte_offset, info.size
            where = f"chunk {index} of {count}"
        else:
            start, size = ds.id.get_offset(), ds.id.get_storage_size()
            where = "contiguous data"
    assert start is not None and size > 0, f"{path}: {dataset} has no stored data"
    offset = start + size // 2 - min(length, size) // 2
    length = min(length, size)
    _xor(path, offset, length)
    changed = _changed(before, _h5_snapshot(path))
    assert changed == [dataset], (
        f"{path}: damage at {offset} was meant for {dataset}'s data, changed {changed}"
    )
    return f"{dataset} {where}, bytes {offset}..{offset + length} of its {size} at {start}"


def h5_attr(path: Path, obj: str, attr: str) -> str:
    """XOR the stored value of attribute `attr` of `obj` ('/' = the file) where it lies in the file.

    The value's bytes (UTF-8 for strings, the attribute's own encoding for numbers)
    must occur exactly once in the file; afterwards only that attribute may differ.
    """
    import h5py

    before = _h5_snapshot(path)
    with h5py.File(path, "r") as fh:
        node = fh[obj]
        value = node.attrs[attr]
        dtype = node.attrs.get_id(attr).dtype
    if isinstance(value, bytes | str):
        needle = value.encode() if isinstance(value, str) else value
    else:
        needle = np.asarray(value, dtype=dtype).tobytes()
    hits = _occurrences(path.read_bytes(), needle)
    assert len(hits) == 1, f"{path}: the value of {obj}@{attr} ({value!r}) occurs {len(hits)} times"
    _xor(path, hits[0], len(needle))
    key = "/@" if obj == "/" else f"{obj.strip('/')}@"
    changed = _changed(before, _h5_snapshot(path))
    assert changed == [key], f"{path}: damage meant for {obj}@{attr} changed {changed}"
    return f"attribute {obj}@{attr} ({len(needle)} bytes at {hits[0]}, was {value!r})"


def h5_object_header(path: Path, dataset: str | None = None) -> str:
    """XOR the body of the first message (the dataspace: rank and dimensions) in the object
    header of `dataset` (default: the largest); afterwards HDF5 can no longer open it."""
    import h5py

    dataset = dataset or _largest_dataset(path)
    with h5py.File(path, "r") as fh:
        address = h5py.h5o.get_info(fh[dataset].id).addr
    data = path.read_bytes()
    assert data[address] == 1, f"{path}: {dataset}'s object header is not version 1"
    # v1 object header: 16-byte prefix, then messages with an 8-byte message header each
    start = address + 16 + 8
    _xor(path, start, 8)
    with h5py.File(path, "r") as fh:
        try:
            _ = fh[dataset].shape
        except (KeyError, OSError, RuntimeError, ValueError):
            pass
        else:
            raise AssertionError(f"{path}: damaging {dataset}'s dataspace message left it readable")
    return f"{dataset}'s object header, dataspace message (8 bytes at {start})"


# ---------------------------------------------------------------- damage: safetensors


def _st_header(path: Path) -> tuple[int, dict[str, Any]]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return size, json.loads(data[8 : 8 + size])


def _st_tensor(header: dict[str, Any], name: str | None) -> str:
    names = sorted(k for k in header if k != "__metadata__")
    return name or names[len(names) // 2]


def _st_load(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="np") as fh:
        metadata = fh.metadata() or {}
    return metadata, load_file(str(path))


def st_data(path: Path, tensor: str | None = None, length: int = 16) -> str:
    """XOR `length` bytes in the middle of one tensor's data (after the 8-byte length and the
    JSON header, at the tensor's data_offsets); afterwards only that tensor may differ."""
    size, header = _st_header(path)
    name = _st_tensor(header, tensor)
    begin, end = header[name]["data_offsets"]
    base = 8 + size
    offset = base + (begin + end) // 2 - length // 2
    assert base + begin <= offset and offset + length <= base + end
    meta_before, before = _st_load(path)
    _xor(path, offset, length)
    meta_after, after = _st_load(path)
    changed = sorted(k for k in before if before[k].tobytes() != after[k].tobytes())
    assert meta_after == meta_before and changed == [name], f"{path}: data damage changed {changed}"
    return f"tensor {name}, bytes {offset}..{offset + length} (data region starts at {base})"


def st_header(path: Path, tensor: str | None = None) -> str:
    """XOR the `"shape":[...]` entry of one tensor in the JSON header; afterwards the header
    is no longer valid JSON."""
    size, header = _st_header(path)
    name = _st_tensor(header, tensor)
    data = path.read_bytes()
    entry = data.index(json.dumps(name).encode(), 8, 8 + size)
    start = data.index(b'"shape"', entry, 8 + size)
    _xor(path, start, 8)
    with contextlib.suppress(ValueError):
        json.loads(path.read_bytes()[8 : 8 + size])
        raise AssertionError(f"{path}: header damage left valid JSON")
    return f'JSON header, the "shape" entry of {name} (8 bytes at {start} of {8 + size})'


def st_metadata_value(path: Path, key: str, field_name: str) -> str:
    """XOR the value of `field_name` inside the JSON string stored under metadata `key`
    (e.g. the checksum in the provenance); afterwards only that value differs."""
    size, header = _st_header(path)
    stamped = json.loads(header["__metadata__"][key])
    value = str(stamped[field_name]).encode()
    hits = _occurrences(path.read_bytes(), value, 8, 8 + size)
    assert len(hits) == 1, (
        f"{path}: {key}.{field_name} = {value!r} occurs {len(hits)} times in the header"
    )
    meta_before, before = _st_load(path)
    _xor(path, hits[0], len(value))
    meta_after, after = _st_load(path)
    assert all(before[k].tobytes() == after[k].tobytes() for k in before)
    now = json.loads(meta_after[key])
    assert {k for k in stamped if stamped[k] != now.get(k)} == {field_name}
    return f"metadata {key}.{field_name} ({len(value)} bytes at {hits[0]})"


# ---------------------------------------------------------------- damage: JSON


def json_garble(path: Path, length: int = 16) -> str:
    """XOR `length` bytes from a quote in the second half (the first one for which the result
    is no longer JSON: XOR never yields a quote, so a string can swallow the damage)."""
    data = path.read_bytes()
    start = data.find(b'"', len(data) // 2)
    while start >= 0:
        size = min(length, len(data) - start)
        damaged = bytearray(data)
        for offset in range(start, start + size):
            damaged[offset] ^= XOR
        try:
            json.loads(bytes(damaged))
        except ValueError:
            path.write_bytes(bytes(damaged))
            return f"bytes {start}..{start + size} of {len(data)}"
        start = data.find(b'"', start + 1)
    raise AssertionError(f"{path}: no damage from a quote in the second half breaks the JSON")


# ---------------------------------------------------------------- a small tmpfs


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Callable[[str], None]]:
    """Mount a tmpfs of `size` at `path` (yields a resize function); skip where not permitted."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.decode().strip()})")

    def resize(new: str) -> None:
        subprocess.run(
            ["mount", "-o", f"remount,size={new}", str(path)], check=True, capture_output=True
        )

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
