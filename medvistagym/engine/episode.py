"""One episode as a coroutine: prompt tokens -> stream a turn from the policy -> parse ->
tools -> observation tokens and images appended -> ... until an answer, max turns, the token
budget, or the deadline. Token in, token out: the history is never re-tokenised; only the
new observation text is encoded each turn.

Every way out leaves a status on the trajectory: ok, truncated (max turns or token budget),
timeout (the deadline, or a turn that kept timing out), or "error: <reason>".
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..env.config import EnvConfig
from ..env.episode import Episode
from ..env.scoring import score
from ..env.views import View
from ..policy import GenerateRequest, ImageInputs, Policy, PolicyError, expand_image_tokens
from .config import EngineConfig
from .tools import Rendered, ToolExecutor
from .trajectory import ImageRecord, ToolCallRecord, Trajectory, TurnRecord

VISION_MARK = "<|vision_start|><|image_pad|><|vision_end|>"


class TurnTimeout(Exception):
    """A turn that timed out on every attempt."""


@dataclass
class Context:
    """What every episode of an engine shares."""

    policy: Policy
    executor: ToolExecutor
    env: EnvConfig
    config: EngineConfig
    tokens_in_flight: list[int] = field(default_factory=lambda: [0])  # a cell the engine reads

    def __post_init__(self) -> None:
        tok = self.policy.tokenizer
        self.tokenizer = tok
        self.image_token_id = self.policy.image_token_id or tok.convert_tokens_to_ids("<|image_pad|>")
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")

    def encode(self, text: str) -> list[int]:
        # The Rust tokenizer directly: transformers' wrapper costs ~15x the encoding itself here.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(text, add_special_tokens=False)

    def expand(self, ids: list[int], rendered: Rendered) -> list[int]:
        if not rendered.pixels:
            return ids
        images = ImageInputs(rendered.pixel_values, rendered.grid_thw)
        return expand_image_tokens(ids, images, self.image_token_id, self.policy.merge_size)


@dataclass
class FirstTurn:
    """The question, shared by the n episodes of a group: rendered and tokenised once."""

    prompt_ids: list[int]
    rendered: Rendered
    views: tuple[View, ...]


async def first_turn(ctx: Context, episode: Episode, views: tuple[View, ...]) -> FirstTurn:
    rendered = await ctx.executor.render(views)
    ids = ctx.tokenizer.apply_chat_template(episode.messages, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return FirstTurn(ctx.expand(ids, rendered), rendered, views)


class _Images:
    """The images of an episode so far, as the next request's model input."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []
        self.grids: list[torch.Tensor] = []
        self.display: list[torch.Tensor] = []

    def add(self, rendered: Rendered) -> None:
        if rendered.pixels:
            self.rows.append(rendered.pixel_values)
            self.grids.append(rendered.grid_thw)
            self.display.extend(rendered.pixels)

    def inputs(self) -> ImageInputs | None:
        if not self.rows:
            return None
        return ImageInputs(torch.cat(self.rows), torch.cat(self.grids), self.display)


@dataclass
class _Sampled:
    tokens: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str
    retries: int
    seconds: float


