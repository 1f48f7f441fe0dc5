from __future__ import annotations

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


def pytest_collection_modifyitems(items) -> None:
    for item in items:
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
