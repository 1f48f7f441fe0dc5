"""Fault injection: try to break every guarantee of the pipeline, one table row per fault.

Every case states its expected outcome, and the test asserts that this outcome,
and no other, happened:

  error      - exit 1 with one `rose: error:` line (or a failed Snakemake job whose output
               has that line) that names the file, config key, layer or directory concerned
               (`FaultCase.names`); nothing was made from the damaged input and no temporary
               is left; after doing what the line says (delete the file), the rerun is
               bit-identical to a clean run;
  identical  - rerunning the same command resumes and gives pruned layers and reassembled
               models bit-identical to a clean run, with no temporary left;
  recovers   - the run finishes by itself and records what it did (damping retries).

Damage is placed at known bytes (tests/faults_utils.py): inside a dataset's stored data
(the middle chunk, at the offset h5py reports), in a dataset's object header, in an
attribute's value, in a tensor's data or in the safetensors JSON header, and each damage
function checks that it hit exactly that region. Every kill asserts that it landed
mid-run: the hook that killed the process says where it was, and at that moment not
every model existed and either some but not all layers were done or a temporary existed.

Rows with `bug` set expose a defect in rose/ or workflow/ and are xfail(strict=True,
raises=...): they must fail, and only in the way the bug describes. The session ends
with `fault injection: N cases: A refused with a clear error, B resumed bit-identical,
...` in the terminal summary (tests/conftest.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from faults_utils import (
    Hook,
    RunState,
    error_lines,
    h5_attr,
    h5_data,
    h5_object_header,
    is_descendant,
    json_garble,
    kill_tree,
    patch_everywhere,
    popen,
    remove,
    rose_cli,
    rose_cmd,
    run,
    small_tmpfs,
    st_data,
    st_header,
    st_metadata_value,
    temporaries,
    truncate,
)
from pipeline_utils import snakemake_cmd, weights_digest, write_config
from tiny import make_tiny_model

ROSE = "rose-0.5"
MAGNITUDE = "magnitude-0.5"
VARIANTS = (ROSE, MAGNITUDE)
DEPTH = 3  # layers of the tiny model
EXPECTED = {
    "error": "refused: one error line naming {names}; rerun after deleting it is bit-identical",
    "identical": "rerun resumes bit-identical",
    "recovers": "finishes by itself and records what it did (damping raised; another thread count)",
}

# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class FaultCase:
    name: str
    kind: str  # damage | config | model | numeric | disk | lock | threads | kill-runner | kill-snakemake | snakemake-damage
    expect: str  # error | identical | recovers
    params: dict[str, Any] = field(default_factory=dict)
    names: str | None = (
        None  # error: what the error line must name (a run-relative path, a key, words)
    )
    bug: str | None = None  # a defect this case exposes: xfail(strict=True)
    raises: type[BaseException] | tuple[type[BaseException], ...] = (
        AssertionError  # how the bug shows
    )

    @property
    def outcome(self) -> str:
        return EXPECTED[self.expect].format(names=self.names)


L1 = f"{ROSE}/layer_1"
# what to delete so that the next run reads the artifact again (its consumers' outputs)
CONSUMERS = {
    "calib/tokens.h5": ("calib/inputs.h5", ROSE),
    f"{L1}/inputs.h5": (
        f"{L1}/hessians.h5",
        f"{L1}/order.h5",
        f"{L1}/pruned.safetensors",
        f"{L1}/stats.json",
        f"{ROSE}/model",
    ),
    f"{L1}/hessians.h5": (f"{L1}/pruned.safetensors", f"{L1}/stats.json", f"{ROSE}/model"),
    f"{L1}/order.h5": (f"{L1}/pruned.safetensors", f"{L1}/stats.json", f"{ROSE}/model"),
    f"{L1}/pruned.safetensors": (f"{ROSE}/model",),
    f"{L1}/stats.json": (f"{ROSE}/model",),
    "model.json": (f"{ROSE}/model",),
    "run.json": (f"{ROSE}/model",),
}
H5 = ("truncate", "data", "header", "attr", "swap-layer", "swap-run")
DAMAGE = {
    "calib/tokens.h5": (
        "truncate",
        "data",
        "header",
        "attr",
        "swap-run",
    ),  # one per run: no other layer
    f"{L1}/inputs.h5": H5,
    f"{L1}/hessians.h5": H5,
    f"{L1}/order.h5": (*H5, "ordering-attr"),
    f"{L1}/pruned.safetensors": (
        "truncate",
        "data",
        "header",
        "metadata",
        "swap-layer",
        "swap-run",
    ),
    f"{L1}/stats.json": ("truncate", "garble", "swap-layer", "swap-run"),
    "model.json": ("truncate", "garble"),
    "run.json": ("truncate",),
}
WHERE = {
    "truncate": "truncated",
    "data": "bytes inside dataset data in",
    "header": "dataset object header in",
    "attr": "provenance attribute in",
    "ordering-attr": "relative_range attribute in",
    "metadata": "checksum in the metadata of",
    "garble": "garbled",
    "swap-layer": "another layer's",
    "swap-run": "another calibration seed's",
}
BUGS: dict[
    tuple[str, str], tuple[str, type]
] = {}  # (artifact, damage) -> (a known defect, how it shows)


def _damage_cases() -> list[FaultCase]:
    cases = []
    for path, hows in DAMAGE.items():
        for how in hows:
            name = f"{WHERE[how]} {Path(path).name}"
            if how == "data" and path.endswith(".safetensors"):
                name = f"bytes inside tensor data in {Path(path).name}"
            if how == "header" and path.endswith(".safetensors"):
                name = f"JSON header of {Path(path).name}"
            bug, raises = BUGS.get((path, how), (None, AssertionError))
            cases.append(
                FaultCase(
                    name,
                    "damage",
                    "error",
                    {"path": path, "how": how},
                    names=path,
                    bug=bug,
                    raises=raises,
                )
            )
    return cases


def _kill_cases() -> list[FaultCase]:
    """Kill points named by what they interrupt, not by a count, so they stay mid-run."""
    return [
        FaultCase(
            "SIGKILL rose run right after layer 1's stats.json",
            "kill-runner",
            "identical",
            {
                "at": "rename",
                "match": f"{L1}/stats.json",
                "mid": {
                    "exists": [f"{L1}/stats.json"],
                    "missing": [f"{ROSE}/layer_2/pruned.safetensors"],
                },
            },
        ),
        FaultCase(
            "SIGKILL rose run before layer 2's pruned.safetensors is renamed",
            "kill-runner",
            "identical",
            {
                "at": "rename",
                "match": f"{ROSE}/layer_2/pruned.safetensors",
                "before": True,
                "mid": {"temporary": f"{ROSE}/layer_2/pruned.safetensors"},
            },
        ),
        FaultCase(
            "SIGKILL rose run inside the HDF5 write of layer 2's inputs",
            "kill-runner",
            "identical",
            {
                "at": "h5-write",
                "match": f"{ROSE}/layer_2/inputs.h5",
                "n": 2,
                "mid": {"temporary": f"{ROSE}/layer_2/inputs.h5"},
            },
        ),
        FaultCase(
            "external SIGKILL of rose run in layer 1's sweep",
            "kill-runner",
            "identical",
            {
                "at": "call",
                "module": "rose.methods",
                "func": "prune_weight",
                "contains": "layer 1 ",
                "external": True,
                "mid": {
                    "exists": [f"{L1}/hessians.h5", f"{L1}/order.h5"],
                    "missing": [f"{L1}/pruned.safetensors"],
                },
            },
        ),
        FaultCase(
            "SIGKILL rose run before the reassembled magnitude model is renamed",
            "kill-runner",
            "identical",
            {
                "at": "rename",
                "match": f"{MAGNITUDE}/model",
                "before": True,
                "mid": {"temporary": f"{MAGNITUDE}/model"},
            },
        ),
        FaultCase(
            "SIGKILL snakemake (jobs as threads) before layer 2's hessians.h5 is renamed",
            "kill-snakemake",
            "identical",
            {
                "at": "rename",
                "match": f"{ROSE}/layer_2/hessians.h5",
                "before": True,
                "mid": {"temporary": f"{ROSE}/layer_2/hessians.h5"},
            },
        ),
        FaultCase(
            "SIGKILL a snakemake job process inside its HDF5 write",
            "kill-snakemake",
            "identical",
            {
                "at": "h5-write",
                "match": "calib/inputs.h5",
                "n": 2,
                "job": True,
                "mid": {"temporary": "calib/inputs.h5"},
            },
        ),
    ]


CASES: list[FaultCase] = [
    *_damage_cases(),
    FaultCase(
        "model.json of another model",
        "damage",
        "error",
        {"path": "model.json", "how": "swap-model"},
        names="model.json",
    ),
    FaultCase(
        "model weights replaced in place after model.json",
        "model",
        "error",
        {},
        names="model.json",
    ),
    FaultCase(
        "bytes inside tensor data of pruned.safetensors under snakemake",
        "snakemake-damage",
        "error",
        {"path": f"{L1}/pruned.safetensors", "how": "data"},
        names=f"{L1}/pruned.safetensors",
    ),
    FaultCase(
        "changed calibration.seed",
        "config",
        "error",
        {"key": "calibration.seed", "value": "3"},
        names="calibration.seed",
    ),
    FaultCase(
        "changed prune.percdamp",
        "config",
        "error",
        {"key": "prune.percdamp", "value": "0.05"},
        names="prune.percdamp",
    ),
    FaultCase(
        "changed model.source",
        "config",
        "error",
        {"key": "model.source", "value": "<other model>"},
        names="model.source",
    ),
    FaultCase(
        "changed calibration.seed under snakemake",
        "config",
        "error",
        {"key": "calibration.seed", "value": "3", "snakemake": True},
        names="calibration.seed",
    ),
    FaultCase(
        "NaN in layer 1 mlp.up_proj",
        "numeric",
        "error",
        {
            "tensor": "model.layers.1.mlp.up_proj.weight",
            "value": float("nan"),
            "words": ("layer 1", "mlp.up_proj"),
        },
        names="layer 1 mlp.up_proj",
    ),
    FaultCase(
        "Inf Hessian from diverging activations",
        "numeric",
        "error",
        {
            "tensor": "model.layers.1.post_attention_layernorm.weight",
            "value": 1e25,
            "words": ("layer 1", "mlp.gate_proj", "Hessian"),
        },
        names="layer 1 mlp.gate_proj Hessian",
    ),
    FaultCase(
        "singular Hessians with percdamp 0", "numeric", "recovers", {"set": "prune.percdamp=0"}
    ),
    FaultCase(
        "full disk writing pruned.safetensors (OSError 28 without a file name, as a file write raises it)",
        "disk",
        "error",
        {"at": "safetensors-stream"},
        names=f"{L1}/pruned.safetensors",
    ),
    FaultCase(
        "full disk in a streamed inputs.h5 (OSError 28 without a file name, as h5py raises it)",
        "disk",
        "error",
        {"at": "h5-stream"},
        names=f"{ROSE}/layer_2/inputs.h5",
    ),
    FaultCase(
        "full disk writing stats.json (OSError 28 without a file name, as Python raises it)",
        "disk",
        "error",
        {"at": "json"},
        names=f"{L1}/stats.json",
    ),
    FaultCase(
        "a real full tmpfs under the run directory",
        "disk",
        "error",
        {"at": "tmpfs"},
        names="the artifact being written",
    ),
    FaultCase(
        "two rose runs on one run directory",
        "lock",
        "error",
        {"tool": "rose"},
        names="the run directory",
    ),
    FaultCase(
        "two snakemake controllers on one workdir",
        "lock",
        "error",
        {"tool": "snakemake"},
        names="the locked directory",
    ),
    FaultCase(
        "rose run while snakemake runs on the same run directory",
        "lock",
        "error",
        {"tool": "mixed"},
        names="the run directory",
    ),
    FaultCase(
        "resume with another torch thread count",
        "threads",
        "recovers",
        {},
    ),
    *_kill_cases(),
]


def _params() -> list:
    out = []
    for case in CASES:
        marks = [pytest.mark.fault(expect=case.expect)]
        if case.bug:
            marks.append(pytest.mark.xfail(strict=True, raises=case.raises, reason=case.bug))
        out.append(pytest.param(case, id=case.name, marks=marks))
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread here and in every child: the bytes depend on the thread count (see the
    'another thread count' case), and idle OpenMP threads spin against the children for CPU."""
    import torch

    before = torch.get_num_threads()
    patch = pytest.MonkeyPatch()
    patch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    patch.undo()


