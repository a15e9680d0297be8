"""Turn timeouts and episode deadlines for thousands of episodes, on one timer.

`asyncio.timeout` arms and disarms a timer handle on every use: at 4k episodes in flight that
was ~20 us of every turn. Here an episode only writes down when its current deadline falls,
and one periodic check cancels the tasks whose deadline has passed, as `asyncio.timeout` would.
The task learns why from its `expired` attribute and uncancels itself once it has dealt with
the expiry; any other cancellation (e.g. `RolloutEngine.close`) still goes through.

Deadlines fire up to one check interval late: a twentieth of the shortest timeout, between
5 ms and 5 s. Each check reads every episode in flight: at 4k of them, checking
every second rather than every 5 s cost ~3 us of every turn.
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol


class Watched(Protocol):
    deadline: float  # loop time; math.inf for none

    def expire(self) -> None:
        """Called once the deadline has passed: cancel the work it bounds."""


class Watchdog:
    def __init__(self, shortest_timeout_s: float) -> None:
        self.interval_s = min(max(shortest_timeout_s / 20, 0.005), 5.0)
        self._watched: set[Watched] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, item: Watched) -> None:
        self._watched.add(item)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._check)

    def forget(self, item: Watched) -> None:
        self._watched.discard(item)

    def _check(self) -> None:
        self._timer = None
        if not self._watched:
            return  # nothing to keep the timer for; the next watch() re-arms it
        loop = asyncio.get_running_loop()
        now = loop.time()
        for item in [w for w in self._watched if w.deadline <= now]:
            item.deadline = math.inf  # expired once; the item sets a new deadline if it goes on
            item.expire()
        self._timer = loop.call_later(self.interval_s, self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._watched.clear()
