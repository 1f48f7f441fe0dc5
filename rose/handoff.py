"""In-process stage handoff: what a stage just wrote, kept in memory for the next stage.

A layer's stages run one after another: the Hessians stage reads the inputs the
previous layer's forward wrote, `order` and `prune` read the Hessians, `forward`
reads the pruned weights and the inputs again. When those stages run in one
process (`python -m rose run`, or Snakemake jobs run as threads of the
controller), reading back what was written a moment ago costs a disk read and a
checksum pass over gigabytes per layer at 7B and above. The writers of
`rose.artifacts` therefore also hand their arrays to a `Handoff` (as `MemoryH5` /
`MemoryTensors`), and the readers take them from it instead of the file. Every artifact is still written, atomically,
so resume is unchanged; the memory copy is only served while the file on disk
is the one this process wrote (same device, inode and size; not the mtime, which
Snakemake moves on every output it accepts), and readers check
its provenance as they would the file's. The copy holds the very arrays the
file holds, so a stage reads the same values either way: pruned weights are
bit-identical with and without a handoff.

Memory is bounded: an artifact larger than the budget is not kept, entries whose
file was removed or replaced (Snakemake's temp() files, once consumed) go first
and then the least recently used ones, to make room. The runner also drops an
entry as soon as no later stage of the same layer reads it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rose.device import available_memory

log = logging.getLogger("rose")


@dataclass(frozen=True)
class _Entry:
    value: Any
    nbytes: int
    signature: tuple[int, int, int]


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size


class Handoff:
    """Artifacts this process wrote, by path, up to `budget` bytes (thread-safe)."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self._entries: OrderedDict[Path, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._served: set[Path] = set()

    @property
    def used(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def admits(self, nbytes: int) -> bool:
        """Whether an artifact of `nbytes` may be kept (writers check before copying)."""
        return 0 < nbytes <= self.budget

    def keep(self, path: str | Path, value: Any, nbytes: int) -> None:
        """Remember `value` as the contents of `path`, which must already be in place."""
        path = Path(path)
        signature = _signature(path)
        if signature is None or not self.admits(nbytes):
            return
        with self._lock:
            self._entries.pop(path, None)
            for stale in [p for p, e in self._entries.items() if _signature(p) != e.signature]:
                del self._entries[stale]
            used = sum(e.nbytes for e in self._entries.values())
            while self._entries and used + nbytes > self.budget:
                _, dropped = self._entries.popitem(last=False)
                used -= dropped.nbytes
            self._entries[path] = _Entry(value, nbytes, signature)

    def take(self, path: str | Path) -> Any | None:
        """The kept contents of `path`, or None (never kept, dropped, or the file changed)."""
        path = Path(path)
        with self._lock:
            entry = self._entries.get(path)
            if entry is None:
                return None
            if _signature(path) != entry.signature:
                del self._entries[path]
                return None
            self._entries.move_to_end(path)
            self._served.add(path)
        log.info("%s: taken from memory, not read back (handoff)", path)
        return entry.value

    def forget(self, path: str | Path) -> None:
        with self._lock:
            self._entries.pop(Path(path), None)

    def drain_served(self) -> set[Path]:
        """Paths served from memory since the last call (the runner's per-step I/O count)."""
        with self._lock:
            served, self._served = self._served, set()
            return served


def make_handoff(setting: float | str | None) -> Handoff | None:
    """The handoff a process gets for its `handoff_memory` setting (None when it is 0)."""
    budget = handoff_budget(setting, available_memory("cpu"))
    return Handoff(budget) if budget > 0 else None


def handoff_budget(setting: float | str | None, available: int) -> int:
    """The `handoff_memory` setting in bytes: `auto` is a quarter of the host's available
    memory at the start of the run; a number is GiB; 0 turns the handoff off."""
    if setting in (None, "auto"):
        return available // 4
    return int(float(setting) * 2**30)