def _no_report(monkeypatch) -> None:
    """In-process runs skip the report (plots cost more than the tiny run; no guarantee is about it)."""
    patch_everywhere(
        monkeypatch, "rose.stages.evaluation", "build_report", lambda *args, **kwargs: {}
    )


# ---------------------------------------------------------------- clean references


@dataclass(frozen=True)
class World:
    tmp: Path
    model: Path
    other_model: Path
    text: Path
    clean: Path  # run dir of the clean run (intermediates kept)
    other_seed: Path  # same, calibration.seed 1
    other_model_run: Path  # same, another model
    digests: dict[str, dict[str, str]]


def _config(path: Path, model: Path, text: Path, results: Path, seed: int = 0, **extra) -> Path:
    calibration = {
        "source": {"kind": "file", "path": str(text), "split": "head"},
        "nsamples": 6,
        "seqlen": 32,
        "batch_size": 4,
        "seed": seed,
    }
    return write_config(
        path,
        model,
        text,
        results,
        methods=["rose", "magnitude"],
        sparsities=[0.5],
        calibration=calibration,
        **extra,
    )


def _args(cfg: Path, *sets: str) -> list[str]:
    args = ["run", "--config", str(cfg), "--no-eval", "-q"]
    for item in sets:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama_dir, tiny_text_file) -> World:
    tmp = tmp_path_factory.mktemp("faults")
    patch = pytest.MonkeyPatch()
    _no_report(patch)
    other_model = make_tiny_model(tmp / "other_model", seed=1)
    runs = {}
    for name, model, seed in (
        ("clean", tiny_llama_dir, 0),
        ("seed1", tiny_llama_dir, 1),
        ("model1", other_model, 0),
    ):
        cfg = _config(
            tmp / f"{name}.yaml",
            model,
            tiny_text_file,
            tmp / name,
            seed=seed,
            keep_intermediates=True,
        )
        code, errors = rose_cli(_args(cfg))
        assert code == 0, errors
        runs[name] = tmp / name / "tiny"
    patch.undo()
    digests = {v: weights_digest(runs["clean"], v) for v in VARIANTS}
    # the pruned layers, and the reassembled model's shards: those layers (linked) and the rest
    assert all(len(d) == 2 * DEPTH + 1 for d in digests.values())
    assert digests != {v: weights_digest(runs["seed1"], v) for v in VARIANTS}
    return World(
        tmp,
        tiny_llama_dir,
        other_model,
        tiny_text_file,
        runs["clean"],
        runs["seed1"],
        runs["model1"],
        digests,
    )


