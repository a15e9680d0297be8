"""Run an agent over tasks and report each benchmark's metric by question type."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from statistics import mean
from typing import Iterable, Sequence

from .config import EnvConfig
from .episode import Episode
from .experts import Agent
from .images import ImageDecodeError, ImageStore
from .scoring import score
from .task import AnswerType, Task
from .views import render_views


@dataclass(frozen=True)
class EpisodeResult:
    task_id: str
    dataset: str
    answer_type: str
    question_kind: str
    status: str
    score: float  # the benchmark's own metric
    reward: float
    chance: float | None  # expected score of a uniform guess (closed / multiple-choice)
    turns: int
    tool_calls: int


def _chance(task: Task) -> float | None:
    if task.answer_type is AnswerType.CLOSED:
        return 0.5
    if task.answer_type is AnswerType.MULTIPLE_CHOICE:
        return 1 / len(task.choices)
    return None


def run_episode(task: Task, agent: Agent, config: EnvConfig, store: ImageStore, render: bool = True) -> EpisodeResult:
    """Play one episode; images are rendered as a model would receive them unless `render` is off."""
    episode = Episode(task, config, store)
    status = "ok"
    try:
        observation = episode.start()
        while True:
            if render and observation.views:
                render_views(observation.views, config.resample)
            if episode.done:
                break
            observation = episode.act(agent.act(episode))
        status = episode.status
    except ImageDecodeError as err:
        status = f"error: {err}"
    reward = episode.reward.total if episode.reward else 0.0
    return result(task, status, score(task, episode.final_text) if episode.answer is not None else 0.0, reward,
                  episode.turns, len(episode.record.tool_uses))


def result(task: Task, status: str, score: float, reward: float, turns: int, tool_calls: int) -> EpisodeResult:
    """An episode's result, with the task's answer type, question kind and chance level."""
    return EpisodeResult(
        task_id=task.id, dataset=task.dataset, answer_type=task.answer_type.value,
        question_kind=str(task.metadata.get("question_kind", "")), status=status, score=score, reward=reward,
        chance=_chance(task), turns=turns, tool_calls=tool_calls,
    )


def evaluate(tasks: Sequence[Task], agent: Agent, config: EnvConfig | None = None, store: ImageStore | None = None,
             render: bool = True, progress: bool = True) -> list[EpisodeResult]:
    from tqdm import tqdm

    config, store = config or EnvConfig(), store or ImageStore()
    return [
        run_episode(task, agent, config, store, render)
        for task in tqdm(tasks, desc=f"eval {agent.name}", unit="task", disable=not progress)
    ]


def summarize(results: Iterable[EpisodeResult], key: str) -> list[dict]:
    """One row per value of `key` (an EpisodeResult field) and an overall row."""
    results = list(results)
    groups: dict[str, list[EpisodeResult]] = defaultdict(list)
    for r in results:
        groups[str(getattr(r, key))].append(r)
    rows = [_row(name, group) for name, group in sorted(groups.items())]
    return rows + [_row("all", results)] if len(groups) > 1 else rows


def _row(name: str, group: list[EpisodeResult]) -> dict:
    chances = [r.chance for r in group if r.chance is not None]
    return {
        "group": name,
        "n": len(group),
        "score": mean(r.score for r in group),
        "chance": mean(chances) if len(chances) == len(group) else None,
        "reward": mean(r.reward for r in group),
        "tool_calls": mean(r.tool_calls for r in group),
        "errors": sum(r.status not in ("ok", "truncated") for r in group),
    }


def print_report(results: Sequence[EpisodeResult], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    keys = ["answer_type"] + (["question_kind"] if any(r.question_kind for r in results) else [])
    for key in keys:
        table = Table(title=f"{title} — by {key.replace('_', ' ')}")
        for column in ("group", "n", "score", "chance", "reward", "tool calls", "errors"):
            table.add_column(column, justify="left" if column == "group" else "right")
        for row in summarize(results, key):
            table.add_row(
                row["group"], str(row["n"]), f"{row['score']:.3f}",
                "-" if row["chance"] is None else f"{row['chance']:.3f}",
                f"{row['reward']:.3f}", f"{row['tool_calls']:.2f}", str(row["errors"]),
            )
        console.print(table)
