"""Send one job's `rose` log records to its own file, even when jobs share a process.

With workflow/profiles/workstation (force-use-threads) Snakemake runs the
`run:` blocks as threads of one controller, so a plain file handler would mix
jobs; the handler here accepts only records from the thread that opened it.
(The slurm and slurm-cpu profiles run each job in its own process; the filter then changes nothing.)
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(message)s"


@contextlib.contextmanager
def log_to(path: str | Path, level: int = logging.INFO) -> Iterator[logging.Logger]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("rose")
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter(FORMAT))
    thread = threading.get_ident()
    handler.addFilter(lambda record: record.thread == thread)
    logger.addHandler(handler)
    try:
        yield logger
    except BaseException as exc:
        logger.error("%s: %s", type(exc).__name__, exc)
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()
