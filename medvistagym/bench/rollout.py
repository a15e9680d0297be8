"""`medvistagym bench rollout`: the rollout engine against the turn-batched loop peers run,
and the engine's scaling with episodes in flight.

Tasks: the built-in medvista-mini set (real CT, X-ray and pathology images), cycled to `--tasks`
tasks, each a GRPO group of `--group` episodes of up to 6 turns.

Policy: the simulator (`policy.sim`), which models a continuous-batching server's step time
and writes think / tool-call / answer turns whose reasoning length is long-tailed (lognormal,
median 48 tokens, sigma 1, clipped at 1024). Both methods draw the same sampling seeds, so they
get the very same scripts: only the scheduling differs (checked: identical token ids).

1. Ours vs baseline: one server (max_batch 256, step 12 ms + 70 us per running sequence); ours
   keeps `--in-flight` episodes in flight, the baseline runs batches of that many episodes
   (`bench/turn_batched.py`). Trajectories/s and their ratio; `--transformers` adds the same
   comparison on the tiny Qwen2.5-VL through the transformers back end.
2. Scaling: a fleet of 16 such servers (4096 slots) driven by one engine at 256 / 1k / 4k / 16k
   episodes in flight, each level running `--rounds` x its own number of episodes (so every
   level has the same share of ramp-up and drain). Throughput is over the whole run.
   CPU per episode-turn is the event-loop thread's CPU time split into: the simulated server
   (planning and ticks, not ours), the environment's own steps (parse, tool geometry, reward),
   the tokenizer (observation encode, turn decode), the consumer (taking each finished group's
   counts and freeing it: a trainer's work, not the engine's), and the rest: the engine's own
   overhead (admission, streaming, bookkeeping, requests, event loop, garbage collection). Image
   rendering runs on the tool thread and is reported apart (a GPU takes it over). Peak RSS
   is sampled during each level.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Awaitable, Callable, Sequence

from rich.console import Console
from rich.table import Table

from medvistagym.engine import EngineConfig, RolloutEngine
from medvistagym.engine import run as run_loop
from medvistagym.engine.episode import Context
from medvistagym.engine.trajectory import Trajectory
from medvistagym.env.config import EnvConfig
from medvistagym.env.task import Task
from medvistagym.policy import Policy
from medvistagym.policy.sim import SimPolicy

from .results import save as save_results
from .turn_batched import turn_batched_rollout

SERVER = dict(max_batch=256, decode_base_s=0.012, decode_per_seq_s=7e-5)
FLEET = dict(max_batch=4096, decode_base_s=0.012, decode_per_seq_s=7e-5 / 16)


@dataclass
class Result:
    method: str
    in_flight: int
    episodes: int = 0
    turns: int = 0
    tokens: int = 0  # sampled tokens
    wall_s: float = 0.0
    cpu_us: dict[str, float] = field(default_factory=dict)  # per episode-turn, by part
    render_cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return self.episodes / self.wall_s if self.wall_s else 0.0

    def add(self, trajectories: Sequence[Trajectory]) -> None:
        self.episodes += len(trajectories)
        for t in trajectories:
            self.turns += len(t.turns)
            self.tokens += sum(turn.new_tokens for turn in t.turns)
            self.statuses[t.status] = self.statuses.get(t.status, 0) + 1


class _Meter:
    """Event-loop thread CPU, split by part, and peak RSS, over one run. RSS is sampled on a
    thread of its own: reading /proc costs ~250 us, which the loop thread's CPU must not count."""

    def __init__(self, policy: Policy, ctx: Context) -> None:
        self.policy, self.ctx = policy, ctx
        self.peak_rss = 0
        self.consumer_s = 0.0  # what the caller spent on finished groups, outside the engine
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()

    def _parts(self) -> dict[str, float]:
        return {"thread": time.thread_time(), "sim": getattr(self.policy, "server_cpu_s", 0.0),
                "env": self.ctx.env_cpu_s, "tokenizer": self.ctx.tokenizer_cpu_s, "consumer": self.consumer_s}

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample_rss(self) -> None:
        while not self._stop.wait(0.25):
            self.peak_rss = max(self.peak_rss, self._rss())

    async def measure(self, result: Result, work: Awaitable[None]) -> None:
        sampler = threading.Thread(target=self._sample_rss, name="rss-sampler", daemon=True)
        sampler.start()
        before, start = self._parts(), time.perf_counter()
        try:
            await work
        finally:
            self._stop.set()
        result.wall_s = time.perf_counter() - start
        spent = {k: v - before[k] for k, v in self._parts().items()}
        sampler.join()
        turns = max(result.turns, 1)
        spent["engine"] = spent.pop("thread") - sum(spent.values())
        result.cpu_us = {part: s / turns * 1e6 for part, s in spent.items()}
        result.peak_rss_mb = max(self.peak_rss, self._rss()) / 2**20


