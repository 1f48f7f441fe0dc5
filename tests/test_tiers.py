"""The test tiers (tests/conftest.py): every test is `unit` or `e2e`, never both; `slow` is e2e;
and a unit test cannot start a pipeline without failing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import PIPELINE_GUARD, pipeline_command
from pipeline_utils import REPO, SNAKEMAKE, snakemake_cmd

GUARDED = PIPELINE_GUARD.split("(")[0].strip()


def test_every_test_is_in_exactly_one_tier(request):
    items = request.session.items  # what this session runs (after -m / -k)
    assert items
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        assert len(marks & {"unit", "e2e"}) == 1, (item.nodeid, marks)
        if "slow" in marks:
            assert "e2e" in marks, item.nodeid
    assert request.node.get_closest_marker("unit") is not None


@pytest.mark.parametrize(
    "argv, pipeline",
    [
        ([SNAKEMAKE, "--cores", "2"], True),
        ([sys.executable, "-m", "snakemake", "--snakefile", "Snakefile"], True),
        ([sys.executable, "-m", "rose", "run", "--config", "c.yaml"], True),
        (["rose", "run", "--config", "c.yaml"], True),
        ([sys.executable, "-c", "from rose.cli import main; main()", "run", "--config", "c"], True),
        ("snakemake --cores 1 results/tiny", True),
        ([SNAKEMAKE, "--cores", "2", "-n"], False),
        ([SNAKEMAKE, "--lint"], False),
        ([SNAKEMAKE, "--unlock"], False),
        ([sys.executable, "-m", "rose", "check", "--config", "c.yaml"], False),
        ([sys.executable, "-m", "rose", "plan", "--config", "c.yaml"], False),
        (["git", "rev-parse", "HEAD"], False),
        ([sys.executable, "-c", "print('snakemake')"], False),
        (
            [sys.executable, "-c", "from rose.cli import main; main()", "plan", "--config", "c"],
            False,
        ),
    ],
)
def test_pipeline_commands_are_recognised(argv, pipeline):
    assert (pipeline_command(argv) is not None) == pipeline, argv


def test_a_unit_test_that_starts_a_pipeline_fails(tmp_path, tiny_llama_dir, tiny_text_file):
    """This test is `unit`: each way of starting a pipeline raises before any work."""
    from pipeline_utils import run_snakemake_api, write_config

    from rose import config as rose_config
    from rose import runner

    cfg = write_config(tmp_path / "c.yaml", tiny_llama_dir, tiny_text_file, tmp_path / "results")
    with pytest.raises(AssertionError, match=f"{GUARDED}.*rose.runner ran the stage"):
        runner.run(rose_config.load(cfg), evaluate=False, report=False)
    with pytest.raises(AssertionError, match=f"{GUARDED}.*Snakemake's API"):
        run_snakemake_api(cfg, tmp_path)
    with pytest.raises(AssertionError, match=f"{GUARDED}.*snakemake"):
        subprocess.run(snakemake_cmd(cfg, tmp_path), capture_output=True)
    with pytest.raises(AssertionError, match=f"{GUARDED}.*rose run"):
        subprocess.run([sys.executable, "-m", "rose", "run", "--config", str(cfg)], cwd=REPO)
    assert not list((tmp_path / "results").rglob("*.h5")), "the guard let a stage run"
