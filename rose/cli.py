"""`python -m rose` / `rose`: run a config in one process, check it, or print its results.

Errors that are the user's to fix (bad config, missing model, corrupt or foreign
artifact, full disk) print one line and exit 1; they never leave a half-written
artifact, because every artifact is renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = Path("config/config.yaml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rose", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "prune (and evaluate) everything the config asks for, in this process"),
        ("check", "validate the config; print its variants and effective settings"),
        ("summary", "print the summary table of a finished run"),
        (
            "plan",
            "jobs per stage, peak disk, memory and time, from the model's config alone; "
            "exit 1 if results_dir lacks the disk",
        ),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument(
            "--config",
            "-c",
            type=Path,
            default=DEFAULT_CONFIG,
            help="YAML config (default: %(default)s)",
        )
        p.add_argument(
            "--set",
            "-s",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set calibration.nsamples=16 (repeatable)",
        )
        if name in ("run", "plan"):
            p.add_argument("--no-eval", action="store_true", help="stop at the reassembled models")
            p.add_argument(
                "--force",
                action="store_true",
                help="start (plan: exit 0) even if the predicted peak disk exceeds the free space",
            )
        if name == "run":
            p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
        if name == "plan":
            p.add_argument(
                "--driver",
                choices=("snakemake", "runner"),
                default="snakemake",
                help="whose disk peak to check: snakemake (every variant's intermediates at once, "
                "the larger) or runner (python -m rose run, variant by variant) (default: %(default)s)",
            )
    text = "check an export against its export.json, or decompress a compressed one"
    export = sub.add_parser("export", help=text, description=text)
    actions = export.add_subparsers(dest="action", required=True)
    p = actions.add_parser("verify", help="check every file of an export against its export.json")
    p.add_argument("directory", type=Path)
    p = actions.add_parser(
        "decompress", help="a compressed export -> a plain dense model directory"
    )
    p.add_argument("source", type=Path)
    p.add_argument("target", type=Path)
    return parser


def _export(args) -> int:
    """`rose export verify DIR` | `rose export decompress SRC DST`."""
    from rose import export

    if args.action == "decompress":
        print(export.decompress_export(args.source, args.target))
        return 0
    record = export.verify_export(args.directory)
    ratio = record["sizes"]["ratio"]
    print(
        f"{args.directory}: {record['format']} export of {record['variant']}, "
        f"{len(record['files'])} files verified, weights {ratio:.4f} of dense"
    )
    return 0


def _load(args):
    from rose.config import load, merge, parse_override

    overrides: dict = {}
    for item in args.set:
        overrides = merge(overrides, parse_override(item))
    return load(args.config, overrides)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    if args.command == "export":
        return _export(args)
    cfg = _load(args)
    if args.command == "check":
        from rose.config import effective

        print(f"# config OK: run {cfg.run} -> {cfg.run_dir}")
        print("# variants: " + ", ".join(v.name for v in cfg.variants))
        print(
            "# effective settings (defaults filled in; Snakemake reads the same file the same way):"
        )
        print(effective(cfg), end="")
        return 0
    if args.command == "summary":
        from rose.layout import RunLayout

        summary = RunLayout(cfg.run_dir).report_dir / "summary.md"
        if not summary.exists():
            print(f"rose: error: {summary} does not exist; run the config first", file=sys.stderr)
            return 1
        print(summary.read_text())
        return 0
    if args.command == "plan":
        return _plan(cfg, args)
    from rose.runner import run

    result = run(cfg, evaluate=not args.no_eval, force=args.force or None)
    summary = result.layout.report_dir / "summary.md"
    if summary.exists():
        print(summary.read_text())
    total = sum(t.seconds for t in result.timings)
    io = result.io_totals()
    print(
        f"artifacts: {io['bytes_written'] / 2**30:.2f} GiB written, "
        f"{io['bytes_read'] / 2**30:.2f} GiB read from disk, "
        f"{io['bytes_from_memory'] / 2**30:.2f} GiB handed over in memory "
        f"(handoff_memory {result.handoff_budget / 2**30:.1f} GiB)"
    )
    print(f"done in {total:.1f}s: results in {result.layout.run_dir}")
    return 0


class DiskFull(SystemExit):
    """Exit status 1 after a full disk (the one-line error is already printed)."""


def entry() -> None:
    """The `rose` command and `python -m rose`. After a full disk it leaves without interpreter
    teardown: an HDF5 file whose flush failed cannot be closed, and h5py retries (and crashes
    the process) when the object is collected. The partial artifact is already removed."""
    try:
        code = main()
    except DiskFull:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    raise SystemExit(code)


def _plan(cfg, args) -> int:
    """Print the pre-flight table; exit 1 (one line) when results_dir lacks the predicted peak."""
    from rose import preflight

    prediction = preflight.predict(cfg, evaluate=not args.no_eval)
    free = preflight.free_space(cfg.run_dir)
    print(preflight.format_report(prediction, args.driver, free))
    problem = preflight.shortfall(
        prediction, args.driver, free, "--force (ROSE_FORCE=1 for Snakemake)"
    )
    if problem is None:
        return 0
    if args.force or preflight.forced():
        print(f"rose: warning: {problem} (forced)", file=sys.stderr)
        return 0
    print(f"rose: error: {problem}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    from rose.artifacts import ArtifactError

    try:
        return _main(argv)
    except (ValueError, ArtifactError, FileNotFoundError) as exc:
        print(f"rose: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            print(
                f"rose: error: no space left on device writing {exc.filename or 'an artifact'}; "
                "free space and rerun (finished artifacts are kept)",
                file=sys.stderr,
            )
            if argv is None:  # the command line: see entry()
                raise DiskFull(1) from None
            return 1
        raise
    except KeyboardInterrupt:
        print("rose: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
