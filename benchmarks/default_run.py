"""The README's default-run block, from a real run: table, wall time, machine, code version.

    .venv/bin/python benchmarks/default_run.py                  # run the default config, then print
    .venv/bin/python benchmarks/default_run.py --from-existing  # print from results/<run>/ as it is
    .venv/bin/python benchmarks/default_run.py --config my.yaml --set calibration.nsamples=8

Without --from-existing it runs `.venv/bin/snakemake --profile workflow/profiles/workstation`
from the repository root (the README's first command; `--configfile` is added only
for a config other than config/config.yaml, or with --set) and times it end to end.
It records the wall time, the code version (`git describe --always --dirty`), the
command and the machine in `<run dir>/default_run.json`, so that --from-existing
prints the numbers of the run that made the results, not of the machine reading
them. The table is the report's summary table (rose.report.summary_markdown), read
back from the run's artifacts for dense plus the config's variants.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header  # noqa: E402

from rose import config as rose_config  # noqa: E402
from rose import report  # noqa: E402
from rose.layout import DENSE  # noqa: E402

DEFAULT_CONFIG = REPO / "config" / "config.yaml"
PROFILE = "workflow/profiles/workstation"
RECORD = "default_run.json"


def code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def machine_summary() -> str:
    """'a 2-core, 24 GiB CPU-only machine' (or '... machine with <GPU>')."""
    import torch

    memory = memory_gib()
    size = f"{os.cpu_count()}-core" + (f", {memory:.0f} GiB" if memory else "")
    if torch.cuda.is_available():
        return f"a {size} machine with {torch.cuda.get_device_name(0)}"
    return f"a {size} CPU-only machine"


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def load_config(path: Path, sets: list[str]) -> tuple[rose_config.RunConfig, dict]:
    overrides: dict = {}
    for item in sets:
        overrides = rose_config.merge(overrides, rose_config.parse_override(item))
    return rose_config.load(path, overrides), overrides


def run_dir_of(cfg: rose_config.RunConfig) -> Path:
    """Snakemake runs from the repository root, so a relative results_dir is relative to it."""
    return cfg.run_dir if cfg.run_dir.is_absolute() else REPO / cfg.run_dir


def shown(path: Path) -> str:
    """A path as the README shows it: relative to the repository root when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def run_snakemake(config: Path, overrides: dict, extra: list[str]) -> tuple[str, float]:
    """The README's first command, from the repository root; returns it (as shown) and its wall time."""
    snakemake = Path(sys.executable).with_name("snakemake")
    command = [str(snakemake), "--profile", PROFILE]
    display = [shown(snakemake), "--profile", PROFILE]
    tmp = None
    if overrides:
        import yaml

        merged = rose_config.merge(yaml.safe_load(config.read_text()) or {}, overrides)
        tmp = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="default_run-", delete=False)
        with tmp:
            yaml.safe_dump(merged, tmp)
        command += ["--configfile", tmp.name]
        display += ["--configfile", "<config with --set overrides>"]
    elif config.resolve() != DEFAULT_CONFIG.resolve():
        command += ["--configfile", str(config.resolve())]
        display += ["--configfile", shown(config)]
    command += extra
    display += extra
    print("running: " + " ".join(command), file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        # snakemake's own output goes to stderr: stdout is the block and nothing else
        subprocess.run(command, cwd=REPO, check=True, stdout=sys.stderr)
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
    return " ".join(display), time.perf_counter() - started


def summary_rows(run_dir: Path, variants: list[str]) -> list[report.SummaryRow]:
    """Dense plus every variant, read back exactly as the report builds them."""
    manifests = {v: report.load_manifest(run_dir, v) for v in variants}
    missing = [v for v, m in manifests.items() if m is None]
    if missing:
        raise SystemExit(
            f"{run_dir}: no reassembled model for {', '.join(missing)} "
            "(<variant>/model/pruning.json); the run has not finished"
        )
    return [report.load_row(run_dir, DENSE)] + [
        report.load_row(run_dir, v, manifests[v]) for v in variants
    ]


def block(record: dict, table: str) -> str:
    """The markdown block pasted into the README."""
    wall = record.get("wall_seconds")
    if wall is None:
        took = (
            f"(wall time not recorded: printed by --from-existing on {record['machine_summary']})"
        )
    else:
        took = f"took {duration(wall)} end to end on {record['machine_summary']} (install excluded"
        took += (
            ")"
            if record.get("fresh", True)
            else "; it resumed an existing run directory, so this is not a full run's time)"
        )
    lines = [
        f"The first command {took}, and printed:",
        "",
        table.rstrip("\n"),
        "",
        f"Measured by `benchmarks/default_run.py` (`{record['command']}`, config "
        f"`{record['config']}`, results in `{record['run_dir']}`) at code version "
        f"`{record['code_version']}`:",
        "",
    ]
    lines += [f"- {line}" for line in record["header"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="config (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, as `python -m rose run --set` (repeatable)",
    )
    parser.add_argument(
        "--from-existing",
        action="store_true",
        help="do not run: print the block from the run directory as it is",
    )
    parser.add_argument("snakemake_args", nargs="*", help="after --: passed to snakemake")
    args = parser.parse_args(argv)

    cfg, overrides = load_config(args.config, args.set)
    run_dir = run_dir_of(cfg)
    variants = [v.name for v in cfg.variants]
    record_path = run_dir / RECORD
    config_name = shown(args.config) + "".join(f" --set {s}" for s in args.set)

    if args.from_existing:
        if not run_dir.is_dir():
            raise SystemExit(f"{run_dir} does not exist; run without --from-existing first")
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        if record is None:
            record = {
                "wall_seconds": None,
                "command": "unknown: the run was not made by this script",
                "config": config_name,
                "run_dir": shown(run_dir),
                "code_version": f"{code_version()} (of this checkout; the run's own was not recorded)",
                "machine_summary": machine_summary(),
                "header": header(),
            }
    else:
        version = code_version()  # the code that runs, before the run can change anything
        fresh = not run_dir.exists()
        if not fresh:
            print(
                f"warning: {shown(run_dir)} exists: snakemake only makes what is missing, so the wall "
                "time is not a full run's; delete it for the README's number",
                file=sys.stderr,
            )
        command, wall = run_snakemake(args.config, overrides, args.snakemake_args)
        record = {
            "wall_seconds": wall,
            "fresh": fresh,
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": command,
            "config": config_name,
            "run_dir": shown(run_dir),
            "code_version": version,
            "machine_summary": machine_summary(),
            "header": header(),  # load average now = over the run's last 1 and 5 minutes
        }
        record_path.write_text(json.dumps(record, indent=2) + "\n")

    table = report.summary_markdown(summary_rows(run_dir, variants))
    sys.stdout.write(block(record, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
