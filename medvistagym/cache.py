"""Where MedVistaGym keeps what it builds on first use (the built-in data set, compiled kernels)."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CACHE_ENV = "MEDVISTAGYM_CACHE"


def cache_root() -> Path:
    """$MEDVISTAGYM_CACHE, else ~/.cache/medvistagym."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "medvistagym"))


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """One holder at a time across processes (test workers, parallel jobs) of lock file `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
