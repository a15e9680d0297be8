"""The async rollout engine: GRPO groups of multi-turn episodes in flight on one event loop,
tool calls rendered in batches, trajectories with token-level log-probs and versions."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, TypeVar

from .config import EngineConfig
from .engine import Group, RolloutEngine
from .metrics import Metrics
from .tools import ToolExecutor
from .trajectory import ImageRecord, ToolCallRecord, Trajectory, TurnRecord

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop (asyncio's default loop when uvloop is missing)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


__all__ = [
    "EngineConfig", "Group", "ImageRecord", "Metrics", "RolloutEngine", "ToolCallRecord", "ToolExecutor", "Trajectory",
    "TurnRecord", "run",
]
