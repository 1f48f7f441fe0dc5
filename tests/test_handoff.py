"""In-process stage handoff (rose.handoff): the next stage gets what the file holds, from memory.

The memory copy must be indistinguishable from reading the file back (values, dtypes,
attributes, provenance checks), must never be served once the file changed, must stay
within its budget, and a run with it must give the same bytes as a run without it
while reading far less from disk.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from pipeline_utils import write_config
from tiny import make_tiny_model

from rose import config as rose_config
from rose import runner
from rose.artifacts import (
    ArtifactError,
    H5Artifact,
    H5StreamWriter,
    MemoryH5,
    open_h5,
    read_pruned,
    write_h5,
    write_pruned,
)
from rose.handoff import Handoff, handoff_budget, make_handoff
from rose.hessian import HessianWriter

PROV = {"kind": "test", "layer": 3}


def _same_reads(memory, disk, name: str, batch: int = 3) -> None:
    assert memory.attrs == disk.attrs
    assert memory.shape(name) == disk.shape(name)
    a, b = memory.read(name), disk.read(name)
    assert a.dtype == b.dtype and np.array_equal(a, b)
    for x, y in zip(memory.iter_tensors(name, batch), disk.iter_tensors(name, batch), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert memory.dataset_attrs(name) == disk.dataset_attrs(name)


def test_write_h5_hands_over_what_the_file_holds(tmp_path):
    handoff = Handoff(1 << 30)
    path = tmp_path / "order.h5"
    datasets = {
        "q/permutation": torch.randperm(37),
        "q/column_loss": torch.rand(37, dtype=torch.float64),
        "q/bf16": torch.randn(5, 7).to(torch.bfloat16),  # write_h5 stores bf16 as float32
    }
    groups = {"q": {"relative_range": 0.73, "columnar": True, "threshold": 0.5}}
    write_h5(path, datasets, PROV, group_attrs=groups, handoff=handoff)
    memory = handoff.take(path)
    assert isinstance(memory, MemoryH5)
    with H5Artifact(path, PROV) as disk:
        for name in datasets:
            _same_reads(memory, disk, name)
        assert memory.group_attrs("q") == disk.group_attrs("q")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stream_writer_hands_over_batches_bit_for_bit(tmp_path, dtype):
    handoff = Handoff(1 << 30)
    path = tmp_path / "inputs.h5"
    torch_dtype = getattr(torch, dtype)
    data = torch.randn(10, 4, 6).to(torch_dtype)
    with H5StreamWriter(path, "hidden", tuple(data.shape), dtype, PROV, handoff=handoff) as w:
        for start in range(0, 10, 4):
            w.write(data[start : start + 4])
    memory = handoff.take(path)
    with H5Artifact(path, PROV) as disk:
        _same_reads(memory, disk, "hidden")
    got = torch.cat(list(memory.iter_tensors("hidden", 4)))
    assert got.dtype == torch_dtype and torch.equal(got, data)


def test_hessian_writer_hands_over_datasets_and_their_attributes(tmp_path):
    handoff = Handoff(1 << 30)
    path = tmp_path / "hessians.h5"
    h = {"q_proj": torch.rand(6, 6), "down_proj": torch.rand(9, 9)}
    with HessianWriter(path, PROV, 4 * (36 + 81), handoff=handoff) as writer:
        writer.write("q_proj", h["q_proj"], {"linears": "q_proj,k_proj,v_proj", "sequences": 6})
        writer.write("down_proj", h["down_proj"], {"expert": 2, "calibrate_all_experts": True})
    memory = handoff.take(path)
    with H5Artifact(path, PROV) as disk:
        for name in h:
            _same_reads(memory, disk, name)


def test_pruned_tensors_come_back_as_written_and_provenance_is_still_checked(tmp_path):
    handoff = Handoff(1 << 30)
    path = tmp_path / "pruned.safetensors"
    tensors = {"a.weight": torch.randn(4, 3).to(torch.bfloat16), "b.weight": torch.randn(2, 5)}
    write_pruned(path, tensors, PROV, handoff)
    kept = read_pruned(path, PROV, handoff)
    disk = read_pruned(path, PROV)
    assert kept.keys() == disk.keys()
    for name in disk:
        assert kept[name].dtype == disk[name].dtype and torch.equal(kept[name], disk[name])
    kept["a.weight"].zero_()  # a reader working in place does not change the next one's copy
    assert torch.equal(read_pruned(path, PROV, handoff)["a.weight"], disk["a.weight"])
    with pytest.raises(ArtifactError, match="provenance 'layer'"):
        read_pruned(path, {**PROV, "layer": 4}, handoff)
    write_h5(tmp_path / "x.h5", {"d": torch.ones(3)}, PROV, handoff=handoff)
    with pytest.raises(ArtifactError, match="provenance 'layer'"):
        open_h5(tmp_path / "x.h5", {**PROV, "layer": 4}, handoff)


def test_a_replaced_or_removed_file_is_never_served_from_memory(tmp_path):
    handoff = Handoff(1 << 30)
    path = tmp_path / "x.h5"
    write_h5(path, {"d": torch.ones(3)}, PROV, handoff=handoff)
    os.utime(path, ns=(1, 1))  # Snakemake touches the outputs it accepts: still the same file
    assert handoff.take(path) is not None
    replaced = tmp_path / "y.h5"
    write_h5(replaced, {"d": torch.zeros(3)}, PROV)
    os.replace(replaced, path)
    assert handoff.take(path) is None
    with open_h5(path, PROV, handoff) as art:  # falls back to the file: the new contents
        assert np.array_equal(art.read("d"), np.zeros(3, dtype=np.float32))
    write_h5(path, {"d": torch.ones(3)}, PROV, handoff=handoff)
    path.unlink()
    assert handoff.take(path) is None


def test_budget_is_respected_least_recently_used_first(tmp_path):
    nbytes = 4 * 1000
    handoff = Handoff(int(2.5 * nbytes))
    paths = [tmp_path / f"{i}.h5" for i in range(3)]
    write_h5(paths[0], {"d": torch.ones(1000)}, PROV, handoff=handoff)
    write_h5(paths[1], {"d": torch.ones(1000)}, PROV, handoff=handoff)
    assert handoff.take(paths[0]) is not None  # 0 is now the most recently used
    write_h5(paths[2], {"d": torch.ones(1000)}, PROV, handoff=handoff)
    assert handoff.used <= handoff.budget
    assert handoff.take(paths[1]) is None
    assert handoff.take(paths[0]) is not None and handoff.take(paths[2]) is not None
    small = Handoff(nbytes - 1)  # larger than the whole budget: not kept at all
    write_h5(paths[0], {"d": torch.ones(1000)}, PROV, handoff=small)
    assert small.take(paths[0]) is None and small.used == 0
    assert handoff.drain_served() == {paths[0], paths[2]}
    assert handoff.drain_served() == set()


def test_entries_of_removed_files_go_before_live_ones(tmp_path):
    """Snakemake removes consumed temp() files behind the handoff's back: their memory is
    released at the next keep, before any live entry is evicted."""
    nbytes = 4 * 1000
    handoff = Handoff(int(2.5 * nbytes))
    live, removed, new = (tmp_path / f"{n}.h5" for n in ("live", "removed", "new"))
    write_h5(live, {"d": torch.ones(1000)}, PROV, handoff=handoff)
    write_h5(removed, {"d": torch.ones(1000)}, PROV, handoff=handoff)
    removed.unlink()
    write_h5(new, {"d": torch.ones(1000)}, PROV, handoff=handoff)
    assert handoff.used == 2 * nbytes
    assert handoff.take(live) is not None and handoff.take(new) is not None


def test_handoff_budget_setting():
    assert handoff_budget("auto", 8 << 30) == 2 << 30
    assert handoff_budget(1.5, 8 << 30) == int(1.5 * 2**30)
    assert handoff_budget(0, 8 << 30) == 0
    assert make_handoff(0) is None
    assert make_handoff(0.5).budget == 2**29


def _digest(run_dir) -> dict[str, str]:
    """sha256 of every reassembled model file and per-layer pruned weights of the run."""
    out = {}
    for path in sorted(run_dir.glob("*/model/*.safetensors")) + sorted(
        run_dir.glob("*/layer_*/pruned.safetensors")
    ):
        out[str(path.relative_to(run_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def two_runs(request, tmp_path_factory, tiny_text_file):
    """The same config run with the handoff off and on (OWL included: the dense pass too)."""
    dtype = request.param
    tmp = tmp_path_factory.mktemp(f"handoff_{dtype}")
    model = make_tiny_model(tmp / "model", family="llama", dtype=getattr(torch, dtype))
    runs = {}
    for setting in (0, "auto"):
        cfg = rose_config.load(
            write_config(
                tmp / f"c{setting}.yaml",
                model,
                tiny_text_file,
                tmp / f"results_{setting}",
                model={"source": str(model), "dtype": dtype},
                methods=["rose", "sparsegpt", "wanda"],
                sparsities=[0.6],
                allocation=["uniform", "owl"],
                handoff_memory=setting,
            )
        )
        runs[setting] = (cfg.run_dir, runner.run(cfg, evaluate=False, report=False))
    return runs


@pytest.mark.e2e
def test_handoff_gives_the_same_bytes(two_runs):
    (off_dir, _), (on_dir, _) = two_runs[0], two_runs["auto"]
    off, on = _digest(off_dir), _digest(on_dir)
    assert off and len(off) == len(on)
    assert off == on


@pytest.mark.e2e
def test_handoff_reads_back_nothing_the_layer_chain_just_wrote(two_runs):
    (_, off), (_, on) = two_runs[0], two_runs["auto"]
    assert off.handoff_budget == 0 and on.handoff_budget > 0
    assert all(t.bytes_from_memory == 0 for t in off.timings)
    chain = {"hessians", "order", "prune", "forward", "outliers"}
    by_step = {(t.stage, t.variant, t.layer): t for t in off.timings}
    checked = 0
    for t in on.timings:
        if t.stage not in chain:
            continue
        before = by_step[(t.stage, t.variant, t.layer)]
        # written unchanged (resume needs it; stats.json's timings may differ by a digit);
        # only small JSON files still come from disk
        assert abs(t.bytes_written - before.bytes_written) < 256
        assert t.bytes_read + t.bytes_from_memory == before.bytes_read
        assert t.bytes_read < 64 << 10, (t.stage, t.variant, t.layer, t.bytes_read)
        assert t.bytes_from_memory > 0
        checked += 1
    assert checked > 20
    total_off, total_on = off.io_totals(), on.io_totals()
    assert abs(total_on["bytes_written"] - total_off["bytes_written"]) < 64 << 10
    assert total_on["bytes_read"] < total_off["bytes_read"] / 2
