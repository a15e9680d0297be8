"""The action protocol: what a model turn may contain and how it is read.

A turn is free text with, outside any `<think>` block, either
  - one or more `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, or
  - exactly one `<answer>...</answer>`.
Parsing is tolerant where models are sloppy without being ambiguous (whitespace,
code fences around the JSON, `arguments` given as a JSON string) and strict about
what counts as an answer (one closed, non-empty `<answer>` and no tool call beside it).
Errors are written for the model: they come back to it as the observation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
# Generation stops at these; a backend that drops the stop string must put it back.
STOP_STRINGS = (CALL_CLOSE, ANSWER_CLOSE)

_THINK_BLOCK = re.compile(r"<think>(.*?)(?:</think>|\Z)", re.S)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.S)
_BLOCK = {
    "tool_call": re.compile(r"<tool_call>(.*?)</tool_call>", re.S),
    "answer": re.compile(r"<answer>(.*?)</answer>", re.S),
}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Action:
    text: str
    think: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    answer: str | None = None
    errors: tuple[str, ...] = field(default=())

    @property
    def kind(self) -> str:
        """'answer', 'tool_calls' or 'invalid' (nothing the environment can act on)."""
        if self.answer is not None:
            return "answer"
        if self.tool_calls:
            return "tool_calls"
        return "invalid"

    @property
    def well_formed(self) -> bool:
        return not self.errors and self.kind != "invalid"


def _split_think(text: str) -> tuple[str | None, str]:
    """Reasoning and the rest. A leading `...</think>` without an opening tag counts
    as reasoning too: chat templates often open the think block in the prompt."""
    thoughts: list[str] = []
    if THINK_CLOSE in text and THINK_OPEN not in text.split(THINK_CLOSE, 1)[0]:
        head, text = text.split(THINK_CLOSE, 1)
        thoughts.append(head)
    rest = _THINK_BLOCK.sub(lambda m: thoughts.append(m.group(1)) or " ", text)
    think = "\n".join(t.strip() for t in thoughts).strip() if thoughts else None
    return think, rest


def _parse_call(body: str, number: int) -> tuple[ToolCall | None, str | None]:
    body = body.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    where = f"tool call {number}"
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as err:
        return None, f"{where}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    if not isinstance(obj, dict):
        return None, f'{where}: expected a JSON object {{"name": ..., "arguments": {{...}}}}'
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None, f'{where}: missing "name" (a string naming the tool)'
    args = obj.get("arguments", {})
    if isinstance(args, str):  # OpenAI's wire form carries arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None, f'{where}: "arguments" is a string that is not a JSON object'
    if not isinstance(args, dict):
        return None, f'{where}: "arguments" must be a JSON object'
    return ToolCall(name.strip(), args), None


def _unterminated(rest: str, tag: str, closed: int) -> bool:
    return rest.count(f"<{tag}>") > closed


def parse_action(text: str) -> Action:
    """Read one model turn. Never raises; problems are listed in `Action.errors`."""
    if not isinstance(text, str):
        return Action(text=repr(text), errors=("the action must be text",))
    think, rest = _split_think(text)
    errors: list[str] = []

    call_bodies = _BLOCK["tool_call"].findall(rest)
    answers = _BLOCK["answer"].findall(rest)
    if _unterminated(rest, "tool_call", len(call_bodies)):
        errors.append(f"unterminated {CALL_OPEN}: close each call with {CALL_CLOSE}")
    if _unterminated(rest, "answer", len(answers)):
        errors.append(f"unterminated {ANSWER_OPEN}: close the answer with {ANSWER_CLOSE}")

    calls: list[ToolCall] = []
    for i, body in enumerate(call_bodies, start=1):
        call, err = _parse_call(body, i)
        if call is not None:
            calls.append(call)
        else:
            errors.append(err)  # type: ignore[arg-type]

    answer: str | None = None
    if len(answers) > 1:
        errors.append(f"{len(answers)} {ANSWER_OPEN} blocks: give exactly one final answer")
    elif answers:
        if call_bodies:
            errors.append("a turn holds either tool calls or one final answer, not both")
        elif not answers[0].strip():
            errors.append(f"empty {ANSWER_OPEN}{ANSWER_CLOSE}: put the final answer inside the tags")
        else:
            answer = answers[0].strip()
    if call_bodies and len(answers) > 0:
        calls = []  # ambiguous turn: neither run the tools nor accept the answer

    if not call_bodies and not answers and not errors:
        errors.append(
            f"no tool call or answer found: call a tool as {CALL_OPEN}"
            '{"name": ..., "arguments": {...}}'
            f"{CALL_CLOSE} or give the final answer as {ANSWER_OPEN}...{ANSWER_CLOSE}"
        )
    return Action(text=text, think=think, tool_calls=tuple(calls), answer=answer, errors=tuple(errors))


def extract_answer(text: str) -> str | None:
    """The final answer of a turn that follows the protocol, else None."""
    action = parse_action(text)
    return action.answer if action.kind == "answer" else None


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{CALL_CLOSE}"


def format_tool_response(body: str) -> str:
    return f"{RESPONSE_OPEN}\n{body.strip()}\n{RESPONSE_CLOSE}"
