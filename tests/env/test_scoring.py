"""Each benchmark's own metric, checked against how the official evaluation code behaves."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medvistagym.env.reward import answer_correctness
from medvistagym.env.scoring import (
    llava_normalize,
    mmmu_parse_choice,
    mmmu_parse_open,
    most_similar_index,
    score,
    scored_text,
)
from medvistagym.env.task import AnswerType, ImageRef, Task

IMAGES = (ImageRef(path="a.png"),)


def task(dataset: str, answer: str, kind: AnswerType, choices: tuple[str, ...] = (), **metadata) -> Task:
    return Task("t", dataset, "test", IMAGES, "question?", answer, kind, choices=choices, metadata=metadata)


def protocol(answer: str) -> str:
    return f"<think>looking at the image</think><answer>{answer}</answer>"


# ---------------------------------------------------------------- the scored text


def test_scored_text_is_the_answer_block_else_the_raw_response():
    assert scored_text(protocol("left lung")) == "left lung"
    assert scored_text("The left lung.") == "The left lung."
    assert scored_text("<answer>a</answer><answer>b</answer>") == "<answer>a</answer><answer>b</answer>"


# ---------------------------------------------------------------- LLaVA-Med
# microsoft/LLaVA-Med llava/eval/eval_metrics/glossary.py normalize_word


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("the left lung.", "left lung"),  # articles and periods go
        ("two nodules", "2 nodules"),  # manual_map; no plural folding
        ("none", "0"),
        ("x-ray", "x ray"),  # unspaced punctuation becomes a space...
        ("left - lung", "left lung"),  # ...spaced punctuation is deleted
        ("1,000 cells (approx)", "1000 cells approx"),  # a digit comma deletes every mark
        ("3.5 cm.", "3.5 cm"),  # a period before a digit stays
        ("dont", "don't"),  # contractions table
        ("yes:", "yes:"),  # ':' is not in its punctuation list
        ("a" + "." * 40 + "b", "a" + "." * 8 + "b"),  # re.UNICODE passed as count: 32 removals
    ],
)
def test_llava_normalize_word(raw, normalised):
    assert llava_normalize(raw) == normalised


# llava/eval/run_eval.py evaluate(), CLOSED branch: "yes"/"no" and the gold as substrings.
@pytest.mark.parametrize("dataset", ["slake", "vqa-rad", "pathvqa"])
@pytest.mark.parametrize(
    ("gold", "response", "expected"),
    [
        ("yes", "Yes.", 1.0),
        ("yes", "Yes, there is an effusion", 1.0),
        ("no", "No", 1.0),
        ("yes", "No", 0.0),  # official: not appended; one item scores 0
        ("no", "Maybe", 0.0),
        ("yes", "yes or no", 1.0),  # substring rule: both polarities present
        ("no", "a nodule is present", 1.0),  # 'no' in 'nodule'
        ("yes", "both eyes", 1.0),  # 'yes' in 'eyes'
        ("yes", protocol("Yes"), 1.0),
    ],
)
def test_llava_closed(dataset, gold, response, expected):
    assert score(task(dataset, gold, AnswerType.CLOSED), response) == expected


# llava/eval/eval_metrics/evaluate_metrics.py calculate_f1score -> recall (run_eval.py's "recall").
@pytest.mark.parametrize(
    ("gold", "response", "expected"),
    [
        ("left lung", "The left lung.", 1.0),
        ("left lung", "Left lung, with a nodule!", 1.0),  # recall ignores extra words
        ("left lung", "left", 0.5),
        ("left lung", "left left", 2 / 3),  # true positives count prediction repeats
        ("left lung", "lungs", 0.0),  # no plural folding
        ("two", "2 lesions", 1.0),
        ("ct", "infarct", 0.0),  # token-level
        ("left lung", "", 0.0),
        ("left lung", protocol("left lung"), 1.0),
    ],
)
def test_llava_open_recall(gold, response, expected):
    assert score(task("slake", gold, AnswerType.OPEN), response) == pytest.approx(expected)


# ---------------------------------------------------------------- PMC-VQA
# xiaoman-zhang/PMC-VQA src/MedVInT_TD/test.py find_most_similar_index (difflib ratio);
# src/MedVInT_TE/test.py applies the same matcher to the letters.

PMC_CHOICES = ("Axial CT", "Sagittal MRI", "Coronal CT", "Ultrasound")


def test_most_similar_index_first_on_ties_none_without_similarity():
    assert most_similar_index(["A", "B", "C"], "B") == 1
    assert most_similar_index(["ab", "ab"], "ab") == 0
    assert most_similar_index(["A", "B"], "xyz") is None


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("B", 1.0),
        ("(B)", 1.0),
        ("b", 1.0),
        ("B: Sagittal MRI", 1.0),
        ("B:Sagittal MRI", 1.0),
        ("B. Sagittal MRI", 1.0),
        ("Sagittal MRI", 1.0),
        ("sagittal mr image", 1.0),  # option text by similarity
        ("The answer is B.", 1.0),
        ("A: Axial CT", 0.0),
        ("C", 0.0),
        ("", 0.0),
        (protocol("B: Sagittal MRI"), 1.0),
    ],
)
def test_pmc_vqa_letter_accuracy(response, expected):
    assert score(task("pmc-vqa", "B", AnswerType.MULTIPLE_CHOICE, PMC_CHOICES), response) == expected


# ---------------------------------------------------------------- MMMU
# MMMU-Benchmark/MMMU eval/eval_utils.py parse_multi_choice_response + eval_multi_choice

MMMU_CHOICES = ("Mitochondria", "Nucleus", "Golgi apparatus", "Ribosome")
INDEX2ANS = dict(zip("ABCD", MMMU_CHOICES))


@pytest.mark.parametrize(
    ("response", "parsed"),
    [
        ("(C)", "C"),
        (" C ", "C"),
        ("C", "C"),
        ("C.", "C"),  # trailing punctuation is stripped first
        ("Answer: C", "C"),
        ("(B) is better than C", "B"),  # a bracketed letter beats a bare one
        ("(A) first, but finally (C)", "C"),  # several: the latest last occurrence
        ("A or C", "C"),
        ("A, C", "C"),  # " A," is not " A ": only C is a candidate
        ("I think the structure shown is the Golgi apparatus", "C"),  # content, > 5 words
        ("Golgi apparatus", None),  # content only counts after 5 words; official: random
        ("The organelle here is the nucleus, not the ribosome", "D"),  # latest content
        ("nothing useful", None),
    ],
)
def test_mmmu_parse_multi_choice(response, parsed):
    assert mmmu_parse_choice(response, "ABCD", INDEX2ANS) == parsed


def test_mmmu_multiple_choice_score_is_deterministic_without_a_parse():
    mmmu = task("mmmu-med", "C", AnswerType.MULTIPLE_CHOICE, MMMU_CHOICES)
    assert score(mmmu, "(C)") == 1.0
    assert score(mmmu, protocol("C")) == 1.0
    assert score(mmmu, "A or C") == 1.0  # official parse, lenient by design
    assert {score(mmmu, "Golgi apparatus") for _ in range(20)} == {0.0}


# eval_utils.py parse_open_response (get_key_subresponses, extract_numbers, normalize_str)
def test_mmmu_parse_open():
    assert mmmu_parse_open("The answer is 3.50") == [3.5]
    assert sorted(map(str, mmmu_parse_open("so it is 7/2"))) == ["2.0", "7.0", "7/2"]
    # shortest tail after an indicator: "is " leaves "7"
    assert mmmu_parse_open("The result is 5 so the answer is 7") == [7.0]
    # the comma pattern finds 1,234 and the simple pattern also finds its tail 234
    assert mmmu_parse_open("1,234 cells") == ["1,234 cells", 1234.0, 234.0]
    assert mmmu_parse_open("Mitosis") == ["mitosis"]


# eval_utils.py eval_open: strings by containment, numbers by equality
@pytest.mark.parametrize(
    ("gold", "response", "expected"),
    [
        ("3.5", "The answer is 3.50", 1.0),
        ("3.5", "The answer is 3.49", 0.0),
        ("['3.5', '7/2']", "so it is 7/2", 1.0),  # stringified list of answers
        ("mitosis", "The process is mitosis.", 1.0),
        ("ct", "It is an infarct", 1.0),  # substring containment, as official
        ("mitosis", "meiosis", 0.0),
    ],
)
def test_mmmu_open(gold, response, expected):
    mmmu = task("mmmu-med", gold, AnswerType.OPEN, raw_answer=gold)
    assert score(mmmu, response) == expected


# ---------------------------------------------------------------- MicroVQA
# jmhb0/microvqa eval/eval.py REGEX_PATTERN r"answer is \*?\*?\(?([0-9])\)?\*?\*?" with re.search


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("Reasoning... The answer is (C).", 1.0),
        ("the answer is C", 1.0),
        ("The answer is **(C)**", 1.0),
        ("The answer is (3)", 1.0),  # official 1-based option numbers
        ("answer: C", 0.0),  # not the required phrase
        ("The Answer is (C)", 0.0),  # case-sensitive, as official
        ("The answer is (A). On reflection the answer is (C).", 0.0),  # first match decides
        ("The answer is Apoptosis, so the answer is C", 1.0),  # a word is not a letter
        ("The answer is (9)", 0.0),  # no ninth option
        (protocol("C"), 1.0),
        (protocol("(C)"), 1.0),
        (protocol("c."), 1.0),
        (protocol("answer: C"), 0.0),
        (protocol("The answer is (C)"), 1.0),
    ],
)
def test_microvqa(response, expected):
    microvqa = task("microvqa", "C", AnswerType.MULTIPLE_CHOICE, MMMU_CHOICES)
    assert score(microvqa, response) == expected


# ---------------------------------------------------------------- strict default rule


@pytest.mark.parametrize(
    ("kind", "gold", "choices", "response"),
    [
        (AnswerType.CLOSED, "no", (), "No, there is not"),
        (AnswerType.CLOSED, "no", (), "nodule"),
        (AnswerType.CLOSED, "yes", (), "yes or no"),
        (AnswerType.OPEN, "left lung", (), "lung left"),
        (AnswerType.OPEN, "left lung", (), "the left side of the lung"),
        (AnswerType.MULTIPLE_CHOICE, "B", ("x", "y", "z"), "A or B"),
        (AnswerType.MULTIPLE_CHOICE, "B", ("x", "y", "z"), "(B)"),
    ],
)
def test_default_rule_is_the_strict_rl_rule(kind, gold, choices, response):
    mini = task("medvista-mini", gold, kind, choices)
    assert score(mini, protocol(response)) == answer_correctness(mini, response)
    assert score(task("some-new-set", gold, kind, choices), response) == answer_correctness(mini, response)


# ---------------------------------------------------------------- range

ALL = [
    task("slake", "yes", AnswerType.CLOSED),
    task("vqa-rad", "left lung", AnswerType.OPEN),
    task("pmc-vqa", "B", AnswerType.MULTIPLE_CHOICE, PMC_CHOICES),
    task("mmmu-med", "C", AnswerType.MULTIPLE_CHOICE, MMMU_CHOICES),
    task("mmmu-med", "3.5", AnswerType.OPEN, raw_answer="['3.5', '7/2']"),
    task("microvqa", "C", AnswerType.MULTIPLE_CHOICE, MMMU_CHOICES),
    task("medvista-mini", "left lung", AnswerType.OPEN),
]


@settings(max_examples=150, deadline=None)
@given(item=st.sampled_from(ALL), text=st.text(max_size=80), wrap=st.booleans())
def test_score_is_in_unit_interval(item, text, wrap):
    assert 0.0 <= score(item, protocol(text) if wrap else text) <= 1.0