def _identical(world: World, run_dir: Path, variants: tuple[str, ...] = VARIANTS) -> None:
    for variant in variants:
        assert weights_digest(run_dir, variant) == world.digests[variant], (
            f"{variant}: weights differ from a clean run"
        )
    assert not temporaries(run_dir), f"temporaries left: {temporaries(run_dir)}"


def _one_named_error(code: int, errors: list[str], *words: str) -> str:
    assert code == 1 and len(errors) == 1, (
        f"expected exit 1 and one error line, got {code} and {errors}"
    )
    for word in words:
        assert word in errors[0], f"the error does not name {word!r}: {errors[0]}"
    return errors[0]


# ---------------------------------------------------------------- handlers, one per kind


def _damage(case: FaultCase, world: World, tmp: Path) -> None:
    p = case.params
    results = tmp / "results"
    run_dir = results / "tiny"
    shutil.copytree(world.clean, run_dir)
    needs = CONSUMERS[p["path"]]
    for item in needs:
        remove(run_dir / item)
    target = run_dir / p["path"]
    how = p["how"]
    if how == "truncate":
        truncate(target)
    elif how == "data":
        (st_data if target.suffix == ".safetensors" else h5_data)(target)
    elif how == "header":
        (st_header if target.suffix == ".safetensors" else h5_object_header)(target)
    elif how == "attr":
        h5_attr(target, "/", "model_fingerprint")
    elif how == "ordering-attr":
        h5_attr(target, "self_attn.q_proj", "relative_range")
    elif how == "metadata":
        st_metadata_value(target, "rose_provenance", "sha256")
    elif how == "garble":
        json_garble(target)
    elif how == "swap-layer":  # layer 0's inputs and Hessians are shared (calib/): take layer 2's
        other = "layer_2" if target.name in ("inputs.h5", "hessians.h5") else "layer_0"
        shutil.copyfile(run_dir / p["path"].replace("layer_1", other), target)
    elif how == "swap-run":
        shutil.copyfile(world.other_seed / p["path"], target)
    elif how == "swap-model":
        shutil.copyfile(world.other_model_run / p["path"], target)
    else:
        raise AssertionError(how)
    damaged = target.read_bytes()
    assert damaged != (world.clean / p["path"]).read_bytes(), "the damage changed nothing"
    cfg = _config(tmp / "c.yaml", world.model, world.text, results, keep_intermediates=True)
    code, errors = rose_cli(_args(cfg))
    if code == 0 and how == "ordering-attr":
        stats = json.loads((run_dir / L1 / "stats.json").read_text())["linears"]["self_attn.q_proj"]
        clean = json.loads((world.clean / L1 / "stats.json").read_text())["linears"][
            "self_attn.q_proj"
        ]
        raise AssertionError(
            f"damaged order.h5 accepted: stats.json relative_range {stats['relative_range']!r}, clean {clean['relative_range']!r}"
        )
    line = _one_named_error(code, errors, str(target))
    assert "delete" in line, line
    if how == "data":  # the file parses and only the values changed: only a checksum can see it
        assert "checksum" in line, line
    assert not temporaries(run_dir), temporaries(run_dir)
    consumer = run_dir / needs[0]
    assert not consumer.exists(), f"{consumer} was made from the damaged {target.name}"
    assert target.read_bytes() == damaged, "the damaged file was changed instead of refused"
    target.unlink()  # what the message says to do
    code, errors = rose_cli(_args(cfg))
    assert code == 0, errors
    _identical(world, run_dir)


