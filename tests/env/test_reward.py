"""The RL reward: strict correctness, format, grounded tool use, and its resistance to gaming."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medvistagym.config import load_config

from medvistagym.env.reward import (
    EpisodeSummary,
    RewardConfig,
    ToolUse,
    answer_correctness,
    compute_reward,
    normalize_tokens,
    zoom_quality,
)
from medvistagym.env.task import AnswerType, ImageRef, Region, Task

IMAGES = (ImageRef(path="a.png"), ImageRef(path="b.png"))
LESION = Region(box=(100.0, 100.0, 150.0, 150.0), image_index=0, label="nodule")
TIGHT = (0, (95.0, 95.0, 155.0, 155.0))
WHOLE = (0, (0.0, 0.0, 512.0, 512.0))


def closed(answer: str = "no", **kw) -> Task:
    return Task("c", "medvista-mini", "test", IMAGES, "Is there an effusion?", answer, AnswerType.CLOSED, **kw)


def open_task(answer: str = "left lung", **kw) -> Task:
    return Task("o", "medvista-mini", "test", IMAGES, "Where is the lesion?", answer, AnswerType.OPEN, **kw)


CHOICES = ("Axial CT", "Hepatitis B", "Pneumonia", "Aspiration pneumonia")


def choice(answer: str = "B", choices: tuple[str, ...] = CHOICES) -> Task:
    return Task("m", "medvista-mini", "test", IMAGES, "Which?", answer, AnswerType.MULTIPLE_CHOICE, choices=choices)


def episode(answer: str | None, uses: tuple[ToolUse, ...] = (), *, well_formed: bool = True, truncated: bool = False):
    turns = (True,) * len(uses) + (well_formed,)
    return EpisodeSummary(answer=answer, turns_well_formed=turns, tool_uses=uses, truncated=truncated)


def zoom(*boxes, ok: bool = True) -> ToolUse:
    return ToolUse(name="zoom", ok=ok, boxes=tuple(boxes))


def reward(task: Task, answer: str | None, uses: tuple[ToolUse, ...] = (), **kw) -> float:
    return compute_reward(task, episode(answer, uses), **kw).total


# ---------------------------------------------------------------- normalisation


def test_normalize_tokens_drops_punctuation_articles_and_folds_numbers_and_plurals():
    assert normalize_tokens("The two Nodules, in an MRI.") == ["2", "nodule", "in", "mri"]
    assert normalize_tokens("arteries; masses; ribs; pancreas") == ["artery", "mass", "rib", "pancrea"]
    assert normalize_tokens("2.5 cm") == ["2.5", "cm"]


# ---------------------------------------------------------------- closed questions


@pytest.mark.parametrize("answer", ["no", "No.", "NO", "No, there is not", "no effusion is seen"])
def test_closed_plain_no_is_correct(answer):
    assert answer_correctness(closed("no"), answer) == 1.0


@pytest.mark.parametrize("answer", ["Yes.", "yes", "Yes, a small effusion"])
def test_closed_plain_yes_is_correct(answer):
    assert answer_correctness(closed("yes"), answer) == 1.0
    assert answer_correctness(closed("no"), answer) == 0.0


HEDGES = ["yes or no", "yes/no", "Yes/No", "maybe yes", "not sure, yes", "not sure, no", "Yes, no",
          "No... well, yes", "yes, it is not", "probably no"]  # fmt: skip


@pytest.mark.parametrize("gold", ["yes", "no"])
@pytest.mark.parametrize("answer", HEDGES)
def test_closed_hedges_earn_nothing(gold, answer):
    task = closed(gold)
    assert answer_correctness(task, answer) == 0.0
    assert compute_reward(task, episode(answer)).correct == 0.0
    assert reward(task, answer) < reward(task, gold)


@pytest.mark.parametrize(("gold", "trap"), [("no", "nodule"), ("no", "normal"), ("yes", "eyes"), ("no", "none")])
def test_closed_polarity_is_token_level_not_substring(gold, trap):
    task = closed(gold)
    assert answer_correctness(task, trap) == 0.0
    assert compute_reward(task, episode(trap)).correct == 0.0


def test_closed_non_polar_gold_needs_exact_match():
    task = closed("left")
    assert answer_correctness(task, "Left.") == 1.0
    assert answer_correctness(task, "left or right") == 0.0


def test_closed_aliases_accepted():
    task = closed("yes", metadata={"answer_aliases": ["present"]})
    assert answer_correctness(task, "Present") == 1.0


# ---------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    "answer",
    ["B", "b", "(B)", "B.", "B)", "B) Hepatitis B", "B: Hepatitis B", "Option B", "option b", "Option (B)",
     "the answer is B", "The answer is (B).", "Hepatitis B", "hepatitis b", "B. The answer is B"],
)  # fmt: skip
def test_choice_one_option_by_letter_or_text(answer):
    assert answer_correctness(choice("B"), answer) == 1.0


@pytest.mark.parametrize(
    "answer",
    ["A or B", "A/B", "B/A", "A, B, C, D", "A B C D", "(A) (B)", "B or C", "B and D",
     "A) Axial CT B) Hepatitis B C) Pneumonia D) Aspiration pneumonia",
     "Axial CT, Hepatitis B, Pneumonia, Aspiration pneumonia",
     "It could be A, but B or C are possible; I pick B",
     "B) Pneumonia", "Hepatitis B or pneumonia"],
)  # fmt: skip
def test_choice_naming_several_options_earns_nothing(answer):
    task = choice("B")
    assert answer_correctness(task, answer) == 0.0
    assert compute_reward(task, episode(answer)).correct == 0.0
    assert reward(task, answer) < reward(task, "B")


def test_choice_longest_option_text_wins_over_its_substring():
    assert answer_correctness(choice("D"), "Aspiration pneumonia") == 1.0
    assert answer_correctness(choice("C"), "Pneumonia") == 1.0
    assert answer_correctness(choice("C"), "Aspiration pneumonia") == 0.0


def test_choice_article_a_is_not_letter_a():
    task = choice("C", ("Mass in the liver", "Cyst", "A mass in the spleen", "Normal"))
    assert answer_correctness(task, "A mass in the spleen") == 1.0
    assert answer_correctness(task, "C) A mass in the spleen") == 1.0


def test_choice_letter_outside_options_or_unrelated_text():
    assert answer_correctness(choice("B"), "E") == 0.0
    assert answer_correctness(choice("B"), "I am not sure") == 0.0
    assert answer_correctness(choice("B"), "") == 0.0


# ---------------------------------------------------------------- open questions


@pytest.mark.parametrize("answer", ["left lung", "Left lung.", "the left lung", "LEFT LUNG!", "lung, left"])
def test_open_exact_after_normalisation(answer):
    assert answer_correctness(open_task("left lung"), answer) == 1.0


def test_open_token_match_not_substring():
    assert answer_correctness(open_task("ct"), "infarct") == 0.0
    assert answer_correctness(open_task("mri"), "MRI.") == 1.0
    assert answer_correctness(open_task("2"), "two") == 1.0
    assert answer_correctness(open_task("nodule"), "nodules") == 1.0


def test_open_partial_answer_is_token_f1():
    assert answer_correctness(open_task("left lung"), "left") == pytest.approx(2 / 3)
    assert answer_correctness(open_task("left lung"), "right lung") == pytest.approx(0.5)


def test_open_padding_cannot_pay():
    task = open_task("left lung")
    padded = "left lung " + " ".join(f"word{i}" for i in range(30))
    assert answer_correctness(task, padded) < 0.15
    assert reward(task, padded) < reward(task, "left lung") - 0.8


def test_open_aliases_take_the_best_gold():
    task = open_task("computed tomography", metadata={"answer_aliases": ["CT"]})
    assert answer_correctness(task, "CT") == 1.0
    assert answer_correctness(task, "tomography") == pytest.approx(2 / 3)


def test_missing_answer_is_zero():
    for task in (closed(), open_task(), choice()):
        assert answer_correctness(task, None) == 0.0
        assert answer_correctness(task, "   ") == 0.0


# ---------------------------------------------------------------- format and truncation


def test_format_needs_an_answer_and_every_turn_well_formed():
    task = open_task()
    assert compute_reward(task, episode("left lung")).format == 1.0
    assert compute_reward(task, episode("left lung", well_formed=False)).format == 0.0
    assert compute_reward(task, episode(None)).format == 0.0
    bad_middle = EpisodeSummary("left lung", (True, False, True), ())
    assert compute_reward(task, bad_middle).format == 0.0


def test_truncated_episode_gets_no_correctness_or_format():
    parts = compute_reward(open_task(), episode("left lung", (zoom(TIGHT),), truncated=True))
    assert (parts.correct, parts.format, parts.tool, parts.total) == (0.0, 0.0, 0.0, 0.0)


def test_total_is_the_weighted_sum_minus_penalty():
    config = RewardConfig(correct_weight=2.0, format_weight=0.5, tool_weight=1.0, free_tool_calls=0)
    task = open_task(regions=(LESION,))
    parts = compute_reward(task, episode("left lung", (zoom(TIGHT),)), config)
    assert parts.total == pytest.approx(2.0 * parts.correct + 0.5 * parts.format + 1.0 * parts.tool - parts.penalty)
    assert parts.penalty == pytest.approx(0.05)


# ---------------------------------------------------------------- tool use


def test_zoom_quality_tight_vs_whole_image():
    assert zoom_quality(TIGHT[1], LESION, context_ratio=2.0) == 1.0
    assert zoom_quality(WHOLE[1], LESION, context_ratio=2.0) < 0.05
    assert zoom_quality((0.0, 0.0, 50.0, 50.0), LESION) == 0.0  # misses the region
    assert zoom_quality((150.0, 100.0, 100.0, 150.0), LESION) == 1.0  # corners given in any order


def test_good_zoom_on_correct_answer_pays():
    task = open_task(regions=(LESION,))
    parts = compute_reward(task, episode("left lung", (zoom(TIGHT),)))
    assert parts.tool == 1.0
    assert parts.total == pytest.approx(1.3)
    assert parts.total > reward(task, "left lung")


def test_whole_image_zoom_does_not_pay_like_a_tight_one():
    task = open_task(regions=(LESION,))
    whole = compute_reward(task, episode("left lung", (zoom(WHOLE),)))
    tight = compute_reward(task, episode("left lung", (zoom(TIGHT),)))
    assert whole.tool < 0.05
    assert tight.total - whole.total > 0.15


def test_zoom_on_another_image_does_not_pay():
    task = open_task(regions=(LESION,))
    assert compute_reward(task, episode("left lung", (zoom((1, TIGHT[1])),))).tool == 0.0


def test_spamming_zoom_calls_pays_less_than_one_good_zoom():
    task = open_task(regions=(LESION,))
    spam = compute_reward(task, episode("left lung", (zoom(TIGHT),) * 20))
    single = compute_reward(task, episode("left lung", (zoom(TIGHT),)))
    assert spam.tool == 0.0
    assert spam.penalty == pytest.approx(16 * 0.05)
    assert spam.total < single.total
    assert spam.total < reward(task, "left lung")


def test_failed_calls_count_towards_the_limit_and_penalty():
    task = open_task(regions=(LESION,))
    uses = (zoom(TIGHT),) + (zoom(ok=False),) * 5
    parts = compute_reward(task, episode("left lung", uses))
    assert parts.tool == 0.0
    assert parts.penalty == pytest.approx(2 * 0.05)
    assert compute_reward(task, episode("left lung", (zoom(ok=False),))).tool == 0.0


def test_penalty_is_capped():
    parts = compute_reward(open_task(), episode("x", (zoom(),) * 500))
    assert parts.penalty == RewardConfig().max_penalty
    assert parts.total >= -RewardConfig().max_penalty


def test_tool_pays_only_for_a_correct_answer_by_default():
    task = open_task(regions=(LESION,))
    assert compute_reward(task, episode("right kidney", (zoom(TIGHT),))).tool == 0.0
    assert compute_reward(task, episode("left", (zoom(TIGHT),))).tool == 0.0  # partial F1 is not correct
    lenient = RewardConfig(tool_requires_correct=False)
    assert compute_reward(task, episode("right kidney", (zoom(TIGHT),)), lenient).tool == 1.0


def test_tool_without_regions_is_configurable():
    task = open_task()
    assert compute_reward(task, episode("left lung", (zoom(TIGHT),))).tool == 0.0
    config = RewardConfig(reward_tool_without_region=0.5)
    assert compute_reward(task, episode("left lung", (zoom(TIGHT),)), config).tool == 0.5
    assert compute_reward(task, episode("left lung", (zoom(ok=False),)), config).tool == 0.0


def test_more_than_max_rewarded_calls_earn_no_tool_part():
    task = open_task(regions=(LESION,))
    config = RewardConfig(max_rewarded_tool_calls=2)
    assert compute_reward(task, episode("left lung", (zoom(TIGHT),) * 2), config).tool == 1.0
    assert compute_reward(task, episode("left lung", (zoom(TIGHT),) * 3), config).tool == 0.0


# ---------------------------------------------------------------- config


def test_config_from_yaml(tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text("format_weight: 0.3\ntool_call_penalty: 0.1\n")
    config = load_config(RewardConfig, path)
    assert (config.format_weight, config.tool_call_penalty, config.correct_weight) == (0.3, 0.1, 1.0)
    assert load_config(RewardConfig) == RewardConfig()
    with pytest.raises(ValueError, match="unknown key"):
        load_config(RewardConfig, None, ["tool_wieght=1.0"])
    with pytest.raises(ValueError, match="must be >= 0"):
        RewardConfig(tool_call_penalty=-0.1)


# ---------------------------------------------------------------- properties

TASKS = [closed("yes"), closed("no"), open_task("left lung"), open_task("2"), choice("B"), choice("D")]
boxes = st.tuples(
    st.integers(-1, 2),
    st.tuples(*[st.floats(-1e4, 1e4, allow_nan=False)] * 4),
)
tool_uses = st.builds(ToolUse, name=st.text(max_size=8), ok=st.booleans(), boxes=st.tuples(boxes) | st.just(()))


@settings(max_examples=150, deadline=None)
@given(task=st.sampled_from(TASKS), text=st.text(max_size=80))
def test_correctness_is_in_unit_interval(task, text):
    assert 0.0 <= answer_correctness(task, text) <= 1.0


@settings(max_examples=150, deadline=None)
@given(
    task=st.sampled_from(TASKS + [open_task(regions=(LESION,))]),
    text=st.none() | st.text(max_size=80),
    turns=st.lists(st.booleans(), max_size=4),
    uses=st.lists(tool_uses, max_size=8),
    truncated=st.booleans(),
)
def test_compute_reward_never_raises_and_stays_in_range(task, text, turns, uses, truncated):
    config = RewardConfig()
    parts = compute_reward(task, EpisodeSummary(text, tuple(turns), tuple(uses), truncated), config)
    top = config.correct_weight + config.format_weight + config.tool_weight
    assert -config.max_penalty <= parts.total <= top + 1e-9
    assert all(0.0 <= part <= 1.0 for part in (parts.correct, parts.format, parts.tool))
