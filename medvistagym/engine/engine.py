"""The RolloutEngine: GRPO groups of multi-turn episodes, thousands in flight on one event loop.

    engine = RolloutEngine(policy, EnvConfig(), EngineConfig(group_size=8))
    feeder = asyncio.create_task(engine.submit(tasks))  # waits while max_pending_groups are queued
    for _ in tasks:
        group = await engine.next_group()      # completed groups, as they complete
    groups = await engine.generate(tasks)      # or: everything, for batch use

`groups()` iterates until every group submitted so far is out, so submit before iterating.

State ownership: the engine's coroutines (dispatcher, group runners, episode runners) run on
one event loop and own all counters; the policy streams tokens, the ToolExecutor renders in a
worker thread. Admission is the only place episodes start: while the limits on episodes and
tokens in flight hold and the engine is not paused. Every submitted episode ends as a
trajectory with a status inside a `Group`, and in the metrics, whatever happens to it.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable, Sequence

from ..env.config import EnvConfig
from ..env.episode import Episode
from ..env.images import ImageStore
from ..env.task import Task
from ..policy import Policy
from .config import EngineConfig
from .episode import Context, EpisodeRunner, FirstTurn, first_turn
from .metrics import Metrics
from .tools import ToolExecutor
from .trajectory import Trajectory

_DONE = object()


@dataclass
class Group:
    """The n episodes of one task. `kept` is what a trainer should learn from (empty when the
    group was dropped, with the reason in `dropped`)."""

    group_id: str
    task: Task
    trajectories: list[Trajectory]
    kept: list[Trajectory] = field(default_factory=list)
    dropped: str | None = None


@dataclass
class _GroupRun:
    """A group whose episodes run: the last to end hands the group out."""

    group_id: str
    task: Task
    trajectories: list[Trajectory]
    left: int


def episode_seed(seed: int, group_id: str, sample: int) -> int:
    digest = hashlib.blake2b(f"{seed}|{group_id}|{sample}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class RolloutEngine:
    def __init__(
        self,
        policy: Policy,
        env_config: EnvConfig | None = None,
        engine_config: EngineConfig | None = None,
        *,
        store: ImageStore | None = None,
        on_group: Callable[[Group], None] | None = None,
    ) -> None:
        """`on_group` sees every finished group, dropped ones included (e.g. to write them all)."""
        self.policy = policy
        self.env = env_config or EnvConfig()
        self.config = engine_config or EngineConfig()
        vision = policy.vision or "qwen2.5-vl"
        self.executor = ToolExecutor(vision, window_s=self.config.tool_batch_window_s,
                                     max_views=self.config.tool_batch_max, mode=self.env.resample,
                                     patches=policy.needs_patches)
        self.ctx = Context(policy, self.executor, self.env, self.config)
        self.store = store or ImageStore()
        self.metrics = Metrics()
        self.on_group = on_group
        self._ids = itertools.count()
        self._pending: asyncio.Queue | None = None
        self._done: asyncio.Queue | None = None
        self._admit = asyncio.Event()
        self._blocked = 0  # episodes of the group the dispatcher holds while there is no room for it
        self._paused = False
        self._dispatcher: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._in_flight = 0  # episodes
        self._outstanding = 0  # groups submitted and not yet handed out

    # -- submitting and receiving ------------------------------------------------------------

    async def submit(self, tasks: Iterable[Task], group_size: int | None = None,
                     group_ids: Iterable[str] | None = None) -> list[str]:
        """Queue one group per task; waits while max_pending_groups groups wait for admission.
        Returns the group ids. Sampling seeds derive from group ids: a trainer that names its
        groups after its data cursor samples the same episodes again when it resumes."""
        self._start()
        n = group_size or self.config.group_size
        names = iter(group_ids) if group_ids is not None else None
        ids = []
        for task in tasks:
            group_id = next(names) if names is not None else f"g{next(self._ids)}"
            self._outstanding += 1
            self.metrics.submitted(n)
            await self._pending.put((group_id, task, n))
            ids.append(group_id)
        return ids

    async def groups(self, include_dropped: bool = False) -> AsyncIterator[Group]:
        """Completed groups until every submitted group is out (submit more while iterating)."""
        while self._outstanding:
            group = await self._take()
            if include_dropped or group.dropped is None:
                yield group

    async def generate(self, tasks: Sequence[Task], group_size: int | None = None) -> list[Group]:
        """Run `tasks` to completion; every group, dropped ones included, in submission order."""
        self._start()
        feeder = asyncio.ensure_future(self.submit(tasks, group_size))
        try:
            collected = {}
            while len(collected) < len(tasks):
                group = await self._take()
                collected[group.group_id] = group
            ids = await feeder
        finally:
            feeder.cancel()
        return [collected[gid] for gid in ids]

    async def next_group(self) -> Group:
        """The next completed group, dropped ones included; waits for one (submit first)."""
        self._start()
        return await self._take()

    async def _take(self) -> Group:
        group = await self._done.get()
        self._outstanding -= 1
        self._freed()  # a consumed group frees room in the output queue
        return group

    # -- control -----------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop admitting episodes (those in flight go on), e.g. while weights are swapped."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._admit.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def tokens_in_flight(self) -> int:
        return self.ctx.tokens_in_flight[0]

    @property
    def pending_groups(self) -> int:
        return self._pending.qsize() if self._pending is not None else 0

    @property
    def done_groups(self) -> int:
        """Completed groups not yet taken by `groups()`."""
        return self._done.qsize() if self._done is not None else 0

    async def close(self) -> None:
        """Cancel everything; groups in flight end with cancelled episodes (still delivered)."""
        tasks = [t for t in (self._dispatcher, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._dispatcher = None
        self.ctx.watchdog.close()

    # -- admission ---------------------------------------------------------------------------

    def _start(self) -> None:
        if self._dispatcher is None:
            if self.config.freeze_gc:
                gc.freeze()
            if self.config.gc_threshold is not None:
                gc.set_threshold(self.config.gc_threshold, *gc.get_threshold()[1:])
        if self._dispatcher is None or self._dispatcher.done():
            self._pending = self._pending or asyncio.Queue(maxsize=self.config.max_pending_groups)
            self._done = self._done or asyncio.Queue()
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(), name="engine-dispatch")

    def _room_for(self, n: int) -> bool:
        cfg = self.config
        if self._paused:
            return False
        if self._in_flight and (self._in_flight + n > cfg.max_episodes_in_flight
                                or self.tokens_in_flight >= cfg.max_tokens_in_flight):
            return False
        return self._done.qsize() < cfg.max_pending_groups  # unconsumed output is memory too

    async def _dispatch(self) -> None:
        while True:
            group_id, task, n = await self._pending.get()
            while not self._room_for(n):
                self._blocked = n
                self._admit.clear()
                await self._admit.wait()
            self._blocked = 0
            self._in_flight += n
            self.metrics.started(n)
            self._track(asyncio.get_running_loop().create_task(self._run_group(group_id, task, n)))

    def _track(self, task: asyncio.Task) -> None:
        """Group starters, for close() to cancel (episodes leave `_tasks` themselves)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _freed(self) -> None:
        """Room opened (episodes ended, or a finished group was taken): wake the dispatcher if the
        group it holds fits now. Waking it every time would cost a task step per episode, most of
        them finding no room yet."""
        if self._blocked and self._room_for(self._blocked):
            self._admit.set()

    # -- groups ------------------------------------------------------------------------------

    async def _run_group(self, group_id: str, task: Task, n: int) -> None:
        trajectories = [
            Trajectory(f"{group_id}-{i}", group_id, i, task.id, task.dataset, task.question, str(task.answer))
            for i in range(n)
        ]
        try:
            episodes = [Episode(task, self.env, self.store) for _ in range(n)]
            first_obs = self.ctx.env_step(episodes[0].start)
            for ep in episodes[1:]:
                self.ctx.env_step(ep.start)  # the images are cached by now
            first = await first_turn(self.ctx, episodes[0], first_obs.views)
        except asyncio.CancelledError:
            self._fail(trajectories, "error: cancelled")
            self._complete(group_id, task, trajectories)
            raise
        except Exception as err:  # e.g. a corrupt or missing image: the whole group fails
            self._fail(trajectories, f"error: task: {type(err).__name__}: {err}")
            self._complete(group_id, task, trajectories)
            return
        runs = _GroupRun(group_id, task, trajectories, left=n)
        loop = asyncio.get_running_loop()
        for i, (ep, traj) in enumerate(zip(episodes, trajectories)):
            runner = EpisodeRunner(self.ctx, ep, traj, episode_seed(self.config.seed, group_id, i))
            runner.task, runner.loop = loop.create_task(self._episode(runner, first, runs)), loop
            self._tasks.add(runner.task)

    async def _episode(self, runner: EpisodeRunner, first: FirstTurn, runs: _GroupRun) -> None:
        try:
            await runner.run(first)
        finally:
            self._tasks.discard(runner.task)
            self._in_flight -= 1
            self.metrics.finished(runner.traj)
            self._freed()
            runs.left -= 1
            if not runs.left:
                self._complete(runs.group_id, runs.task, runs.trajectories)

    def _fail(self, trajectories: list[Trajectory], status: str) -> None:
        for traj in trajectories:
            traj.status = status
            self._in_flight -= 1
            self.metrics.finished(traj)
        self._freed()

    def _complete(self, group_id: str, task: Task, trajectories: list[Trajectory]) -> None:
        group = Group(group_id, task, trajectories)
        ok = [t for t in trajectories if t.ok]
        cfg = self.config
        if len(ok) < len(trajectories) and (cfg.failed_members == "drop_group" or len(ok) < cfg.min_group_members):
            group.dropped = "failed members"
        elif cfg.max_staleness is not None and self._too_stale(ok):
            group.dropped = "stale"
        else:
            group.kept = ok
        self.metrics.group(group.dropped)
        if self.on_group is not None:
            self.on_group(group)
        self._done.put_nowait(group)

    def _too_stale(self, trajectories: list[Trajectory]) -> bool:
        oldest = min((v for t in trajectories if (v := t.oldest_version()) is not None), default=None)
        return oldest is not None and self.policy.version - oldest > self.config.max_staleness