def _model_changed(case: FaultCase, world: World, tmp: Path) -> None:
    """The model directory's weights are replaced after model.json was written (layers 0-1 done)."""
    model = tmp / "model"
    shutil.copytree(world.model, model)
    results = tmp / "results"
    cfg = _config(tmp / "c.yaml", model, world.text, results)
    assert rose_cli(_args(cfg))[0] == 0
    shutil.copyfile(world.other_model / "model.safetensors", model / "model.safetensors")
    for item in (
        f"{ROSE}/layer_2/pruned.safetensors",
        f"{ROSE}/layer_2/stats.json",
        f"{ROSE}/model",
    ):
        remove(results / "tiny" / item)
    code, errors = rose_cli(_args(cfg))
    _one_named_error(code, errors, str(results / "tiny" / "model.json"))


def _thread_count(case: FaultCase, world: World, tmp: Path) -> None:
    """Layers 0-1 made with one torch thread (the clean run), layer 2 resumed with two: the run
    finishes, layers 0-1 keep their bytes, layer 2 has the same masks and weights within float32
    rounding, and both thread counts are recorded (the documented reproducibility contract)."""
    import torch
    from safetensors.torch import load_file

    results = tmp / "results"
    run_dir = results / "tiny"
    shutil.copytree(world.clean, run_dir)
    for item in (f"{ROSE}/layer_2", f"{ROSE}/model"):
        remove(run_dir / item)
    cfg = _config(tmp / "c.yaml", world.model, world.text, results, keep_intermediates=True)
    torch.set_num_threads(2)
    try:
        code, errors = rose_cli(_args(cfg))
    finally:
        torch.set_num_threads(1)
    assert code == 0, errors
    for layer in (0, 1):
        name = f"{ROSE}/layer_{layer}/pruned.safetensors"
        assert weights_digest(run_dir, ROSE)[name] == world.digests[ROSE][name]
    resumed = load_file(run_dir / ROSE / "layer_2" / "pruned.safetensors")
    clean = load_file(world.clean / ROSE / "layer_2" / "pruned.safetensors")
    for name, weight in resumed.items():
        assert torch.equal(weight == 0, clean[name] == 0), f"{name}: masks differ"
        scale = float(clean[name].abs().max())
        assert float((weight - clean[name]).abs().max()) <= 1e-4 * scale, name
    stats = json.loads((run_dir / ROSE / "layer_2" / "stats.json").read_text())
    assert stats["numerics"] == {"device": "cpu", "torch_threads": 2}
    manifest = json.loads((run_dir / ROSE / "model" / "pruning.json").read_text())
    assert {n["torch_threads"] for n in manifest["numerics"]} == {1, 2}


