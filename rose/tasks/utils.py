"""Document processing for the offline task templates (referenced by `!function utils.*`).

Prompts follow lm-eval's own definitions of these tasks, so offline scores are
comparable with scores from the hub versions of the same validation splits.
"""

from __future__ import annotations

import re
from typing import Any

_BRACKETED = re.compile(r"\[.*?\]")


def _clean_hellaswag(text: str) -> str:
    """WikiHow contexts carry '[title]'-style markup; lm-eval strips it the same way."""
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETED.sub("", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset: Any) -> Any:
    """Add `query`, `choices` and an integer `gold` to every HellaSwag row."""

    def convert(doc: dict[str, Any]) -> dict[str, Any]:
        context = f"{doc['ctx_a']} {doc['ctx_b'].capitalize()}"
        return {
            "query": _clean_hellaswag(f"{doc['activity_label']}: {context}"),
            "choices": [_clean_hellaswag(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(convert)


# Winogrande is scored by partial evaluation: each option fills the blank and
# becomes a *context*; the shared continuation after the blank is the target.
# lm-eval signals this mode by doc_to_text returning the gold index.


def winogrande_gold(doc: dict[str, Any]) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_contexts(doc: dict[str, Any]) -> list[str]:
    head = doc["sentence"][: doc["sentence"].index("_")]
    return [head + doc["option1"], head + doc["option2"]]


def winogrande_continuation(doc: dict[str, Any]) -> str:
    sentence = doc["sentence"]
    return sentence[sentence.index("_") + 1 :].strip()