def cycle(tasks: Sequence[Task], n: int) -> list[Task]:
    return [tasks[i % len(tasks)] for i in range(n)]


async def run_ours(policy: Policy, tasks: Sequence[Task], env: EnvConfig, config: EngineConfig) -> Result:
    """The engine over `tasks`; groups are consumed as they complete (nothing kept)."""
    result = Result("ours (async engine)", config.max_episodes_in_flight)
    engine = RolloutEngine(policy, env, config)
    meter = _Meter(policy, engine.ctx)

    async def work() -> None:
        feeder = asyncio.ensure_future(engine.submit(tasks))
        for _ in tasks:
            group = await engine.next_group()
            start = time.thread_time()
            result.add(group.trajectories)
            del group  # freed here, on the consumer's clock
            meter.consumer_s += time.thread_time() - start
        await feeder

    await meter.measure(result, work())
    result.render_cpu_s = engine.executor.render_cpu_s
    return result


async def run_baseline(policy: Policy, tasks: Sequence[Task], env: EnvConfig, config: EngineConfig) -> Result:
    result = Result("baseline (turn-batched)", config.max_episodes_in_flight)
    ctx = Context(policy, None, env, config)

    async def work() -> None:
        trajectories = await turn_batched_rollout(policy, tasks, env, config,
                                                  batch_episodes=config.max_episodes_in_flight, ctx=ctx)
        result.add(trajectories)

    await _Meter(policy, ctx).measure(result, work())
    return result


async def _with_policy(make: Callable[[], Policy], body: Callable[[Policy], Awaitable[Result]]) -> Result:
    policy = make()
    try:
        return await body(policy)
    finally:
        await policy.close()


async def compare(tasks: Sequence[Task], env: EnvConfig, config: EngineConfig,
                  make_policy: Callable[[], Policy]) -> list[Result]:
    """Ours and the baseline on the same tasks, each with a fresh policy."""
    ours = await _with_policy(make_policy, lambda p: run_ours(p, tasks, env, config))
    base = await _with_policy(make_policy, lambda p: run_baseline(p, tasks, env, config))
    return [ours, base]


