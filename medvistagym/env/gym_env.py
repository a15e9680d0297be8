"""`MedVistaEnv`: the environment as a Gymnasium `Env`.

Observations are `{"text": str, "images": tuple of HxWx3 uint8 arrays}` holding
what is new this step (the question with its images at reset, tool responses
with their images after a tool turn). Actions are the model's text. `info`
carries the full chat `messages`, image sizes, errors, and at the end the
answer, status and reward parts.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .config import EnvConfig
from .episode import Episode, Observation
from .images import ImageStore
from .prompt import render_text
from .scoring import score
from .task import Task
from .views import render_views


class AnyText(spaces.Text):
    """Text of any characters (questions and actions are unicode) within a length range."""

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length


class ImageSequence(spaces.Space):
    """A tuple of RGB uint8 images (H, W, 3) of any size up to `max_side`."""

    def __init__(self, max_images: int, max_side: int = 4096, seed: int | None = None):
        super().__init__(None, np.uint8, seed)
        self.max_images, self.max_side = max_images, max_side

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def contains(self, x: Any) -> bool:
        return (
            isinstance(x, tuple)
            and len(x) <= self.max_images
            and all(
                isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
                and 0 < a.shape[0] <= self.max_side and 0 < a.shape[1] <= self.max_side
                for a in x
            )
        )

    def sample(self, mask: Any = None, probability: Any = None) -> tuple[np.ndarray, ...]:
        count = int(self.np_random.integers(0, self.max_images + 1))
        return tuple(
            self.np_random.integers(0, 256, size=(int(h), int(w), 3), dtype=np.uint8)
            for h, w in self.np_random.integers(1, 65, size=(count, 2))
        )

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, ImageSequence) and (other.max_images, other.max_side) == (self.max_images, self.max_side)


class MedVistaEnv(gym.Env):
    metadata = {"render_modes": ["ansi"], "render_fps": 1}  # text transcripts; fps is nominal

    def __init__(
        self,
        tasks: Sequence[Task] | str = "medvista-mini",
        split: str = "train",
        data_root: str | None = None,
        config: EnvConfig | None = None,
        store: ImageStore | None = None,
        render_mode: str | None = None,
        max_text_length: int = 200_000,
    ):
        if isinstance(tasks, str):
            from .datasets import load_tasks

            tasks = load_tasks(tasks, split, data_root)
        if not tasks:
            raise ValueError("MedVistaEnv needs at least one task")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.tasks = list(tasks)
        self._index = {t.id: i for i, t in enumerate(self.tasks)}
        self.config = config or EnvConfig()
        self.store = store or ImageStore()
        self.render_mode = render_mode
        self.observation_space = spaces.Dict(
            {"text": AnyText(max_length=max_text_length, min_length=0), "images": ImageSequence(self.config.max_images)}
        )
        self.action_space = AnyText(max_length=max_text_length, min_length=0)
        self.episode: Episode | None = None

    def _task(self, options: dict | None) -> Task:
        options = options or {}
        if "task_id" in options:
            if options["task_id"] not in self._index:
                raise KeyError(f"unknown task_id {options['task_id']!r}")
            return self.tasks[self._index[options["task_id"]]]
        if "task_index" in options:
            return self.tasks[int(options["task_index"]) % len(self.tasks)]
        return self.tasks[int(self.np_random.integers(len(self.tasks)))]

    def _obs(self, observation: Observation) -> dict:
        images = []
        for pixels in render_views(observation.views, self.config.resample):
            if pixels.shape[0] == 1:
                pixels = pixels.expand(3, -1, -1)
            images.append(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))
        return {"text": observation.text, "images": tuple(images)}

    def _info(self) -> dict:
        ep = self.episode
        assert ep is not None
        info: dict[str, Any] = {
            "task_id": ep.task.id,
            "turn": ep.turns,
            "messages": list(ep.messages),  # a snapshot: later turns must not change it
            "image_sizes": [v.size for v in ep.views],
            "errors": list(ep.record.errors),
        }
        if ep.done:
            info.update(
                status=ep.status,
                answer=ep.answer,
                score=score(ep.task, ep.final_text) if ep.answer is not None else 0.0,
                reward_parts=asdict(ep.reward) if ep.reward else None,
            )
        return info

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self.episode = Episode(self._task(options), self.config, self.store)
        return self._obs(self.episode.start()), self._info()

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        if self.episode is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        if self.episode.done:
            obs = {"text": "The episode is over; call reset().", "images": ()}
            return obs, 0.0, not self.episode.truncated, self.episode.truncated, self._info()
        observation = self.episode.act(action)
        ep = self.episode
        reward = ep.reward.total if ep.done and ep.reward else 0.0
        return self._obs(observation), float(reward), ep.done and not ep.truncated, ep.truncated, self._info()

    def render(self) -> str | None:
        if self.render_mode == "ansi" and self.episode is not None:
            return render_text(self.episode.messages, self.config.image_placeholder)
        return None
