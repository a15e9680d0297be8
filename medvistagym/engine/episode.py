"""One episode as a coroutine: prompt tokens -> stream a turn from the policy -> parse ->
tools -> observation tokens and images appended -> ... until an answer, max turns, the token
budget, or the deadline. Token in, token out: the history is never re-tokenised; only the
new observation text is encoded each turn.

Every way out leaves a status on the trajectory: ok, truncated (max turns or token budget),
timeout (the deadline, or a turn that kept timing out), or "error: <reason>".
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from ..env.config import EnvConfig
from ..env.episode import Episode, Observation
from ..env.scoring import score
from ..env.views import View
from ..policy import (
    Completion, GenerateRequest, ImageInputs, Policy, PolicyError, expand_placeholders, placeholder_counts,
)
from .config import EngineConfig
from .tools import Rendered, ToolExecutor
from .trajectory import ImageRecord, ToolCallRecord, Trajectory, TurnRecord
from .watchdog import Watchdog

VISION_MARK = "<|vision_start|><|image_pad|><|vision_end|>"
T = TypeVar("T")


class TurnTimeout(Exception):
    """A turn that timed out on every attempt."""


@dataclass
class Context:
    """What every episode of an engine shares."""

    policy: Policy
    executor: ToolExecutor | None  # None for loops that render their own tool images (the baseline)
    env: EnvConfig
    config: EngineConfig
    tokens_in_flight: list[int] = field(default_factory=lambda: [0])  # a cell the engine reads
    # CPU time spent in the environment's own steps (parse, tools' geometry, reward) and in the
    # tokenizer, counted apart from the engine's own work for benchmarks.
    env_cpu_s: float = 0.0
    tokenizer_cpu_s: float = 0.0

    def __post_init__(self) -> None:
        tok = self.policy.tokenizer
        self.tokenizer = tok
        # The Rust tokenizer directly: transformers' wrappers cost ~15x the work itself here.
        self._rust = getattr(tok, "backend_tokenizer", None)
        self.image_token_id = self.policy.image_token_id or tok.convert_tokens_to_ids("<|image_pad|>")
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")
        self._system_turns: dict[str, tuple[str, list[int]]] = {}
        self.watchdog = Watchdog(min(self.config.turn_timeout_s, self.config.episode_deadline_s))

    def encode(self, text: str) -> list[int]:
        start = time.thread_time()
        try:
            if self._rust is not None:
                return self._rust.encode(text, add_special_tokens=False).ids
            return self.tokenizer.encode(text, add_special_tokens=False)
        finally:
            self.tokenizer_cpu_s += time.thread_time() - start

    def chat_template(self, messages: list[dict], **kwargs: Any) -> str:
        start = time.thread_time()
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        finally:
            self.tokenizer_cpu_s += time.thread_time() - start

    def decode(self, ids: list[int]) -> str:
        start = time.thread_time()
        try:
            if self._rust is not None:
                return self._rust.decode(ids, skip_special_tokens=False)
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        finally:
            self.tokenizer_cpu_s += time.thread_time() - start

    def expand(self, ids: list[int], rendered: Rendered) -> list[int]:
        if not rendered.pixels:
            return ids
        counts = placeholder_counts(rendered.grid, self.policy.merge_size)
        return expand_placeholders(ids, counts, self.image_token_id)

    def observation_ids(self, last_token: int, text: str, rendered: Rendered) -> list[int]:
        """Close the assistant turn, the observation as a user turn, open the next assistant turn."""
        body = text.replace(self.env.image_placeholder, VISION_MARK)
        close = "" if last_token == self.im_end else "<|im_end|>"
        ids = self.encode(f"{close}\n<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n")
        return self.expand(ids, rendered)

    def prompt_ids(self, episode: Episode, rendered: Rendered) -> list[int]:
        """The first prompt through the chat template, image placeholders expanded. The system
        turn (tool schemas: ~1k tokens, 90% of the encoding) is encoded once per distinct text;
        special tokens bound it, so encoding the rest alone gives the same ids."""
        messages = episode.messages
        text = self.chat_template(messages, add_generation_prompt=True)
        head = self._system_turn(messages[0]) if messages[0]["role"] == "system" else None
        if head is not None and text.startswith(head[0]):
            ids = head[1] + self.encode(text[len(head[0]):])
        else:
            ids = self.encode(text)
        return self.expand(ids, rendered)

    def _system_turn(self, message: dict) -> tuple[str, list[int]]:
        content = message["content"]
        key = content if isinstance(content, str) else repr(content)
        if key not in self._system_turns:
            text = self.chat_template([message])
            self._system_turns[key] = (text, self.encode(text))
        return self._system_turns[key]

    def env_step(self, step: Callable[..., T], *args: Any) -> T:
        """Run one of the environment's own steps, counting its CPU time apart from the engine's."""
        start = time.thread_time()
        try:
            return step(*args)
        finally:
            self.env_cpu_s += time.thread_time() - start


@dataclass
class FirstTurn:
    """The question, shared by the n episodes of a group: rendered and tokenised once."""

    prompt_ids: list[int]
    rendered: Rendered
    views: tuple[View, ...]


async def first_turn(ctx: Context, episode: Episode, views: tuple[View, ...]) -> FirstTurn:
    rendered = await ctx.executor.render(views)
    return FirstTurn(ctx.prompt_ids(episode, rendered), rendered, views)


def act(ctx: Context, episode: Episode, text: str, turn: TurnRecord) -> Observation:
    """The environment's step, recording the turn's tool calls and why any failed."""
    record = episode.record
    uses_before, errors_before = len(record.tool_uses), len(record.errors)
    observation = ctx.env_step(episode.act, text)
    errors = record.errors[errors_before:]
    for call, use in zip(record.actions[-1].tool_calls, record.tool_uses[uses_before:]):
        error = "" if use.ok else next((e for e in errors if e.startswith(f"{call.name}:")), "failed")
        turn.tool_calls.append(ToolCallRecord(call.name, dict(call.arguments), use.ok, error))
    return observation


class EpisodeRunner:
    """One episode as a coroutine (`run`), in the asyncio `task` its owner made for it on `loop`.
    The engine's watchdog bounds it: `deadline` is the episode's deadline, or the current turn's
    when that falls sooner, and `expire` cancels the task, saying which of the two passed in
    `expired`."""

    # Thousands are alive at once and each turn reads them cold: slots keep them to one object.
    __slots__ = ("ctx", "episode", "traj", "seed", "images", "deadline", "expired", "task", "loop", "_episode_deadline")

    def __init__(self, ctx: Context, episode: Episode, trajectory: Trajectory, seed: int) -> None:
        self.ctx, self.episode, self.traj, self.seed = ctx, episode, trajectory, seed
        self.images: ImageInputs | None = None  # the next request's model input
        self.deadline = math.inf
        self.expired: str | None = None  # "turn" or "episode" while its cancellation is on its way
        self._episode_deadline = math.inf
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def expire(self) -> None:
        self.expired = "episode" if self.loop.time() >= self._episode_deadline else "turn"
        self.task.cancel()

    def _grow(self, ids: list[int], logprobs: list[float] | None = None, versions: list[int] | int = -1) -> None:
        self.traj.append(ids, logprobs=logprobs, version=versions)
        self.ctx.tokens_in_flight[0] += len(ids)

    async def run(self, first: FirstTurn) -> Trajectory:
        traj, cfg, watchdog = self.traj, self.ctx.config, self.ctx.watchdog
        traj.started_s = time.time()
        try:
            self._grow(first.prompt_ids)
            traj.prompt_length = len(first.prompt_ids)
            self._add_images(first.rendered, first.views, turn=0)
            self._episode_deadline = self.deadline = self.loop.time() + cfg.episode_deadline_s
            watchdog.watch(self)
            await self._turns()
        except TurnTimeout:
            traj.status = "timeout"
        except PolicyError as err:
            traj.status = f"error: policy: {err}"
        except asyncio.CancelledError:
            if self.expired != "episode" or self.task.uncancel():
                traj.status = "error: cancelled"
                raise
            traj.status = "timeout"
        except Exception as err:  # a bug must cost one episode, not the engine
            traj.status = f"error: engine: {type(err).__name__}: {err}"
        finally:
            watchdog.forget(self)
            self._finish()
        return traj

    async def _turns(self) -> None:
        ep, cfg = self.episode, self.ctx.config
        while True:
            budget = cfg.max_episode_tokens - len(self.traj.token_ids)
            if budget <= 0:
                self.ctx.env_step(ep.truncate)
                return
            done, retries, seconds = await self._sample(min(cfg.max_new_tokens, budget))
            start = len(self.traj.token_ids)
            self._grow(done.token_ids, done.logprobs, done.versions)
            text = self.ctx.decode(done.token_ids)
            turn = TurnRecord(text, done.finish_reason, len(done.token_ids), start, seconds, retries=retries)
            self.traj.turns.append(turn)
            observation = act(self.ctx, self.episode, text, turn)
            if ep.done:
                return
            start = time.perf_counter()
            rendered = await self.ctx.executor.render(observation.views, self.images)
            turn.tool_s = time.perf_counter() - start
            self._add_images(rendered, observation.views, turn=len(self.traj.turns))
            last = done.token_ids[-1] if done.token_ids else -1
            self._grow(self.ctx.observation_ids(last, observation.text, rendered))
            turn.observation = observation.text

    async def _sample(self, max_new: int) -> tuple[Completion, int, float]:
        """One turn from the policy, retrying retryable errors and timeouts with backoff: the
        completion, its retries, and the seconds from the first request."""
        cfg, policy = self.ctx.config, self.ctx.policy
        turn = len(self.traj.turns)
        images = self.images
        sampling = cfg.sampling(max_new, self.seed + 1000003 * turn)
        start = time.perf_counter()
        for attempt in range(cfg.max_retries + 1):
            rid = f"{self.traj.episode_id}:t{turn}:a{attempt}"
            request = GenerateRequest(rid, self.traj.token_ids, sampling, images)  # lent: grows between turns only
            self.deadline = min(self._episode_deadline, self.loop.time() + cfg.turn_timeout_s)
            try:
                done = await policy.complete(request)  # the turn at once: no wake-up per chunk
                return done, attempt, time.perf_counter() - start
            except asyncio.CancelledError:
                if self.expired != "turn" or self.task.uncancel():
                    raise
                self.expired = None
                await policy.abort(rid)
                if attempt == cfg.max_retries:
                    raise TurnTimeout(f"turn {turn} timed out {attempt + 1} times") from None
            except PolicyError as err:
                if not err.retryable or attempt == cfg.max_retries:
                    raise
            finally:
                if self.expired is None:
                    self.deadline = self._episode_deadline
            await asyncio.sleep(cfg.retry_backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _add_images(self, rendered: Rendered, views: tuple[View, ...], turn: int) -> None:
        self.images = rendered.inputs
        record_images(self.traj, self.episode, rendered, views, turn)

    def _finish(self) -> None:
        self.ctx.tokens_in_flight[0] -= len(self.traj.token_ids)
        settle(self.ctx, self.episode, self.traj)


def record_images(traj: Trajectory, episode: Episode, rendered: Rendered, views: tuple[View, ...], turn: int) -> None:
    """The images shown at `turn`, with the task image and box each was cut from."""
    refs = episode.task.images
    for pixels, view in zip(rendered.pixels, views):
        index = episode.task_image(view)
        source = (refs[index].name or str(refs[index].path)) if index >= 0 else view.image.key
        traj.images.append(ImageRecord(pixels, turn, source, index, tuple(view.region)))


def settle(ctx: Context, episode: Episode, traj: Trajectory) -> None:
    """The trajectory's final status, answer, score and reward."""
    traj.ended_s = time.time()
    if traj.status == "ok":
        if not episode.done:
            ctx.env_step(episode.truncate)
        traj.status = episode.status
    if episode.reward is not None:
        traj.answer = episode.answer
        traj.score = ctx.env_step(score, episode.task, episode.final_text) if episode.answer is not None else 0.0
        parts = episode.reward
        traj.reward = parts.total
        traj.reward_parts = {"correct": parts.correct, "format": parts.format, "tool": parts.tool,
                             "penalty": parts.penalty}
