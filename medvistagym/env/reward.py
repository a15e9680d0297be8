"""The RL reward: strict answer correctness, format, and grounded tool use.

This is deliberately separate from `scoring.py` (each benchmark's own metric).
Official metrics are lenient in ways a policy learns to exploit: substring hits
("no" in "nodule"), recall that pays for padding, letter parsers that accept
"A or B". The reward only pays for an unambiguous answer:

- closed (yes/no): the first word is yes or no and the other polarity never appears;
- multiple choice: exactly one option identified, by letter or by its text;
- open: token F1 against the gold (and `answer_aliases`), so padding dilutes it.

Tool use pays only for a correct answer reached with few calls whose zoom boxes
land on an annotated region; every call past a free budget costs a penalty.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, fields
from typing import Iterable

from .task import AnswerType, Region, Task

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ToolUse:
    """One executed tool call, as the environment reports it."""

    name: str
    ok: bool  # ran without an argument error
    boxes: tuple[tuple[int, Box], ...] = ()  # (task image index, box in SOURCE pixels) for zooms


@dataclass(frozen=True)
class EpisodeSummary:
    """What the reward sees of an episode."""

    answer: str | None  # content of the final <answer>, None if none
    turns_well_formed: tuple[bool, ...]  # per model turn: Action.well_formed
    tool_uses: tuple[ToolUse, ...]
    truncated: bool = False


@dataclass(frozen=True)
class RewardConfig:
    """Weights and rules of the reward (a YAML mapping loads it, see `medvistagym.config`).

    total = correct_weight * correct + format_weight * format + tool_weight * tool - penalty,
    with correct, format, tool in [0, 1] and penalty in [0, max_penalty]; so
    total lies in [-max_penalty, correct_weight + format_weight + tool_weight]
    ([-1.0, 1.3] with the defaults).
    """

    correct_weight: float = 1.0
    format_weight: float = 0.1  # answer given and every model turn well formed
    tool_weight: float = 0.2
    # Tool use pays only when the answer is correct (correctness >= correct_threshold),
    # so calling tools can never be a reward on its own.
    tool_requires_correct: bool = True
    correct_threshold: float = 1.0
    max_rewarded_tool_calls: int = 4  # more calls than this (failed ones included): tool part 0
    free_tool_calls: int = 4  # calls beyond this each cost tool_call_penalty
    tool_call_penalty: float = 0.05
    max_penalty: float = 1.0  # keeps the total bounded below
    # Tool part for a task without annotated regions (nothing to check a zoom against).
    reward_tool_without_region: float = 0.0
    # A zoom may cover up to this multiple of the region's area before its pay shrinks:
    # context around a finding is useful, a whole-image box is not.
    zoom_context_ratio: float = 2.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool) and value < 0:
                raise ValueError(f"RewardConfig.{f.name} must be >= 0, got {value}")
        if self.zoom_context_ratio < 1.0:
            raise ValueError("RewardConfig.zoom_context_ratio must be >= 1")


@dataclass(frozen=True)
class RewardParts:
    """The total and each unweighted part (correct, format, tool in [0, 1]), for logging."""

    total: float
    correct: float
    format: float
    tool: float
    penalty: float


# ---------------------------------------------------------------- text normalisation

_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    word: str(i)
    for i, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_WORD = re.compile(r"[^\W_]+(?:\.\d+)?")  # letters/digits runs; keeps decimals like 2.5


def _singular(word: str) -> str:
    """Light plural folding, applied to gold and answer alike so only consistency matters."""
    if len(word) <= 3 or not word.endswith("s") or word.endswith(("ss", "us", "is")) or word[0].isdigit():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes", "zes")):
        return word[:-2]
    return word[:-1]


def normalize_tokens(text: str) -> list[str]:
    """Lowercase word tokens without punctuation or articles, number words as digits, singular."""
    text = unicodedata.normalize("NFKC", text).lower()
    words = (_NUMBER_WORDS.get(w, w) for w in _WORD.findall(text))
    return [_singular(w) for w in words if w not in _ARTICLES]


def token_f1(prediction: list[str], gold: list[str]) -> float:
    common = sum((Counter(prediction) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _gold_strings(task: Task) -> list[str]:
    aliases = task.metadata.get("answer_aliases") or ()
    if isinstance(aliases, str):
        aliases = (aliases,)
    return [task.answer, *(str(a) for a in aliases)]


# ---------------------------------------------------------------- correctness

# The first word must be yes/no; an answer is void if any word of the other polarity appears.
_CONTRADICTS = {"yes": frozenset({"no", "not"}), "no": frozenset({"yes"})}


def _polarity(text: str) -> str | None:
    """'yes'/'no' when the first word says so and the other polarity never appears."""
    tokens = normalize_tokens(text)
    if not tokens or tokens[0] not in _CONTRADICTS:
        return None
    return None if set(tokens) & _CONTRADICTS[tokens[0]] else tokens[0]


def _closed_correct(answer: str, golds: list[str]) -> float:
    said, said_tokens = _polarity(answer), normalize_tokens(answer)
    for gold in golds:
        expected = _polarity(gold)
        if expected is not None and said == expected:
            return 1.0
        # a closed gold that is not yes/no ("left"): exact normalised match only
        if expected is None and said_tokens and said_tokens == normalize_tokens(gold):
            return 1.0
    return 0.0


def _open_correct(answer: str, golds: list[str]) -> float:
    said = normalize_tokens(answer)
    best = 0.0
    for gold in golds:
        expected = normalize_tokens(gold)
        if not expected:  # gold of punctuation only: compare verbatim
            best = max(best, float(answer.strip().lower() == gold.strip().lower()))
        elif said == expected or (said and set(said) == set(expected)):
            return 1.0
        else:
            best = max(best, token_f1(said, expected))
    return best


# Multiple choice: an answer names options by letter and/or by text; it is right only
# when exactly one option is named and it is the gold one.
_LETTER = re.compile(r"(?<![\w'’-])([A-Za-z])(?![\w'’-])")
_OPTION_CUE = re.compile(r"\b(?:option|choice|letter)\s*[:=]?\s*\(?$", re.I)
_ANSWER_CUE = re.compile(r"\banswer(?:\s+is)?\s*[:=]?\s*\(?$", re.I)
_NEXT_WORD = re.compile(r"\s+([a-z][\w'’-]*)")
_CONNECTORS = frozenset({"or", "and", "nor", "vs", "versus", "then", "to"})
_BARE_LETTER = re.compile(r"^\s*\(?\s*([A-Za-z])\s*\)?\s*[.:)]?\s*$")


def _contains(haystack: list[str], needle: list[str], used: list[bool]) -> bool:
    """Mark the first unused occurrence of `needle` in `haystack` as used."""
    n = len(needle)
    for start in range(len(haystack) - n + 1):
        if haystack[start : start + n] == needle and not any(used[start : start + n]):
            used[start : start + n] = [True] * n
            return True
    return False


def _options_by_text(answer: str, choices: tuple[str, ...]) -> set[int]:
    """Options whose normalised text occurs in the answer as whole tokens, longest first
    so that "aspiration pneumonia" is not also read as "pneumonia"."""
    said = normalize_tokens(answer)
    used = [False] * len(said)
    options = sorted(enumerate(map(normalize_tokens, choices)), key=lambda item: -len(item[1]))
    return {i for i, tokens in options if tokens and _contains(said, tokens, used)}


def _blank_option_texts(answer: str, choices: tuple[str, ...]) -> str:
    """The answer with option texts removed, so "Hepatitis B" is not read as letter B."""
    for choice in sorted(choices, key=len, reverse=True):
        words = re.findall(r"[^\W_]+", choice)
        if words:
            pattern = r"(?<![^\W_])" + r"[\W_]+".join(map(re.escape, words)) + r"(?![^\W_])"
            answer = re.sub(pattern, " ", answer, flags=re.I)
    return answer


def _is_letter_mention(text: str, match: re.Match[str]) -> bool:
    letter, before, after = match.group(1), text[: match.start()], text[match.end() :]
    in_parens = before.rstrip().endswith("(") and after.lstrip().startswith(")")
    if in_parens or _OPTION_CUE.search(before):
        return True
    if letter.islower():  # lowercase letters are words ("the answer is a mass")
        return False
    if _ANSWER_CUE.search(before):
        return True
    if letter in "AI":  # the article "A" / pronoun "I" before a word, unless joined as in "A or B"
        following = _NEXT_WORD.match(after)
        return following is None or following.group(1) in _CONNECTORS
    return True


def _options_by_letter(answer: str, task: Task) -> set[int]:
    bare = _BARE_LETTER.match(answer)
    if bare:
        letter = bare.group(1).upper()
        return {task.letters.index(letter)} if letter in task.letters else set()
    text = _blank_option_texts(answer, task.choices)
    return {
        task.letters.index(m.group(1).upper())
        for m in _LETTER.finditer(text)
        if m.group(1).upper() in task.letters and _is_letter_mention(text, m)
    }


def _choice_correct(answer: str, task: Task) -> float:
    named = _options_by_letter(answer, task) | _options_by_text(answer, task.choices)
    return float(named == {task.letters.index(task.answer)})


def answer_correctness(task: Task, answer: str | None) -> float:
    """Strict correctness of a final answer, in [0, 1]; never substring matching."""
    if not isinstance(answer, str) or not answer.strip():
        return 0.0
    if task.answer_type is AnswerType.MULTIPLE_CHOICE:
        return _choice_correct(answer, task)
    if task.answer_type is AnswerType.CLOSED:
        return _closed_correct(answer, _gold_strings(task))
    return _open_correct(answer, _gold_strings(task))


# ---------------------------------------------------------------- tool use


def _area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _ordered(box: Box) -> Box:
    x1, y1, x2, y2 = (float(v) for v in box)
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def zoom_quality(box: Box, region: Region, context_ratio: float = 1.0) -> float:
    """Coverage of the region times tightness of the box, in [0, 1].

    A box up to `context_ratio` times the region's area is fully tight; beyond that
    the pay falls with the box's area, so a whole-image box earns little.
    """
    zoom, target = _ordered(box), _ordered(region.box)
    inter: Box = (max(zoom[0], target[0]), max(zoom[1], target[1]), min(zoom[2], target[2]), min(zoom[3], target[3]))
    overlap, zoom_area, target_area = _area(inter), _area(zoom), _area(target)
    if overlap <= 0 or zoom_area <= 0 or target_area <= 0:
        return 0.0
    coverage = overlap / target_area
    tightness = min(1.0, context_ratio * target_area / zoom_area)
    return coverage * tightness


def _grounding(task: Task, uses: Iterable[ToolUse], config: RewardConfig) -> float:
    ok = [use for use in uses if use.ok]
    if not ok:
        return 0.0
    if not task.regions:
        return config.reward_tool_without_region
    return max(
        (
            zoom_quality(box, region, config.zoom_context_ratio)
            for use in ok
            for image_index, box in use.boxes
            for region in task.regions
            if region.image_index == image_index
        ),
        default=0.0,
    )


def _tool_part(task: Task, episode: EpisodeSummary, correct: float, config: RewardConfig) -> float:
    calls = len(episode.tool_uses)
    if calls == 0 or calls > config.max_rewarded_tool_calls:
        return 0.0
    if config.tool_requires_correct and correct < config.correct_threshold:
        return 0.0
    return min(1.0, max(0.0, _grounding(task, episode.tool_uses, config)))


def compute_reward(task: Task, episode: EpisodeSummary, config: RewardConfig = RewardConfig()) -> RewardParts:
    """The episode's reward and its parts; range in `RewardConfig`'s docstring."""
    answered = episode.answer is not None and not episode.truncated
    correct = answer_correctness(task, episode.answer) if answered else 0.0
    well_formed = answered and all(episode.turns_well_formed)
    format_part = 1.0 if well_formed else 0.0
    tool = _tool_part(task, episode, correct, config)
    extra_calls = max(0, len(episode.tool_uses) - config.free_tool_calls)
    penalty = min(config.max_penalty, extra_calls * config.tool_call_penalty)
    total = (
        config.correct_weight * correct + config.format_weight * format_part + config.tool_weight * tool - penalty
    )
    return RewardParts(total=total, correct=correct, format=format_part, tool=tool, penalty=penalty)