def _stopped_after_tokens(world: World, run_dir: Path) -> None:
    """A run directory as left by a run that stopped right after capturing the tokens."""
    for item in ("run.json", "model.json", "calib/tokens.h5"):
        (run_dir / item).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(world.clean / item, run_dir / item)


def _snakemake_damage(case: FaultCase, world: World, tmp: Path) -> None:
    p = case.params
    results = tmp / "results"
    run_dir = results / "tiny"
    shutil.copytree(world.clean, run_dir)
    remove(run_dir / ROSE / "model")
    target = run_dir / p["path"]
    assert p["how"] == "data" and target.suffix == ".safetensors"
    st_data(target)
    cfg = _config(tmp / "c.yaml", world.model, world.text, results, keep_intermediates=True)
    targets = [str(run_dir / v / "model") for v in VARIANTS]
    failed = run(snakemake_cmd(cfg, tmp, *targets))
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0, output[-3000:]
    named = [line for line in output.splitlines() if f"{target}: " in line and "delete" in line]
    assert named, f"no line names {target}:\n{output[-3000:]}"
    assert not (run_dir / ROSE / "model").exists()
    assert not temporaries(run_dir), temporaries(run_dir)
    target.unlink()
    done = run(snakemake_cmd(cfg, tmp, *targets))
    assert done.returncode == 0, done.stderr[-3000:]
    _identical(world, run_dir)


