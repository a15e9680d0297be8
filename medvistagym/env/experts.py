"""Scripted experts: an oracle that zooms on the annotated region and answers, and
a random baseline. They act through the same text protocol as a model, so they
serve evaluation sanity checks and behaviour-cloning warm starts alike."""

from __future__ import annotations

import hashlib
import math
import random
from typing import Protocol, Sequence

from .episode import Episode
from .protocol import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, format_tool_call
from .task import AnswerType, Task
from .views import Box, View


class Agent(Protocol):
    name: str

    def act(self, episode: Episode) -> str: ...


def _shown_box(view: View, source_box: Box, coordinates: str) -> list[int]:
    """A source box as whole shown pixels (or 0-1000), rounded outwards to keep it covered."""
    x1, y1, x2, y2 = view.from_source(source_box)
    w, h = view.size
    if coordinates == "normalized":
        x1, x2, y1, y2 = x1 * 1000 / w, x2 * 1000 / w, y1 * 1000 / h, y2 * 1000 / h
        w = h = 1000
    return [max(math.floor(x1), 0), max(math.floor(y1), 0), min(math.ceil(x2), w), min(math.ceil(y2), h)]


def _say(thought: str, body: str) -> str:
    return f"{THINK_OPEN}{thought}{THINK_CLOSE}\n{body}"


def gold_answer(task: Task) -> str:
    return task.answer if task.answer_type is AnswerType.MULTIPLE_CHOICE else task.answer_text


class OracleExpert:
    """Zooms into every annotated region once (when zooming is enabled), then answers correctly."""

    name = "oracle"

    def act(self, episode: Episode) -> str:
        task, cfg = episode.task, episode.config
        if episode.turns == 0 and task.regions and "zoom_in" in cfg.tools:
            calls = []
            for region in task.regions[: cfg.max_calls_per_turn]:
                box = _shown_box(episode.views[region.image_index], region.box, cfg.coordinates)
                args = {"bbox_2d": box, "label": region.label} if region.label else {"bbox_2d": box}
                if region.image_index:
                    args["image_index"] = region.image_index
                calls.append(format_tool_call("zoom_in", args))
            return _say("The detail is small at this size; zoom into the marked region.", "\n".join(calls))
        return _say("The answer is clear now.", f"{ANSWER_OPEN}{gold_answer(task)}{ANSWER_CLOSE}")


class RandomExpert:
    """Answers at random (uniform over yes/no, over the options, or over `open_answers`),
    zooming into a random box first with probability `zoom_probability`.

    Choices depend only on (seed, task id, turn), so results do not depend on order.
    """

    name = "random"

    def __init__(self, seed: int = 0, open_answers: Sequence[str] = (), zoom_probability: float = 0.5):
        self.seed = seed
        self.open_answers = sorted(set(open_answers)) or ["unknown"]
        self.zoom_probability = zoom_probability

    def _rng(self, episode: Episode) -> random.Random:
        key = f"{self.seed}:{episode.task.id}:{episode.turns}".encode()
        return random.Random(int.from_bytes(hashlib.sha1(key).digest()[:8], "little"))

    def act(self, episode: Episode) -> str:
        rng, task, cfg = self._rng(episode), episode.task, episode.config
        if episode.turns == 0 and "zoom_in" in cfg.tools and rng.random() < self.zoom_probability:
            w, h = episode.views[0].size
            bw, bh = rng.uniform(0.2, 0.6) * w, rng.uniform(0.2, 0.6) * h
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            return _say("Look closer somewhere.", format_tool_call("zoom_in", {"bbox_2d": [round(x), round(y), round(x + bw), round(y + bh)]}))
        if task.answer_type is AnswerType.CLOSED:
            answer = rng.choice(["yes", "no"])
        elif task.answer_type is AnswerType.MULTIPLE_CHOICE:
            answer = rng.choice(task.letters)
        else:
            answer = rng.choice(self.open_answers)
        return _say("A guess.", f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}")


def build_expert(name: str, tasks: Sequence[Task] = (), seed: int = 0) -> Agent:
    if name == "oracle":
        return OracleExpert()
    if name == "random":
        return RandomExpert(seed, [t.answer for t in tasks if t.answer_type is AnswerType.OPEN])
    raise ValueError(f"unknown expert {name!r}; known: oracle, random")
