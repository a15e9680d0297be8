"""Rollouts only: run the engine over a task list and write every trajectory to Parquet,
with a progress bar and (optionally) TensorBoard scalars."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ..env.task import Task
from .engine import Group, RolloutEngine
from .export import TrajectoryWriter
from .metrics import TensorBoardLogger


async def rollout_to_parquet(
    engine: RolloutEngine, tasks: Sequence[Task], path: str | Path, *, tensorboard: str | None = None,
    progress: bool = True,
) -> dict:
    """Every group (dropped ones too) is written; returns the final metrics snapshot."""
    bar = tqdm(total=len(tasks) * engine.config.group_size, unit="ep", disable=not progress, desc="rollout")
    logger = TensorBoardLogger(tensorboard) if tensorboard else None
    step = 0

    def write(group: Group) -> None:
        nonlocal step
        writer.write_many(group.trajectories)  # PNG encoding: a few ms per image, on the loop thread
        bar.update(len(group.trajectories))
        snap = engine.metrics.snapshot(engine)
        bar.set_postfix(ok=snap.get("status/ok", 0), tok_s=f"{snap['tokens/per_s']:.0f}",
                        in_flight=snap["in_flight/episodes"], refresh=False)
        if logger is not None:
            logger.log(snap, step)
        step += 1

    with TrajectoryWriter(path) as writer:
        engine.on_group = write
        try:
            await engine.generate(tasks)
        finally:
            engine.on_group = None
            bar.close()
            if logger is not None:
                logger.close()
    await asyncio.sleep(0)
    return engine.metrics.snapshot(engine)
