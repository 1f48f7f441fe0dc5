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


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the fault-injection count (tests/test_faults.py records each case)."""
    faults = sys.modules.get("test_faults")
    results = getattr(faults, "RESULTS", None)
    if results:
        passed = sum(ok for _, ok in results)
        terminalreporter.write_line(f"fault injection: {len(results)} cases, {passed} passed")
