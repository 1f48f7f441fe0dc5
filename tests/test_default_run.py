"""benchmarks/default_run.py prints the README's default-run block from a real run directory.

The full default run takes minutes, so these tests make a tiny run directory and
use --from-existing (the path that reads a run) plus a recorded default_run.json
(what the running path writes).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
from pipeline_utils import REPO, write_config

from rose import config as rose_config
from rose import runner

pytestmark = pytest.mark.e2e  # every test reads the tiny default run


def _script():
    spec = importlib.util.spec_from_file_location(
        "default_run", REPO / "benchmarks" / "default_run.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama_dir, tiny_text_file):
    tmp = tmp_path_factory.mktemp("default_run")
    path = write_config(
        tmp / "c.yaml",
        tiny_llama_dir,
        tiny_text_file,
        tmp / "results",
        methods=["rose", "magnitude"],
        sparsities=[0.5],
        evaluation={
            "perplexity": [
                {
                    "name": "tail",
                    "source": {"kind": "file", "path": str(tiny_text_file), "split": "tail"},
                    "seqlen": 32,
                    "max_windows": 2,
                }
            ]
        },
    )
    cfg = rose_config.load(path)
    runner.run(cfg, evaluate=True, report=True)
    return path, cfg.run_dir


def _print(capsys, *argv) -> str:
    assert _script().main(list(argv)) == 0
    return capsys.readouterr().out


def test_the_table_is_the_reports_summary_table(tiny_run, capsys):
    config, run_dir = tiny_run
    out = _print(capsys, "--config", str(config), "--from-existing")
    report_md = (run_dir / "report" / "summary.md").read_text()
    table = report_md.split("\n\n", 1)[1]  # below the "# Results: <run>" heading
    assert table.startswith("| variant | method | sparsity | ppl tail |")
    assert [line.split(" | ")[0] for line in table.splitlines()[2:5]] == [
        "| dense",
        "| rose-0.5",
        "| magnitude-0.5",
    ]
    assert table in out


def test_from_existing_without_a_record_says_so_and_names_this_checkout(tiny_run, capsys):
    config, _ = tiny_run
    out = _print(capsys, "--config", str(config), "--from-existing")
    version = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out.startswith("The first command (wall time not recorded")
    assert f"at code version `{version} (of this checkout; the run's own was not recorded)`" in out
    assert "- machine: " in out and "- versions: python " in out


def test_a_recorded_run_gives_its_own_wall_time_version_and_machine(tiny_run, capsys, tmp_path):
    config, run_dir = tiny_run
    record = {
        "wall_seconds": 676.4,
        "fresh": True,
        "command": ".venv/bin/snakemake --profile workflow/profiles/workstation",
        "config": "config/config.yaml",
        "run_dir": "results/smollm2-demo",
        "code_version": "abc1234",
        "machine_summary": "a 2-core, 24 GiB CPU-only machine",
        "header": ["date: then", "machine: that one"],
    }
    path = run_dir / "default_run.json"
    path.write_text(json.dumps(record))
    try:
        out = _print(capsys, "--config", str(config), "--from-existing")
    finally:
        path.unlink()
    assert out.startswith(
        "The first command took 11 min 16 s end to end on a 2-core, 24 GiB CPU-only machine "
        "(install excluded), and printed:\n\n| variant |"
    )
    assert "at code version `abc1234`" in out
    assert out.endswith("- date: then\n- machine: that one\n")


def test_an_unfinished_run_is_refused(tiny_run, tmp_path):
    config, _ = tiny_run
    cfg = rose_config.load(config)
    bigger = write_config(
        tmp_path / "c.yaml",
        cfg.model.source,
        cfg.calibration.source.path,
        cfg.results_dir,
        methods=["rose", "magnitude", "wanda"],
        sparsities=[0.5],
    )
    with pytest.raises(SystemExit, match="no reassembled model for wanda-0.5"):
        _script().main(["--config", str(bigger), "--from-existing"])
