"""Artifact readers refuse what they cannot vouch for: no checksum, a wrong one, another run's file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from rose.artifacts import (
    ArtifactError,
    H5Artifact,
    H5StreamWriter,
    read_pruned,
    write_h5,
    write_pruned,
)

PROVENANCE = {"kind": "layer-inputs", "model_fingerprint": "abc", "layer": 1}
HIDDEN = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4)


def _write(path, writer: str) -> None:
    if writer == "write_h5":
        write_h5(path, {"hidden": HIDDEN}, PROVENANCE)
        return
    with H5StreamWriter(path, "hidden", HIDDEN.shape, np.float32, PROVENANCE) as stream:
        for start in range(0, len(HIDDEN), 2):
            stream.write(HIDDEN[start : start + 2])


def _read_whole(path) -> np.ndarray:
    with H5Artifact(path, PROVENANCE) as art:
        return art.read("hidden")


def _read_batches(path) -> np.ndarray:
    with H5Artifact(path, PROVENANCE) as art:
        return np.concatenate(list(art.iter_batches("hidden", 2)))


WRITERS = ["write_h5", "H5StreamWriter"]
READERS = [_read_whole, _read_batches]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("writer", WRITERS)
def test_an_intact_file_reads_back_equal(tmp_path, writer, reader):
    path = tmp_path / "inputs.h5"
    _write(path, writer)
    np.testing.assert_array_equal(reader(path), HIDDEN)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("writer", WRITERS)
def test_a_missing_checksum_is_refused(tmp_path, writer, reader):
    path = tmp_path / "inputs.h5"
    _write(path, writer)
    with h5py.File(path, "a") as fh:
        del fh["hidden"].attrs["sha256"]
    with pytest.raises(ArtifactError) as error:
        reader(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "'hidden' has no checksum" in message


def test_a_missing_checksum_is_refused_before_the_first_batch(tmp_path):
    path = tmp_path / "inputs.h5"
    _write(path, "H5StreamWriter")
    with h5py.File(path, "a") as fh:
        del fh["hidden"].attrs["sha256"]
    with H5Artifact(path, PROVENANCE) as art, pytest.raises(ArtifactError, match="no checksum"):
        next(art.iter_batches("hidden", 2))


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("writer", WRITERS)
def test_a_wrong_checksum_is_refused(tmp_path, writer, reader):
    path = tmp_path / "inputs.h5"
    _write(path, writer)
    with h5py.File(path, "a") as fh:
        fh["hidden"][0, 0, 0] = -1.0  # the data changed, the recorded checksum did not
    with pytest.raises(ArtifactError, match="checksum mismatch in 'hidden'"):
        reader(path)


def test_another_runs_file_is_refused(tmp_path):
    path = tmp_path / "inputs.h5"
    _write(path, "write_h5")
    with pytest.raises(ArtifactError, match="provenance 'layer' is 1"):
        H5Artifact(path, {**PROVENANCE, "layer": 2})


# ---------------------------------------------------------------- pruned layers


def _pruned() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "self_attn.q_proj.weight": torch.randn(8, 8, generator=generator),
        "mlp.down_proj.weight": torch.randn(8, 16, generator=generator),
        "mlp.up_proj.weight": torch.randn(16, 8, generator=generator).to(torch.bfloat16),
    }


PRUNED = {
    "kind": "pruned",
    "model_fingerprint": "abc",
    "variant": "rose-0.5",
    "layer": 1,
    "config_hash": "0123",
}


def test_pruned_layer_round_trip_with_deterministic_bytes(tmp_path):
    tensors = _pruned()
    write_pruned(tmp_path / "a.safetensors", tensors, PRUNED)
    write_pruned(tmp_path / "b.safetensors", dict(reversed(tensors.items())), PRUNED)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    back = read_pruned(tmp_path / "a.safetensors", PRUNED)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_pruned_layer_with_a_flipped_data_byte_is_refused(tmp_path):
    path = tmp_path / "pruned.safetensors"
    write_pruned(path, _pruned(), PRUNED)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01  # the last byte is tensor data, not the header
    path.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        read_pruned(path, PRUNED)


def test_pruned_layer_of_another_layer_is_refused(tmp_path):
    path = tmp_path / "pruned.safetensors"
    write_pruned(path, _pruned(), PRUNED)
    with pytest.raises(ArtifactError, match="provenance 'layer' is 1"):
        read_pruned(path, {**PRUNED, "layer": 2})


def test_pruned_layer_without_provenance_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "pruned.safetensors"
    save_file(_pruned(), str(path))
    with pytest.raises(ArtifactError, match="no provenance key"):
        read_pruned(path, PRUNED)


def test_bfloat16_layer_inputs_are_stored_as_raw_words_and_read_back_bit_for_bit(tmp_path):
    """HDF5 has no bfloat16: its words are stored (half of float32), tagged, and decoded on read."""
    import torch

    torch.manual_seed(0)
    hidden = (torch.randn(5, 3, 64) * 100).to(torch.bfloat16)
    hidden[0, 0, :4] = torch.tensor([float("inf"), -0.0, 1e-40, -3.0e38])  # odd values survive too
    paths = {}
    for dtype, block in (("bfloat16", hidden), (np.float32, hidden.float())):
        paths[str(dtype)] = path = tmp_path / f"{dtype}.h5"
        with H5StreamWriter(path, "hidden", tuple(hidden.shape), dtype, PROVENANCE) as stream:
            for start in range(0, 5, 2):
                stream.write(block[start : start + 2])
    with H5Artifact(paths["bfloat16"], PROVENANCE) as art:
        back = torch.cat(list(art.iter_tensors("hidden", 2)))
        assert art.dataset_attrs("hidden")["torch_dtype"] == "bfloat16"
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.view(torch.int16), hidden.view(torch.int16))
    with H5Artifact(paths["<class 'numpy.float32'>"], PROVENANCE) as art:
        assert torch.cat(list(art.iter_tensors("hidden", 2))).dtype == torch.float32
    with (
        h5py.File(paths["bfloat16"], "r") as words,
        h5py.File(paths["<class 'numpy.float32'>"], "r") as floats,
    ):
        assert words["hidden"].dtype == np.uint16
        assert words["hidden"].id.get_storage_size() * 2 == floats["hidden"].id.get_storage_size()
    # words without their tag would be read as numbers: refused instead
    with h5py.File(paths["bfloat16"], "a") as fh:
        del fh["hidden"].attrs["torch_dtype"]
    with (
        H5Artifact(paths["bfloat16"], PROVENANCE) as art,
        pytest.raises(ArtifactError, match="16-bit words without their dtype"),
    ):
        next(art.iter_tensors("hidden", 2))
    with (
        pytest.raises(TypeError, match="takes bfloat16 tensors"),
        H5StreamWriter(tmp_path / "x.h5", "hidden", (1, 2), "bfloat16", PROVENANCE) as stream,
    ):
        stream.write(np.zeros((1, 2), dtype=np.float32))
    assert not (tmp_path / "x.h5").exists()
