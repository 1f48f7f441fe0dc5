from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tiny_model, tiny_text  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 3-layer random Llama (hidden 200, GQA 5/1 heads, tied embeddings)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), family="llama")


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(tiny_text())
    return path


TINY_METHODS = ["rose", "sparsegpt", "wanda", "magnitude"]
TINY_SPARSITIES = [0.5, "2:4"]
TINY_VARIANTS = [f"{m}-{s}" for m in TINY_METHODS for s in ("0.5", "2of4")]


@pytest.fixture(scope="session")
def tiny_workflow_run(tmp_path_factory, tiny_llama_dir, tiny_text_file) -> tuple[Path, Path]:
    """(run dir, config) of one Snakemake run (Python API) of every method at 50% and 2:4 on
    the tiny Llama, intermediates removed: read, never changed, by tests/test_pipeline.py, and
    the clean reference of tests/test_drivers.py's killed runs (a variant's bytes do not depend
    on the other variants of its run)."""
    from pipeline_utils import run_snakemake_api, write_config

    tmp = tmp_path_factory.mktemp("workflow")
    cfg = write_config(
        tmp / "config.yaml",
        tiny_llama_dir,
        tiny_text_file,
        tmp / "results",
        methods=TINY_METHODS,
        sparsities=TINY_SPARSITIES,
    )
    targets = [str(tmp / "results" / "tiny" / v / "model") for v in TINY_VARIANTS]
    run_snakemake_api(cfg, tmp, targets)
    return tmp / "results" / "tiny", cfg


# ---------------------------------------------------------------- fault-injection summary
# tests/test_faults.py marks each case with `fault(expect=...)`; the outcome of every case
# that ran is counted by what it proved, and printed once at the end of the session.

FAULT_LABELS = {
    "error": "refused with a clear error",
    "identical": "resumed bit-identical",
    "recovers": "finished by itself and recorded what it did (damping raised; another thread count)",
}
_FAULT_EXPECT: dict[str, str] = {}  # nodeid -> expected outcome
_FAULT_OUTCOME: dict[str, str] = {}  # nodeid -> passed | failed | xfailed | skipped


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "fault(expect): a fault-injection case and its expected outcome"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items) -> None:
    for item in items:
        tier(item)  # marks `unit` before `-m` deselects
        marker = item.get_closest_marker("fault")
        if marker is not None:
            _FAULT_EXPECT[item.nodeid] = marker.kwargs["expect"]


def pytest_runtest_logreport(report) -> None:
    if report.nodeid not in _FAULT_EXPECT or _FAULT_OUTCOME.get(report.nodeid) == "failed":
        return
    if report.failed:
        _FAULT_OUTCOME[report.nodeid] = "failed"
    elif report.skipped:
        _FAULT_OUTCOME[report.nodeid] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    elif report.when == "call":
        _FAULT_OUTCOME[report.nodeid] = "passed"


def pytest_terminal_summary(terminalreporter) -> None:
    """`fault injection: N cases: A refused with a clear error, B resumed bit-identical, ...`"""
    if not _FAULT_OUTCOME:
        return
    outcomes = list(_FAULT_OUTCOME.items())
    proved = [_FAULT_EXPECT[nodeid] for nodeid, outcome in outcomes if outcome == "passed"]
    parts = [
        f"{proved.count(kind)} {label}"
        for kind, label in FAULT_LABELS.items()
        if kind != "recovers" or kind in proved
    ]
    others = {
        "xfailed": "xfailed (known bugs, see their reasons)",
        "failed": "failed",
        "skipped": "skipped",
    }
    for outcome, label in others.items():
        count = sum(1 for _, o in outcomes if o == outcome)
        if count:
            parts.append(f"{count} {label}")
    terminalreporter.write_line(f"fault injection: {len(outcomes)} cases: " + ", ".join(parts))


# ---------------------------------------------------------------- test tiers
# `e2e` tests run a pipeline (the runner, a Snakemake workflow, `rose run`); `slow` ones (the real
# SmolLM2) are e2e too. Every other test is marked `unit` here, so `-m unit` selects exactly the
# pipeline-free ones, and a unit test that starts a pipeline fails (PIPELINE_GUARD) instead of
# making the fast tier slow. docs/development.md lists the commands and their times.

PIPELINE_GUARD = "unit test started a pipeline ({what}); mark it e2e (pytest.mark.e2e)"
# Snakemake options under which it runs no job
SNAKEMAKE_NO_JOBS = {
    "-n",
    "--dry-run",
    "--dryrun",
    "--lint",
    "--unlock",
    "--version",
    "-h",
    "--help",
}


def tier(item) -> str:
    """`e2e` or `unit`; marks the item `e2e` when it is `slow`, `unit` when it is neither."""
    if item.get_closest_marker("e2e") is not None:
        return "e2e"
    if item.get_closest_marker("slow") is not None:
        item.add_marker(pytest.mark.e2e)
        return "e2e"
    if item.get_closest_marker("unit") is None:
        item.add_marker(pytest.mark.unit)
    return "unit"


def pipeline_command(args) -> str | None:
    """What pipeline a command line starts: `snakemake` (unless a dry run, lint, unlock) or
    `rose run`; None for any other command."""
    argv = shlex.split(args) if isinstance(args, str) else [os.fspath(a) for a in args]
    for i, arg in enumerate(argv):
        name = Path(arg).name
        module = i > 0 and argv[i - 1] == "-m"
        if name == "snakemake" and (i == 0 or module):
            if SNAKEMAKE_NO_JOBS.isdisjoint(argv[i + 1 :]):
                return "snakemake " + " ".join(argv[i + 1 : i + 3])
            return None
        if name == "rose" and (i == 0 or module):
            rest = [a for a in argv[i + 1 :] if not a.startswith("-")]
            return "rose run" if rest[:1] == ["run"] else None
        if arg == "-c" and i + 2 < len(argv) and "rose" in argv[i + 1]:  # python -c <code> run ...
            return "rose run" if argv[i + 2] == "run" else None
    return None


def guard_pipelines(monkeypatch) -> None:
    """Make every way a test starts a pipeline raise: a step of the in-process runner, a Snakemake
    workflow executed in this process (not a dry run), and `snakemake` / `rose run` started as a
    child process."""
    from snakemake.api import DAGApi

    from rose import runner

    def refuse(what: str):
        raise AssertionError(PIPELINE_GUARD.format(what=what))

    def timed(cfg, step, *args, **kwargs):
        refuse(f"rose.runner ran the stage {getattr(step, 'stage', step)}")

    execute_workflow = DAGApi.execute_workflow

    def execute(self, executor: str = "local", *args, **kwargs):
        if executor != "dryrun":
            refuse(f"Snakemake's API executed the workflow ({executor})")
        return execute_workflow(self, executor, *args, **kwargs)

    popen_init = subprocess.Popen.__init__

    def popen(self, args, *rest, **kwargs):
        what = pipeline_command(args)
        if what is not None:
            refuse(what)
        return popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(runner, "_timed", timed)
    monkeypatch.setattr(DAGApi, "execute_workflow", execute)
    monkeypatch.setattr(subprocess.Popen, "__init__", popen)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A unit test runs guarded from the setup of its first fixture to its last teardown."""
    if tier(item) != "unit":
        yield
        return
    patch = pytest.MonkeyPatch()
    guard_pipelines(patch)
    try:
        yield
    finally:
        patch.undo()
