"""One-line error messages from exceptions raised by third-party libraries.

Loaders (transformers, safetensors, datasets, torch.load) raise exceptions whose
text spans many lines; the pipeline reports only the first, so every failure
stays one clear line.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first non-empty line of the exception's text, or its type name when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