def _config_change(case: FaultCase, world: World, tmp: Path) -> None:
    results = tmp / "results"
    run_dir = results / "tiny"
    shutil.copytree(world.clean, run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name != ".rose.lock"}
    key, value = case.params["key"], case.params["value"]
    value = str(world.other_model) if value == "<other model>" else value
    if case.params.get("snakemake"):  # refused while Snakemake parses the workflow
        assert key == "calibration.seed"
        cfg = _config(tmp / "c.yaml", world.model, world.text, results, seed=int(value))
        done = run(snakemake_cmd(cfg, tmp, "-n"))
        errors = [
            line for line in (done.stdout + done.stderr).splitlines() if "new run name" in line
        ]
        assert done.returncode != 0 and len(errors) == 1, (done.stdout + done.stderr)[-2000:]
        line = errors[0]
    else:
        cfg = _config(tmp / "c.yaml", world.model, world.text, results, keep_intermediates=True)
        code, errors = rose_cli(_args(cfg, f"{key}={value}"))
        line = _one_named_error(code, errors)
    assert f" {key} = " in line and "new run name" in line, line
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name != ".rose.lock"}
    assert after == before, "the refused run changed the run directory"


def _numeric(case: FaultCase, world: World, tmp: Path) -> None:
    p = case.params
    results = tmp / "results"
    if "tensor" in p:
        from safetensors.torch import load_file, save_file

        model = make_tiny_model(tmp / "model")
        tensors = load_file(model / "model.safetensors")
        if p["tensor"].endswith("layernorm.weight"):
            tensors[p["tensor"]][:] = p["value"]
        else:
            tensors[p["tensor"]][3, 5] = p["value"]
        save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
        code, errors = rose_cli(_args(_config(tmp / "c.yaml", model, world.text, results)))
        _one_named_error(code, errors, *p["words"])
        layer = results / "tiny" / ROSE / "layer_1"
        assert not (layer / "pruned.safetensors").exists() and not (layer / "hessians.h5").exists()
        assert (results / "tiny" / ROSE / "layer_0" / "pruned.safetensors").exists(), (
            "layer 0 was not kept"
        )
        assert not temporaries(results)
        return
    cfg = _config(tmp / "c.yaml", world.model, world.text, results)
    code, errors = rose_cli(_args(cfg, p["set"]))
    assert code == 0, errors
    for layer in range(DEPTH):
        stats = json.loads((results / "tiny" / ROSE / f"layer_{layer}" / "stats.json").read_text())[
            "linears"
        ]
        for name, entry in stats.items():
            # 6 x 32 = 192 tokens < 200 input columns: H is singular, percdamp 0 cannot factor it
            assert entry["damping"] > 0 and entry["damping_retries"] >= 1, (layer, name, entry)
    manifest = json.loads((results / "tiny" / ROSE / "model" / "pruning.json").read_text())
    assert all(e["damping_retries"] >= 1 for e in manifest["linears"].values())


