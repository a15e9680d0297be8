"""One task played turn by turn: the state the Gymnasium env and the engine share.

`Episode.start()` and `Episode.act(text)` return `Observation`s whose new images
are `View`s; the caller renders them (the env right away, the engine batched
across episodes). Nothing a model writes makes `act` raise: bad turns become
error observations and count against the format reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..kernels.sizing import smart_resize
from .config import EnvConfig
from .images import ImageStore
from .prompt import Message, content_parts, initial_messages, question_text
from .protocol import Action, ToolCall, format_tool_response, parse_action
from .reward import EpisodeSummary, RewardParts, ToolUse, compute_reward
from .task import Task
from .tools import ToolArgumentError, ToolResult, run_tool
from .views import View, full_view


@dataclass(frozen=True)
class Observation:
    text: str  # with one image placeholder per new image
    views: tuple[View, ...]  # the new images, numbered from `first_image`
    first_image: int


@dataclass
class EpisodeRecord:
    """What happened, for rewards, metrics and trajectories."""

    actions: list[Action] = field(default_factory=list)
    tool_results: list[ToolResult] = field(default_factory=list)
    tool_uses: list[ToolUse] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Episode:
    def __init__(self, task: Task, config: EnvConfig, store: ImageStore):
        self.task, self.config, self.store = task, config, store
        self.views: list[View] = []
        self.messages: list[Message] = []
        self.record = EpisodeRecord()
        self.answer: str | None = None
        self.final_text: str = ""
        self.done = self.truncated = False
        self.reward: RewardParts | None = None
        self._task_image_of: dict[str, int] = {}

    @property
    def turns(self) -> int:
        return len(self.record.actions)

    @property
    def status(self) -> str:
        if not self.done:
            return "running"
        return "truncated" if self.truncated else "ok"

    def start(self) -> Observation:
        """Decode the task's images (raises ImageDecodeError naming a corrupt file) and pose the question."""
        cfg = self.config
        for i, image in enumerate(self.store.get_many(self.task.images)):  # decoded in one batch
            self._task_image_of.setdefault(image.key, i)
            h, w = smart_resize(image.height, image.width, cfg.patch_factor, cfg.image_min_pixels, cfg.image_max_pixels)
            self.views.append(full_view(image, (w, h)))
        sizes = [v.size for v in self.views]
        self.messages = initial_messages(self.task, sizes, cfg)
        return Observation(question_text(self.task, sizes, cfg), tuple(self.views), 0)

    def act(self, text: str) -> Observation:
        """Take one model turn. Never raises for anything the model wrote."""
        if self.done:
            raise RuntimeError("the episode is over")
        if not isinstance(text, str):
            text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        action = parse_action(text)
        self.record.actions.append(action)
        self.messages.append({"role": "assistant", "content": text})
        if action.kind == "answer" and not action.errors:
            self.answer, self.final_text = action.answer, text
            return self._finish(Observation("", (), len(self.views)))
        observation = self._tool_turn(action) if action.tool_calls else self._error_turn(action.errors)
        if self.turns >= self.config.max_turns:
            self.truncated = True
            return self._finish(observation)
        return observation

    def task_image(self, view: View) -> int:
        """Index of the task image `view` was cut from, -1 if none."""
        return self._task_image_of.get(view.image.key, -1)

    def truncate(self) -> None:
        """End the episode from outside (a token budget ran out): truncated, reward computed."""
        if not self.done:
            self.truncated = True
            self._finish(Observation("", (), len(self.views)))

    def _error_turn(self, errors: tuple[str, ...]) -> Observation:
        self.record.errors.extend(errors)
        text = "Your last turn could not be used:\n" + "\n".join(f"- {e}" for e in errors)
        self.messages.append({"role": "user", "content": text})
        return Observation(text, (), len(self.views))

    def _tool_turn(self, action: Action) -> Observation:
        first = len(self.views)
        bodies: list[str] = []
        for number, call in enumerate(action.tool_calls, start=1):
            start = len(self.views)
            if number > self.config.max_calls_per_turn:
                body = self._refuse(call, f"at most {self.config.max_calls_per_turn} tool calls per turn; call {number} was not run")
            else:
                body = self._run(call)
            message = format_tool_response(body)
            self.messages.append({"role": "tool", "content": content_parts(message, start, self.config.image_placeholder)})
            bodies.append(message)
        for err in action.errors:  # malformed calls beside good ones
            bodies.append(format_tool_response(f"error: {err}"))
            self.record.errors.append(err)
        return Observation("\n".join(bodies), tuple(self.views[first:]), first)

    def _run(self, call: ToolCall) -> str:
        try:
            result = run_tool(call, self.views, self.config)
            if len(self.views) + len(result.views) > self.config.max_images:
                raise ToolArgumentError(f"the episode already shows {len(self.views)} images, the most is {self.config.max_images}")
        except ToolArgumentError as err:
            return self._refuse(call, str(err))
        lines = []
        for view, caption in zip(result.views, result.captions):
            w, h = view.size
            lines.append(f"Image {len(self.views)}: {caption}, {w}x{h} pixels.\n{self.config.image_placeholder}")
            self.views.append(view)
        lines.extend(f"note: {note}" for note in result.notes)
        self.record.tool_results.append(result)
        self.record.tool_uses.append(ToolUse(call.name, ok=True, boxes=self._source_boxes(result)))
        return "\n".join(lines)

    def _refuse(self, call: ToolCall, reason: str) -> str:
        """A call that did not run: it still counts as a tool use (spam must not be free)."""
        self.record.errors.append(f"{call.name}: {reason}")
        self.record.tool_uses.append(ToolUse(call.name, ok=False))
        return f"error: {call.name}: {reason}"

    def _source_boxes(self, result: ToolResult) -> tuple[tuple[int, tuple[float, float, float, float]], ...]:
        """Zoom regions as (task image index, source box), for region-based rewards."""
        if not result.name.startswith("zoom"):
            return ()
        return tuple(
            (self._task_image_of[v.image.key], v.region) for v in result.views if v.image.key in self._task_image_of
        )

    def _finish(self, observation: Observation) -> Observation:
        self.done = True
        summary = EpisodeSummary(
            answer=self.answer,
            turns_well_formed=tuple(a.well_formed for a in self.record.actions),
            tool_uses=tuple(self.record.tool_uses),
            truncated=self.truncated,
        )
        self.reward = compute_reward(self.task, summary, self.config.reward)
        return observation
