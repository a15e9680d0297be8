"""The training task stream: reproducible, endless, addressable by step.

Step s trains on positions [s * n, (s + 1) * n) of an endless sequence of epochs, each a fresh
seeded shuffle of the task list. A position says which task and which group id (so which
sampling seeds) it gets, so a resumed run picks up exactly where the killed one stopped,
whatever was in flight when it died.
"""

from __future__ import annotations

import random
from typing import Sequence

from ..env.task import Task


class TaskStream:
    def __init__(self, tasks: Sequence[Task], seed: int, tag: str = "s") -> None:
        if not tasks:
            raise ValueError("no tasks to train on")
        self.tasks, self.seed, self.tag = list(tasks), seed, tag
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.tasks)))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._orders[epoch] = order
        return self._orders[epoch]

    def at(self, position: int) -> Task:
        epoch, i = divmod(position, len(self.tasks))
        return self.tasks[self._order(epoch)[i]]

    def step(self, step: int, n: int) -> tuple[list[Task], list[str]]:
        """The tasks of step `step` and their group ids."""
        positions = range(step * n, (step + 1) * n)
        return [self.at(p) for p in positions], [f"{self.tag}{p}" for p in positions]
