"""Where MedVistaGym keeps what it builds on first use (the built-in data set, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MEDVISTAGYM_CACHE"


def cache_root() -> Path:
    """$MEDVISTAGYM_CACHE, else ~/.cache/medvistagym."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "medvistagym"))
