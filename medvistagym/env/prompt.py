"""Prompts: the system prompt with tool schemas, and the question turn.

Messages follow the OpenAI chat form with images as content parts
(`{"type": "image", "index": k}` refers to image k of the episode), so a chat
template can render them; `render_text` gives the plain-text form with one
placeholder per image, which the Gymnasium env returns.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from .config import EnvConfig
from .protocol import ANSWER_CLOSE, ANSWER_OPEN, CALL_CLOSE, CALL_OPEN, RESPONSE_CLOSE, RESPONSE_OPEN, THINK_CLOSE, THINK_OPEN
from .task import AnswerType, Task
from .tools import tool_schemas

Message = dict[str, Any]

_ROLE = (
    "You are an expert in medical imaging. You answer questions about medical images, "
    "looking closer with image tools when details matter."
)

_THINK = f"Reason step by step inside {THINK_OPEN}...{THINK_CLOSE}."
_CALLS = f"""Then either call tools or answer. To call a tool, write {CALL_OPEN}{{"name": <tool-name>, "arguments": <args-json-object>}}{CALL_CLOSE}; several calls in one turn are allowed.
Tool results come back inside {RESPONSE_OPEN}...{RESPONSE_CLOSE} with the new images. Images are numbered in order of appearance: the first input image is image 0."""
_FINAL = f"When you are sure, give the final answer as {ANSWER_OPEN}...{ANSWER_CLOSE} and nothing else after it."

_ANSWER_HINT = {
    AnswerType.CLOSED: f"Answer yes or no, as {ANSWER_OPEN}yes{ANSWER_CLOSE} or {ANSWER_OPEN}no{ANSWER_CLOSE}.",
    AnswerType.MULTIPLE_CHOICE: f"Answer with the letter of one option, e.g. {ANSWER_OPEN}A{ANSWER_CLOSE}.",
    AnswerType.OPEN: f"Answer with a short phrase, e.g. {ANSWER_OPEN}left lung{ANSWER_CLOSE}.",
}


def system_prompt(config: EnvConfig) -> str:
    if not config.tools:
        return f"{_ROLE}\n\n{_THINK}\n{_FINAL}"
    coords = (
        "bbox_2d = [x1, y1, x2, y2] in pixels of the image as you see it"
        if config.coordinates == "pixel"
        else "bbox_2d = [x1, y1, x2, y2] normalized to 0-1000 on both axes"
    )
    tools = "\n".join(json.dumps(schema) for schema in tool_schemas(config))
    return (
        f"{_ROLE}\n\n{_THINK}\n{_CALLS}\n{_FINAL}\nBoxes: {coords}.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>"
    )


def question_text(task: Task, sizes: Sequence[tuple[int, int]], config: EnvConfig) -> str:
    """The question turn's text; image placeholders stand where the images go."""
    cites = "<image " in task.question or any("<image " in c for c in task.choices)
    lines = []
    for k, (w, h) in enumerate(sizes):
        alias = f" = <image {k + 1}>" if cites else ""  # MMMU-style texts cite images from 1
        lines.append(f"Image {k}{alias} ({w}x{h} pixels):\n{config.image_placeholder}")
    lines.append(f"Question: {task.question}")
    if task.answer_type is AnswerType.MULTIPLE_CHOICE:
        lines.append("Options:\n" + "\n".join(f"{letter}. {choice}" for letter, choice in zip(task.letters, task.choices)))
    lines.append(_ANSWER_HINT[task.answer_type])
    return "\n".join(lines)


def content_parts(text: str, first_image: int, placeholder: str) -> list[dict]:
    """Text with placeholders as OpenAI-style content parts, images numbered from `first_image`."""
    parts: list[dict] = []
    for i, chunk in enumerate(text.split(placeholder)):
        if i:
            parts.append({"type": "image", "index": first_image + i - 1})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def initial_messages(task: Task, sizes: Sequence[tuple[int, int]], config: EnvConfig) -> list[Message]:
    return [
        {"role": "system", "content": system_prompt(config)},
        {"role": "user", "content": content_parts(question_text(task, sizes, config), 0, config.image_placeholder)},
    ]


def render_text(messages: Sequence[Message], placeholder: str = "<image>") -> str:
    """A plain-text transcript: role headers, text, one placeholder per image."""
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = "".join(p["text"] if p["type"] == "text" else placeholder for p in content)
        out.append(f"[{message['role']}]\n{content}")
    return "\n\n".join(out)