def _disk(case: FaultCase, world: World, tmp: Path) -> None:
    """A full disk while one artifact is written, raised the way the writing library raises it."""
    at = case.params["at"]
    if at == "tmpfs":
        return _real_full_disk(case, world, tmp)
    import pathlib

    import h5py

    run_dir = tmp / "results" / "tiny"
    final = run_dir / case.names
    fired = []
    monkeypatch = pytest.MonkeyPatch()  # undone before the rerun, unlike the test's own
    if at == "safetensors-stream":
        from rose.artifacts import SafetensorsWriter

        real_write = SafetensorsWriter.write

        def write(self, name, tensor):
            if str(self.path).startswith(f"{final}.tmp-") and self.actual:
                fired.append(str(self.path))  # the second tensor: the first is in the file
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(self, name, tensor)

        monkeypatch.setattr(SafetensorsWriter, "write", write)
    elif at == "h5-stream":
        real_setitem = h5py.Dataset.__setitem__
        slices = []

        def setitem(self, key, value):
            if self.file.filename.startswith(f"{final}.tmp-"):
                slices.append(key)
                if len(slices) == 2:  # the second slice: the first is already in the file
                    fired.append(self.file.filename)
                    raise OSError(
                        errno.ENOSPC,
                        "Can't synchronously write data (file write failed: errno = 28, "
                        "error message = 'No space left on device')",
                    )
            return real_setitem(self, key, value)

        monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
    else:
        real_write_text = pathlib.Path.write_text

        def write_text(self, data, *args, **kwargs):
            if str(self).startswith(f"{final}.tmp-"):
                fired.append(str(self))
                real_write_text(self, data[:10], *args, **kwargs)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write_text(self, data, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    cfg = _config(tmp / "c.yaml", world.model, world.text, tmp / "results")
    try:
        code, errors = rose_cli(_args(cfg))
    finally:
        monkeypatch.undo()
    assert fired, f"the full disk was never hit (no write of {final})"
    _one_named_error(code, errors, "no space left", str(final))
    assert not final.exists() and not temporaries(run_dir), temporaries(run_dir)
    assert rose_cli(_args(cfg))[0] == 0
    _identical(world, run_dir)


def _real_full_disk(case: FaultCase, world: World, tmp: Path) -> None:
    """The results directory on a 1 MiB tmpfs: the pre-flight refuses the run before any work,
    and forced past it, the first artifact that does not fit is one error naming it."""
    results = tmp / "results"
    cfg = _config(tmp / "c.yaml", world.model, world.text, results)
    with small_tmpfs(results, "1m") as resize:
        refused = run(rose_cmd(_args(cfg)))
        _one_named_error(refused.returncode, error_lines(refused.stderr), "needs about", "free")
        assert not (results / "tiny" / "model.json").exists()
        full = run(rose_cmd(_args(cfg)), env={**os.environ, "ROSE_FORCE": "1"})
        errors = error_lines(full.stderr)
        leftovers = temporaries(results)
        resize("256m")
        code, again = rose_cli(_args(cfg))
        if code == 0:
            _identical(world, results / "tiny")
    assert full.returncode == 1, f"exit {full.returncode}:\n{full.stderr[-2000:]}"
    _one_named_error(full.returncode, errors, "no space left", f"{results / 'tiny'}/")
    assert not leftovers, leftovers
    assert code == 0, again


def _lock(case: FaultCase, world: World, tmp: Path) -> None:
    results = tmp / "results"
    run_dir = results / "tiny"
    cfg = _config(tmp / "c.yaml", world.model, world.text, results)
    hook = Hook(
        tmp / "hook", "pause", "rename", {"root": str(run_dir), "match": f"{L1}/hessians.h5"}
    )
    targets = [str(run_dir / v / "model") for v in VARIANTS]
    tool = case.params["tool"]
    first = popen(
        rose_cmd(_args(cfg)) if tool == "rose" else snakemake_cmd(cfg, tmp, *targets),
        env=hook.env(),
    )
    try:
        hook.wait_paused(first)
        if tool in ("rose", "mixed"):
            code, errors = rose_cli(_args(cfg))
            line = _one_named_error(code, errors, str(run_dir))
            assert "in use" in line, line
        else:
            second = run(snakemake_cmd(cfg, tmp, *targets))
            output = second.stdout + second.stderr
            assert second.returncode != 0 and "LockException" in output, output[-2000:]
            refusal = output[output.index("LockException") :]
            assert f"{tmp}\n" in refusal and "--unlock" in refusal, refusal  # names the directory
        hook.release()
        out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            kill_tree(first)
    assert first.returncode == 0, out[-2000:]
    _identical(world, run_dir)


def _assert_mid_run(
    case: FaultCase, hook: Hook, run_dir: Path, variants: tuple[str, ...]
) -> RunState:
    """The kill landed where the case says, and the work was unfinished at that moment."""
    fired = hook.fired()
    assert fired is not None, f"the process died, but not at the fault point {case.params}"
    state = RunState.of(run_dir, variants, DEPTH)
    total = len(variants) * DEPTH
    assert len(state.models) < len(variants), (
        f"the kill came after the run had finished: {state.describe()}"
    )
    assert 0 < len(state.layers_done) < total or state.temporaries, (
        f"the kill did not land mid-run ({fired['where']}): {state.describe()}"
    )
    mid = case.params["mid"]
    for rel in mid.get("exists", []):
        assert (run_dir / rel).exists(), f"{rel} missing at the kill: {state.describe()}"
    for rel in mid.get("missing", []):
        assert not (run_dir / rel).exists(), f"{rel} already made at the kill: {state.describe()}"
    if "temporary" in mid:
        rel = mid["temporary"]
        assert not (run_dir / rel).exists(), f"{rel} was complete at the kill"
        assert any(t.startswith(f"{rel}.tmp-") for t in state.temporaries), (
            f"no temporary of {rel} at the kill: {state.describe()}"
        )
    return state


def _kill_runner(case: FaultCase, world: World, tmp: Path) -> None:
    p = {k: v for k, v in case.params.items() if k not in ("mid", "external")}
    results = tmp / "results"
    run_dir = results / "tiny"
    cfg = _config(tmp / "c.yaml", world.model, world.text, results)
    external = case.params.get("external", False)
    hook = Hook(
        tmp / "hook", "pause" if external else "kill", p.pop("at"), {"root": str(run_dir), **p}
    )
    proc = popen(rose_cmd(_args(cfg)), env=hook.env())
    try:
        if external:
            hook.wait_paused(proc)
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}:\n{out[-2000:]}"
    _assert_mid_run(case, hook, run_dir, VARIANTS)
    code, errors = rose_cli(_args(cfg))
    assert code == 0, errors
    _identical(world, run_dir)


