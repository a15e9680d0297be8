"""Question templates of medvista-mini: global ones from the source facts, local
ones about the circled finding. Each returns plain dicts (written to JSONL)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .findings import COUNTS, SHAPES
from .sources import BODY_PARTS, MODALITY_ALIASES, MODALITY_PHRASES, SourceFacts

FORMS = ("closed", "multiple_choice", "open")
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
_MARK = "the faint mark inside the circle"


def _question(kind: str, form: str, question: str, answer: str, *, choices: list[str] | None = None,
              aliases: list[str] | None = None, needs_zoom: bool = False) -> dict[str, Any]:
    return {"kind": kind, "form": form, "question": question, "answer": answer, "choices": choices or [],
            "aliases": aliases or [], "needs_zoom": needs_zoom}


def _choices(rng: np.random.Generator, truth: str, pool: list[str], n: int = 4) -> tuple[list[str], str]:
    """`n` shuffled options holding `truth`, and its letter."""
    others = [p for p in pool if p != truth]
    picked = [truth] + [others[i] for i in rng.choice(len(others), size=min(n - 1, len(others)), replace=False)]
    order = rng.permutation(len(picked))
    options = [picked[i] for i in order]
    return options, "ABCDEFG"[options.index(truth)]


def _pick_other(rng: np.random.Generator, truth: str, pool: list[str] | tuple[str, ...]) -> str:
    """`truth` or another value from `pool`, each half the time: balanced yes/no."""
    if rng.random() < 0.5:
        return truth
    others = [p for p in pool if p != truth]
    return others[int(rng.integers(len(others)))]


def _closed_answer(asked: str, truth: str) -> str:
    return "yes" if asked == truth else "no"


def modality_question(rng: np.random.Generator, facts: SourceFacts, form: str) -> dict[str, Any]:
    truth, pool = facts.modality, list(MODALITY_PHRASES)
    if form == "closed":
        asked = _pick_other(rng, truth, pool)
        return _question("modality", form, f"Is this {MODALITY_PHRASES[asked]}?", _closed_answer(asked, truth))
    if form == "multiple_choice":
        options, letter = _choices(rng, truth, pool)
        return _question("modality", form, "Which imaging modality was used to acquire this image?", letter, choices=options)
    return _question("modality", form, "Which imaging modality was used to acquire this image?", truth,
                     aliases=MODALITY_ALIASES.get(truth, []))


def body_part_question(rng: np.random.Generator, facts: SourceFacts, form: str) -> dict[str, Any]:
    truth = facts.body_part
    assert truth is not None
    if form == "closed":
        asked = _pick_other(rng, truth, BODY_PARTS)
        return _question("body_part", form, f"Does this image show the {asked}?", _closed_answer(asked, truth))
    if form == "multiple_choice":
        options, letter = _choices(rng, truth, list(BODY_PARTS))
        return _question("body_part", form, "Which part of the body is shown in this image?", letter, choices=options)
    return _question("body_part", form, "Which part of the body is shown in this image?", truth)


def view_question(rng: np.random.Generator, facts: SourceFacts, form: str) -> dict[str, Any]:
    truth, pool = facts.view, ["PA", "AP", "lateral", "oblique"]
    assert truth is not None
    aliases = {"PA": ["posteroanterior", "posterior-anterior"], "AP": ["anteroposterior", "anterior-posterior"]}[truth]
    if form == "closed":
        asked = _pick_other(rng, truth, ["PA", "AP"])
        return _question("view", form, f"Was this radiograph taken in the {asked} projection?", _closed_answer(asked, truth))
    if form == "multiple_choice":
        options, letter = _choices(rng, truth, pool)
        return _question("view", form, "In which projection was this radiograph taken?", letter, choices=options)
    return _question("view", form, "In which projection was this radiograph taken (PA or AP)?", truth, aliases=aliases)


def shape_question(rng: np.random.Generator, shape: str, form: str) -> dict[str, Any]:
    if form == "closed":
        asked = _pick_other(rng, shape, SHAPES)
        return _question("finding_shape", form, f"Is {_MARK} shaped like a {asked}?", _closed_answer(asked, shape), needs_zoom=True)
    if form == "multiple_choice":
        options, letter = _choices(rng, shape, list(SHAPES))
        return _question("finding_shape", form, f"What is the shape of {_MARK}?", letter, choices=options, needs_zoom=True)
    return _question("finding_shape", form, f"What is the shape of {_MARK}? Answer with one word.", shape, needs_zoom=True)


def count_question(rng: np.random.Generator, count: int, form: str) -> dict[str, Any]:
    text = "How many faint dots are inside the circle?"
    if form == "closed":
        asked = int(_pick_other(rng, str(count), [str(c) for c in COUNTS]))
        return _question("finding_count", form, f"Are there exactly {asked} faint dots inside the circle?",
                         _closed_answer(str(asked), str(count)), needs_zoom=True)
    if form == "multiple_choice":
        options, letter = _choices(rng, str(count), [str(c) for c in (*COUNTS, 5)])
        return _question("finding_count", form, text, letter, choices=options, needs_zoom=True)
    return _question("finding_count", form, text + " Answer with a number.", str(count),
                     aliases=[_NUMBER_WORDS[count]], needs_zoom=True)


def case_questions(rng: np.random.Generator, facts: SourceFacts, finding: dict[str, Any]) -> list[dict[str, Any]]:
    """Two global questions and the three forms of the local one."""
    global_kinds = [modality_question]
    if facts.body_part:
        global_kinds.append(body_part_question)
    if facts.view:
        global_kinds.append(view_question)
    second = global_kinds[1 + int(rng.integers(len(global_kinds) - 1))] if len(global_kinds) > 1 else modality_question
    forms = rng.permutation(len(FORMS))
    questions = [modality_question(rng, facts, FORMS[forms[0]]), second(rng, facts, FORMS[forms[1]])]
    for form in FORMS:
        if finding["kind"] == "shape":
            questions.append(shape_question(rng, finding["shape"], form))
        else:
            questions.append(count_question(rng, finding["count"], form))
    return questions