async def scaling(tasks: Sequence[Task], env: EnvConfig, config: EngineConfig, levels: Sequence[int], rounds: float,
                  time_scale: float) -> list[Result]:
    results = []
    for level in levels:
        n_tasks = max(1, round(level * rounds / config.group_size))
        cfg = replace(config, max_episodes_in_flight=level,
                      max_pending_groups=max(config.max_pending_groups, level // config.group_size))
        make = lambda: SimPolicy(latency=dict(FLEET, time_scale=time_scale))  # noqa: E731
        results.append(await _with_policy(make, lambda p: run_ours(p, cycle(tasks, n_tasks), env, cfg)))
    return results


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=int, default=1024, help="tasks (GRPO groups) in the ours-vs-baseline run")
    p.add_argument("--group", type=int, default=8, help="episodes per task")
    p.add_argument("--in-flight", type=int, default=1024, help="ours: episodes in flight; baseline: episodes per batch")
    p.add_argument("--time-scale", type=float, default=0.25,
                   help="multiplies the simulated server's step times (1 = real time)")
    p.add_argument("--scaling", default="256,1024,4096,16384", help="episodes in flight per scaling level ('' skips)")
    p.add_argument("--rounds", type=float, default=2.0, help="scaling: episodes per level = rounds x level")
    p.add_argument("--scaling-time-scale", type=float, default=1.0, help="time scale of the scaling fleet")
    p.add_argument("--skip-compare", action="store_true", help="only the scaling table")
    p.add_argument("--transformers", action="store_true",
                   help="also compare on the tiny Qwen2.5-VL (transformers back end, CPU)")
    p.add_argument("--tf-tasks", type=int, default=8, help="tasks of the transformers comparison")
    p.add_argument("--json", default=None,
                   help="also write the results here, and their plots beside it (<stem>-compare.png, -scaling.png)")


def run(args: argparse.Namespace) -> int:
    from medvistagym.env.datasets import load_tasks

    tasks = load_tasks("medvista-mini", "train", None)
    env = EnvConfig()
    config = EngineConfig(group_size=args.group, max_episodes_in_flight=args.in_flight,
                          max_pending_groups=max(256, args.in_flight // args.group))
    levels = [int(x) for x in args.scaling.split(",") if x.strip()]
    console = Console(width=160)

    async def main() -> dict[str, list[Result]]:
        out: dict[str, list[Result]] = {}
        if not args.skip_compare:
            make = lambda: SimPolicy(latency=dict(SERVER, time_scale=args.time_scale))  # noqa: E731
            out["sim"] = await compare(cycle(tasks, args.tasks), env, config, make)
            console.print(_compare_table("simulated server, long-tail turns", out["sim"]))
        if args.transformers:
            out["transformers"] = await _transformers(tasks, env, args)
            console.print(_compare_table("tiny Qwen2.5-VL, transformers back end (CPU)", out["transformers"]))
        if levels:
            out["scaling"] = await scaling(tasks, env, config, levels, args.rounds, args.scaling_time_scale)
            console.print(_scaling_table(out["scaling"]))
        return out

    results = run_loop(main())
    if args.json:
        save_results(args.json, to_json(results))
    return 0


def to_json(results: dict[str, list[Result]]) -> dict[str, list[dict]]:
    """What `--json` writes: per part ("sim", "transformers", "scaling"), its results with their rates."""
    return {k: [dict(asdict(r), per_s=r.per_s) for r in v] for k, v in results.items()}


async def _transformers(tasks: Sequence[Task], env: EnvConfig, args: argparse.Namespace) -> list[Result]:
    from medvistagym.policy import build_policy

    config = EngineConfig(group_size=4, max_episodes_in_flight=16, max_new_tokens=48, temperature=1.0)
    small = replace(env, max_turns=3)
    return await compare(cycle(tasks, args.tf_tasks), small, config,
                         lambda: build_policy("transformers", model="qwen2.5-vl-tiny"))


def _compare_table(title: str, results: list[Result]) -> Table:
    ours, base = results
    table = Table(title=f"bench rollout: {title}")
    for col in ("method", "episodes", "turns", "tokens", "wall s", "trajectories/s", "turns/s", "ratio"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        ratio = r.per_s / base.per_s if base.per_s else 0.0
        table.add_row(r.method, str(r.episodes), str(r.turns), str(r.tokens), f"{r.wall_s:.1f}", f"{r.per_s:.1f}",
                      f"{r.turns / r.wall_s:.1f}", f"{ratio:.2f}x")
    return table


def _scaling_table(results: list[Result]) -> Table:
    table = Table(title="bench rollout: scaling (simulated 16-server fleet, 4096 slots)",
                  caption="engine, tokenizer, env, sim, consumer: event-loop CPU us per episode-turn")
    cols = ("in flight", "episodes", "trajectories/s", "turns/s", "tokens/s", "engine", "tokenizer", "env", "sim",
            "consumer", "render CPU s", "peak RSS MB")
    for col in cols:
        table.add_column(col, justify="right")
    for r in results:
        c = r.cpu_us
        table.add_row(str(r.in_flight), str(r.episodes), f"{r.per_s:.1f}", f"{r.turns / r.wall_s:.1f}",
                      f"{r.tokens / r.wall_s:.0f}", f"{c['engine']:.0f}",
                      f"{c['tokenizer']:.0f}", f"{c['env']:.0f}", f"{c['sim']:.0f}", f"{c['consumer']:.0f}",
                      f"{r.render_cpu_s:.1f}", f"{r.peak_rss_mb:.0f}")
    return table