def _kill_snakemake(case: FaultCase, world: World, tmp: Path) -> None:
    p = {k: v for k, v in case.params.items() if k not in ("mid", "job")}
    results = tmp / "results"
    run_dir = results / "tiny"
    cfg = _config(tmp / "c.yaml", world.model, world.text, results)
    cmd = snakemake_cmd(cfg, tmp, *(str(run_dir / v / "model") for v in VARIANTS))
    if not case.params.get("job"):  # the controller, with its job threads, kills itself
        hook = Hook(tmp / "hook", "kill", p.pop("at"), {"root": str(run_dir), **p})
        proc = popen(cmd, env=hook.env())
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}:\n{out[-2000:]}"
        _assert_mid_run(case, hook, run_dir, VARIANTS)
        unlock = run(
            snakemake_cmd(cfg, tmp, "--unlock")
        )  # the controller died holding Snakemake's lock
        assert unlock.returncode == 0, unlock.stderr[-2000:]
    else:  # jobs as subprocesses: pause the embedding job in its HDF5 write and kill that job only
        _stopped_after_tokens(world, run_dir)
        hook = Hook(tmp / "hook", "pause", p.pop("at"), p)
        proc = popen([c for c in cmd if c != "--force-use-threads"], env=hook.env())
        try:
            job = hook.wait_paused(proc)
            assert job != proc.pid and is_descendant(job, proc.pid), (
                "the paused process is not a job of the controller"
            )
            _assert_mid_run(case, hook, run_dir, VARIANTS)
            os.kill(job, signal.SIGKILL)
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
        assert proc.returncode != 0 and "embed_calibration" in out, out[-2000:]
        assert not (run_dir / "calib" / "inputs.h5").exists()
    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    _identical(world, run_dir)


HANDLERS = {
    "damage": _damage,
    "model": _model_changed,
    "snakemake-damage": _snakemake_damage,
    "threads": _thread_count,
    "config": _config_change,
    "numeric": _numeric,
    "lock": _lock,
    "kill-runner": _kill_runner,
    "kill-snakemake": _kill_snakemake,
    "disk": _disk,
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", _params())
def test_fault(case: FaultCase, world: World, tmp_path: Path, monkeypatch) -> None:
    _no_report(monkeypatch)
    HANDLERS[case.kind](case, world, tmp_path)


def test_the_table_states_every_outcome() -> None:
    """Every case has one expected outcome; errors say what they name; the damage covers every
    artifact in its data, headers and attributes; every kill says where it must land."""
    names = [c.name for c in CASES]
    assert len(set(names)) == len(names)
    assert {c.kind for c in CASES} == set(HANDLERS)
    for case in CASES:
        assert case.expect in EXPECTED, case
        assert (case.names is not None) == (case.expect == "error"), case
        if case.kind.startswith("kill"):
            assert case.expect == "identical" and case.params["mid"], case
    for path in ("calib/tokens.h5", f"{L1}/inputs.h5", f"{L1}/hessians.h5", f"{L1}/order.h5"):
        assert {"truncate", "data", "header", "attr", "swap-run"} <= set(DAMAGE[path]), path
    assert {"truncate", "data", "header", "metadata", "swap-layer", "swap-run"} <= set(
        DAMAGE[f"{L1}/pruned.safetensors"]
    )
