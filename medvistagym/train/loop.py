"""The training job (`medvistagym train`): evaluate, warm start, GRPO, evaluate again.

    held-out eval (before) -> behaviour cloning of the scripted expert (optional)
    -> held-out eval (warm start) -> GRPO steps -> held-out eval (after)

One GRPO step: the step's tasks go to the rollout engine as groups named after their stream
position; the step's groups are trained on once all are back; the new weights go to the
policy. In async mode the next step's tasks are submitted before this step trains, so rollout
of step k+1 runs while step k trains (bounded by max_staleness); sync mode submits a step only
after the previous one's weights are installed. Checkpoints (every `checkpoint_every` steps,
after the warm start and at the end) hold everything `--resume` needs to continue exactly.
Metrics go to TensorBoard under output_dir/tb, sampled trajectories to output_dir/trajectories,
the timeline of rollout and training to output_dir/timeline.json.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from ..engine import RolloutEngine, run
from ..engine.episode import Context
from ..engine.export import TrajectoryWriter
from ..engine.metrics import TensorBoardLogger
from ..engine.tools import ToolExecutor
from ..env.datasets import canonical_name, load_tasks
from ..env.experts import build_expert
from ..policy import Policy, build_policy
from ..policy.transformers_backend import resolve_model
from ..view import build_report
from .checkpoint import latest_checkpoint, load_state, save_checkpoint
from .config import TrainConfig
from .data import TaskStream
from .evaluate import rollout_eval, summarize
from .expert import expert_trajectories
from .model import TrainModel
from .trainer import GRPOTrainer

SHOWN = ("reward", "accuracy", "answered", "tool_calls", "turns", "failed")


class Job:
    """One training run's state: trainer, policy, engine, data streams, logs."""

    def __init__(self, config: TrainConfig, resume: bool) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.checkpoint = latest_checkpoint(self.ckpt_root) if resume else None
        if resume and self.checkpoint is None:
            print(f"no checkpoint under {self.ckpt_root}: starting afresh")
        state = load_state(self.checkpoint) if self.checkpoint else {}
        if not state:
            torch.manual_seed(config.seed)
        self.source = resolve_model(config.model)  # tokenizer and processor files for checkpoints
        model = TrainModel(self.checkpoint / "model" if self.checkpoint else self.source, device=config.device,
                           dtype=config.dtype, gradient_checkpointing=config.gradient_checkpointing)
        self.trainer = GRPOTrainer(config, model)
        if state:
            self.trainer.load_state_dict(state["trainer"])
        self.results: dict[str, dict[str, float]] = state.get("results", {})
        self.warm_done: bool = state.get("warm_done", config.warm_start.steps == 0)
        self.timeline: list[dict[str, Any]] = state.get("timeline", [])
        tasks = [t for name in config.datasets for t in self._load(name, config.split)]
        self.stream = TaskStream(tasks, config.seed, "s")
        self.warm_stream = TaskStream(tasks, config.seed + 1, "w")
        limit = config.eval_limit or None
        self.eval_sets = {name: self._load(name, config.eval_split)[:limit] for name in config.eval_datasets}
        self.tb = TensorBoardLogger(str(self.out / "tb"))
        self.policy: Policy | None = None

    def _load(self, name: str, split: str) -> list:
        root = self.config.data_root
        builtin = canonical_name(name) == "medvista-mini"  # built into the cache on first use
        return load_tasks(name, split, None if root is None or builtin else Path(root) / canonical_name(name))

    # -- the phases --------------------------------------------------------------------------

    async def run(self) -> dict[str, dict[str, float]]:
        cfg = self.config
        self.policy = build_policy(cfg.policy, model=str(self.trainer.model.path), **self._policy_args())
        try:
            if "before" not in self.results:
                await self.evaluate("before")
            if not self.warm_done:
                await self.warm_start()
            await self.grpo()
            if "after" not in self.results or self.trainer.step < cfg.steps:
                await self.evaluate("after")
        finally:
            await self.policy.close()
            self.tb.close()
        return self.results

    def _policy_args(self) -> dict[str, Any]:
        args = dict(self.config.policy_args)
        if self.config.policy == "transformers":
            args.setdefault("dtype", self.config.dtype)
            args.setdefault("device", self.config.device)
            args.setdefault("seed", self.config.seed)
        return args

    async def evaluate(self, tag: str) -> None:
        trajectories = []
        for name, tasks in self.eval_sets.items():
            trajectories += await rollout_eval(self.policy, tasks, self.config.env, self.config.engine)
        summary = summarize(trajectories)
        self.results[tag] = summary
        self._write_sample(f"eval-{tag}", trajectories)
        for key, value in summary.items():
            self.tb.writer.add_scalar(f"eval/{key}", value, self.trainer.updates)
        print(f"eval {tag}: " + ", ".join(f"{k} {summary[k]:.3f}" for k in SHOWN))

    async def warm_start(self) -> None:
        ws = self.config.warm_start
        expert = build_expert(ws.expert, self.stream.tasks, self.config.seed)
        ctx = Context(self.policy, ToolExecutor(self.trainer.model.vision or "qwen2.5-vl", mode=self.config.env.resample),
                      self.config.env, self.config.engine)
        bar = tqdm(range(ws.steps), desc="warm start", unit="step", disable=not self.config.progress)
        for step in bar:
            tasks, _ = self.warm_stream.step(step, ws.tasks_per_step)
            trajectories = await expert_trajectories(ctx, tasks, expert)
            metrics = await asyncio.to_thread(self.trainer.clone_step, trajectories, ws.lr)
            self._log("warm_start", metrics, step)
            bar.set_postfix(nll=f"{metrics['nll']:.3f}")
        await self.policy.update_weights(self.trainer.weights())
        self.warm_done = True
        await self.evaluate("warm_start")
        self.save()

    async def grpo(self) -> None:
        cfg = self.config
        engine = RolloutEngine(self.policy, cfg.env, cfg.engine)
        collector = _Collector(engine)
        first = self.trainer.step
        bar = tqdm(range(first, cfg.steps), desc="grpo", unit="step", initial=first, total=cfg.steps,
                   disable=not cfg.progress)
        lookahead = 1 if cfg.mode == "async" else 0
        try:
            for s in range(first, min(first + 1 + lookahead, cfg.steps)):
                await self._submit(engine, s)
            with TrajectoryWriter(self.out / "trajectories" / f"train-from-{first:06d}.parquet") as writer:
                for step in bar:
                    groups, waited = await collector.step(self._group_ids(step))
                    metrics = await self._train(groups, waited)
                    if step + 1 + lookahead < cfg.steps:  # sync: only now, on the new weights
                        await self._submit(engine, step + 1 + lookahead)
                    writer.write_many(groups[0].trajectories if groups else [])
                    self._log("train", metrics, step)
                    self.tb.log(engine.metrics.snapshot(engine), step)
                    bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", loss=f"{metrics.get('loss', 0.0):.3f}")
                    if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                        await self.evaluate(f"step-{step + 1}")
                    if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                        self.save()
        finally:
            collector.close()
            await engine.close()

    async def _submit(self, engine: RolloutEngine, step: int) -> None:
        tasks, ids = self.stream.step(step, self.config.tasks_per_step)
        await engine.submit(tasks, group_ids=ids)

    def _group_ids(self, step: int) -> list[str]:
        return self.stream.step(step, self.config.tasks_per_step)[1]

    async def _train(self, groups: list, waited: float) -> dict[str, float]:
        """Train on the step's groups (stale ones dropped first) and install the new weights."""
        version = self.policy.version
        fresh = [g for g in groups if not _too_stale(g, version, self.config.max_staleness, self.config.mode)]
        start = time.time()
        metrics = await asyncio.to_thread(self.trainer.train_step, fresh, version)
        trained = time.time()
        await self.policy.update_weights(self.trainer.weights())
        metrics.update({"groups/stale": len(groups) - len(fresh), "time/wait_s": waited,
                        "time/sync_s": time.time() - trained})
        self.timeline.append({"step": self.trainer.step, "train": [start, trained], "sync_end": time.time(),
                              "groups": [g.group_id for g in fresh], "version": version,
                              "staleness_max": metrics["staleness/max"],
                              "episodes": [[t.started_s, t.ended_s] for g in groups for t in g.trajectories]})
        return metrics

    # -- logs and checkpoints ----------------------------------------------------------------

    def _log(self, section: str, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.tb.writer.add_scalar(f"{section}/{key}", value, step)

    def _write_sample(self, name: str, trajectories: list) -> None:
        """The first `sample_trajectories` as Parquet, and their HTML report beside it."""
        path = self.out / "trajectories" / f"{name}.parquet"
        with TrajectoryWriter(path) as writer:
            writer.write_many(trajectories[: self.config.sample_trajectories])
        build_report([path], path.with_suffix(".html"), title=f"{self.out.name}: {name}")

    def save(self) -> None:
        state = {"trainer": self.trainer.state_dict(), "results": self.results, "warm_done": self.warm_done,
                 "timeline": self.timeline, "config": asdict(self.config)}
        save_checkpoint(self.ckpt_root, f"step-{self.trainer.step:06d}", self.trainer.model.module, self.source,
                        state, self.config.keep_checkpoints)
        (self.out / "timeline.json").write_text(json.dumps(self.timeline))


class _Collector:
    """Routes the engine's completed groups to the step that submitted them."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine
        self.done: dict[str, Any] = {}
        self.arrived = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._collect())

    async def _collect(self) -> None:
        while True:
            group = await self.engine.next_group()
            self.done[group.group_id] = group
            self.arrived.set()

    async def step(self, ids: list[str]) -> tuple[list, float]:
        """The groups `ids`, once all are back, and the seconds spent waiting for them."""
        start = time.time()
        while not all(i in self.done for i in ids):
            self.arrived.clear()
            await self.arrived.wait()
        return [self.done.pop(i) for i in ids], time.time() - start

    def close(self) -> None:
        self.task.cancel()


def _too_stale(group: Any, version: int, max_staleness: int, mode: str) -> bool:
    if mode != "async":
        return False
    oldest = min((v for t in group.kept if (v := t.oldest_version()) is not None), default=None)
    return oldest is not None and version - oldest > max_staleness


def report(results: dict[str, dict[str, float]], console: Console | None = None) -> None:
    table = Table(title="held-out evaluation")
    table.add_column("when")
    for key in SHOWN:
        table.add_column(key, justify="right")
    for tag, summary in results.items():
        table.add_row(tag, *(f"{summary.get(k, 0.0):.3f}" for k in SHOWN))
    (console or Console()).print(table)


def overlap(timeline: list[dict[str, Any]]) -> dict[str, float]:
    """How much rollout ran while the trainer trained: training seconds, and the seconds of
    them during which at least one episode of a later step was in flight."""
    train_s = overlap_s = 0.0
    for i, entry in enumerate(timeline):
        start, end = entry["train"]
        train_s += end - start
        clipped = ((max(s, start), min(e, end)) for t in timeline[i + 1:] for s, e in t["episodes"])
        later = sorted((s, e) for s, e in clipped if s < e)
        covered, reach = 0.0, start
        for s, e in later:  # the union of the intervals within [start, end]
            if e > reach:
                covered += e - max(s, reach)
                reach = e
        overlap_s += covered
    return {"train_s": train_s, "overlap_s": overlap_s, "overlap_fraction": overlap_s / train_s if train_s else 0.0}


def train(config: TrainConfig, resume: bool = False) -> dict[str, dict[str, float]]:
    """Run the job; returns the held-out summaries (before, warm_start, after, ...); summary.json
    adds how much rollout overlapped training."""
    job = Job(config, resume)
    results = run(job.run())
    summary = {**results, "timeline": overlap(job.timeline)}
    (Path(config.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    report(results)
    return results