class EpisodeRunner:
    def __init__(self, ctx: Context, episode: Episode, trajectory: Trajectory, seed: int) -> None:
        self.ctx, self.episode, self.traj, self.seed = ctx, episode, trajectory, seed
        self.images = _Images()

    def _grow(self, ids: list[int], **kwargs: Any) -> None:
        self.traj.append(ids, **kwargs)
        self.ctx.tokens_in_flight[0] += len(ids)

    async def run(self, first: FirstTurn) -> Trajectory:
        traj, cfg = self.traj, self.ctx.config
        traj.started_s = time.time()
        try:
            self._grow(first.prompt_ids)
            traj.prompt_length = len(first.prompt_ids)
            self._add_images(first.rendered, first.views, turn=0)
            async with asyncio.timeout(cfg.episode_deadline_s):
                await self._turns()
        except (TimeoutError, TurnTimeout):
            traj.status = "timeout"
        except PolicyError as err:
            traj.status = f"error: policy: {err}"
        except asyncio.CancelledError:
            traj.status = "error: cancelled"
            raise
        except Exception as err:  # a bug must cost one episode, not the engine
            traj.status = f"error: engine: {type(err).__name__}: {err}"
        finally:
            self._finish()
        return traj

    async def _turns(self) -> None:
        ep, cfg = self.episode, self.ctx.config
        while True:
            budget = cfg.max_episode_tokens - len(self.traj.token_ids)
            if budget <= 0:
                ep.truncate()
                return
            sampled = await self._sample(min(cfg.max_new_tokens, budget))
            self._grow(sampled.tokens, logprobs=sampled.logprobs, version=sampled.versions)
            text = self.ctx.tokenizer.decode(sampled.tokens, skip_special_tokens=False)
            turn = TurnRecord(text, sampled.finish_reason, len(sampled.tokens), len(self.traj.token_ids) - len(sampled.tokens),
                              sampled.seconds, retries=sampled.retries)
            self.traj.turns.append(turn)
            observation = self._act(text, turn)
            if ep.done:
                return
            start = time.perf_counter()
            rendered = await self.ctx.executor.render(observation.views)
            turn.tool_s = time.perf_counter() - start
            self._add_images(rendered, observation.views, turn=len(self.traj.turns))
            self._grow(self._observation_ids(sampled.tokens[-1] if sampled.tokens else -1, observation.text, rendered))
            turn.observation = observation.text

    def _act(self, text: str, turn: TurnRecord):
        """The environment's step, recording the turn's tool calls and why any failed."""
        record = self.episode.record
        uses_before, errors_before = len(record.tool_uses), len(record.errors)
        observation = self.episode.act(text)
        errors = record.errors[errors_before:]
        for call, use in zip(record.actions[-1].tool_calls, record.tool_uses[uses_before:]):
            error = "" if use.ok else next((e for e in errors if e.startswith(f"{call.name}:")), "failed")
            turn.tool_calls.append(ToolCallRecord(call.name, dict(call.arguments), use.ok, error))
        return observation

    async def _sample(self, max_new: int) -> _Sampled:
        """One turn from the policy, retrying retryable errors and timeouts with backoff."""
        cfg, policy = self.ctx.config, self.ctx.policy
        turn = len(self.traj.turns)
        images = self.images.inputs()
        sampling = cfg.sampling(max_new, self.seed + 1000003 * turn)
        start = time.perf_counter()
        for attempt in range(cfg.max_retries + 1):
            rid = f"{self.traj.episode_id}:t{turn}:a{attempt}"
            request = GenerateRequest(rid, list(self.traj.token_ids), sampling, images)
            tokens: list[int] = []
            logprobs: list[float] = []
            versions: list[int] = []
            try:
                async with asyncio.timeout(cfg.turn_timeout_s):
                    async for chunk in policy.generate(request):
                        tokens += chunk.token_ids
                        logprobs += chunk.logprobs
                        versions += [chunk.version] * len(chunk.token_ids)
                        if chunk.finish_reason is not None:
                            return _Sampled(tokens, logprobs, versions, chunk.finish_reason, attempt,
                                            time.perf_counter() - start)
                raise PolicyError(f"stream of {rid} ended without a finish reason")
            except TimeoutError:
                await policy.abort(rid)
                if attempt == cfg.max_retries:
                    raise TurnTimeout(f"turn {turn} timed out {attempt + 1} times") from None
            except PolicyError as err:
                if not err.retryable or attempt == cfg.max_retries:
                    raise
            await asyncio.sleep(cfg.retry_backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _observation_ids(self, last_token: int, text: str, rendered: Rendered) -> list[int]:
        """Close the assistant turn, the observation as a user turn, open the next assistant turn."""
        body = text.replace(self.ctx.env.image_placeholder, VISION_MARK)
        close = "" if last_token == self.ctx.im_end else "<|im_end|>"
        ids = self.ctx.encode(f"{close}\n<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n")
        return self.ctx.expand(ids, rendered)

    def _add_images(self, rendered: Rendered, views: tuple[View, ...], turn: int) -> None:
        self.images.add(rendered)
        refs = self.episode.task.images
        for pixels, view in zip(rendered.pixels, views):
            index = self.episode.task_image(view)
            source = (refs[index].name or str(refs[index].path)) if index >= 0 else view.image.key
            self.traj.images.append(ImageRecord(pixels, turn, source, index, tuple(view.region)))

    def _finish(self) -> None:
        ep, traj = self.episode, self.traj
        self.ctx.tokens_in_flight[0] -= len(traj.token_ids)
        traj.ended_s = time.time()
        if traj.status == "ok":
            if not ep.done:
                ep.truncate()
            traj.status = ep.status
        if ep.reward is not None:
            traj.answer = ep.answer
            traj.score = score(ep.task, ep.final_text) if ep.answer is not None else 0.0
            parts = ep.reward
            traj.reward = parts.total
            traj.reward_parts = {"correct": parts.correct, "format": parts.format, "tool": parts.tool,
                                 "penalty": parts.penalty}
