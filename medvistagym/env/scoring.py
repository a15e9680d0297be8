"""Each benchmark's own metric for one item, so reported numbers compare with papers.

`score(task, response_text)` is in [0, 1]. The text scored is the content of the
`<answer>` block when the response follows our protocol, else the raw response
(official evaluations score raw model output). Rules, by `task.dataset`:

- slake, vqa-rad, pathvqa: LLaVA-Med (microsoft/LLaVA-Med `llava/eval/run_eval.py`,
  `llava/eval/eval_metrics/{glossary,evaluate_metrics,utils}.py`): closed questions by
  its yes/no hit rule, open questions by its token recall.
- pmc-vqa: option-letter accuracy, the letter read as in xiaoman-zhang/PMC-VQA.
- mmmu-med: MMMU (MMMU-Benchmark/MMMU `eval/utils/eval_utils.py`, earlier at
  `eval/eval_utils.py`) parsing and matching, without its random fallback.
- microvqa: jmhb0/microvqa `eval/eval.py` "The answer is (X)" regex.
- anything else (medvista-mini): the strict RL rule, `reward.answer_correctness`.

This is for reporting; the RL reward (`reward.py`) is stricter on purpose.
"""

from __future__ import annotations

import ast
import difflib
import re
from typing import Any, Callable

from .protocol import extract_answer
from .reward import answer_correctness
from .task import LETTERS, AnswerType, Task


_BARE_OPTION = re.compile(r"^\s*\(?\s*([A-Za-z])\s*\)?\s*\.?\s*$")  # "C", "(c)", "C."


def scored_text(response_text: Any) -> str:
    """The `<answer>` content of a protocol response, else the raw response."""
    if not isinstance(response_text, str):
        return ""
    answer = extract_answer(response_text)
    return answer if answer is not None else response_text


def score(task: Task, response_text: str) -> float:
    rule = _RULES.get(task.dataset, _strict)
    return min(1.0, max(0.0, float(rule(task, response_text))))


def _strict(task: Task, response_text: str) -> float:
    return answer_correctness(task, scored_text(response_text))


# ---------------------------------------------------------------- LLaVA-Med
# Source: microsoft/LLaVA-Med, llava/eval/eval_metrics/glossary.py `normalize_word`
# (the VQA-v2 answer normaliser with LLaVA-Med's changes).

_LLAVA_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
_LLAVA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# glossary.py's `period_strip` is "(?!<=\d)(\.)(?!\d)": its first group is a (no-op)
# lookahead, not a lookbehind, so every "." not followed by a digit goes. It is called
# as `sub("", s, re.UNICODE)`, which passes re.UNICODE (32) as the replacement count.
_LLAVA_PERIOD = re.compile(r"\.(?!\d)")
_LLAVA_PERIOD_LIMIT = 32
_LLAVA_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_LLAVA_ARTICLES = frozenset({"a", "an", "the"})


def _contraction_table() -> dict[str, str]:
    """glossary.py `contractions`: apostrophe-less spellings -> the contraction.

    Its keys are each contraction with its apostrophe dropped, or, for contractions
    with several apostrophes, with exactly one of them dropped. Entries that cannot
    fire are left out: capitalised keys ("Im") never see the lowercased text, and
    "let's"/"she's" map to themselves. Its reversed entry "somebody'd" -> "somebodyd"
    joins the same two spellings as our "somebodyd" -> "somebody'd", which is all the
    token comparison sees.
    """
    single = (
        "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's "
        "how'd how'll how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've "
        "o'clock oughtn't shan't should've shouldn't somebody'd somebody'll somebody's someone'd "
        "someone'll someone's something'd something'll that's there'd there're there's they'd they'll "
        "they're they've 'twas wasn't we've weren't what'll what're what's what've when's where'd "
        "where's where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all "
        "you'd you'll you're you've"
    ).split()
    multiple = (
        "couldn't've hadn't've he'd've it'd've mightn't've 'ow's'at she'd've shouldn't've "
        "somebody'd've someone'd've something'd've there'd've they'd've we'd've who'd've "
        "wouldn't've y'all'll y'all'd've you'd've"
    ).split()
    table = {word.replace("'", ""): word for word in single}
    for word in multiple:
        cuts = [i for i, ch in enumerate(word) if ch == "'"]
        table.update({word[:i] + word[i + 1 :]: word for i in cuts})
    return table


_LLAVA_CONTRACTIONS = _contraction_table()


def llava_normalize(text: str) -> str:
    """glossary.py `normalize_word`."""
    # The test for "spaced" punctuation looks at the input, not the text being edited.
    drop_all = _LLAVA_DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _LLAVA_PUNCT:
        spaced = drop_all or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if spaced else " ")
    out = _LLAVA_PERIOD.sub("", out, count=_LLAVA_PERIOD_LIMIT)
    words = [_LLAVA_NUMBERS.get(word, word) for word in out.lower().split()]
    words = [_LLAVA_CONTRACTIONS.get(word, word) for word in words if word not in _LLAVA_ARTICLES]
    return " ".join(words).replace(",", "")


def _llava_word_counts(text: str) -> dict[str, int]:
    """utils.py `split_sentence(s, 1)`: lowercase whitespace words with their counts."""
    counts: dict[str, int] = {}
    for word in text.lower().split():
        counts[word] = counts.get(word, 0) + 1
    return counts


def llava_recall(prediction: str, gold: str) -> float:
    """evaluate_metrics.py `calculate_f1score(...)[2]`, the open-question "recall".

    Its true positives add the word's count in the PREDICTION while false negatives add
    the count in the gold, so a repeated gold word raises recall ("left left" vs "left
    lung" gives 2/3). Both sides are normalised again inside, as there.
    """
    said = _llava_word_counts(llava_normalize(prediction))
    expected = _llava_word_counts(llava_normalize(gold))
    if not said or not expected:
        return 0.0
    hits = sum(n for word, n in said.items() if word in expected)
    missed = sum(n for word, n in expected.items() if word not in said)
    return hits / (hits + missed) if hits else 0.0


def llava_closed_hit(prediction: str, gold: str) -> float:
    """run_eval.py closed (yes/no) rule: the prediction contains "yes" or "no" and the
    gold, all as SUBSTRINGS of the normalised text ("no" is in "nodule").

    When yes/no appears but the gold does not, run_eval.py appends nothing, silently
    dropping the item from the accuracy's denominator; one item cannot be dropped, so
    we score it 0.
    """
    if "yes" in prediction or "no" in prediction:
        return float(gold in prediction)
    return 0.0


def _llava_med(task: Task, response_text: str) -> float:
    # run_eval.py lowercases and normalises both sides before either rule.
    prediction = llava_normalize(scored_text(response_text).lower())
    gold = llava_normalize(task.answer.lower())
    if task.answer_type is AnswerType.CLOSED:
        return llava_closed_hit(prediction, gold)
    if task.answer_type is AnswerType.OPEN:
        return llava_recall(prediction, gold)
    return _strict(task, response_text)


# ---------------------------------------------------------------- PMC-VQA
# Source: xiaoman-zhang/PMC-VQA src/MedVInT_TD/test.py `find_most_similar_index`
# (difflib ratio against the option strings "A:text" as released in the CSV) and
# src/MedVInT_TE/test.py (the same matcher against the letters).

_PMC_LEADING_LETTER = re.compile(r"^\s*\(?\s*([A-Z])\s*(?:[):.]|$)")  # "B: text", "(B) text"
_PMC_TRAILING_LETTER = re.compile(r"(?<![\w'-])\(?([A-Z])\)?\s*\.?\s*$")  # "The answer is B."


def _pmc_option_string(letter: str, text: str) -> str:
    """An option as the released CSV spells it: "B:text"."""
    text = text.strip()
    return text if re.match(rf"{letter}\s*:", text) else f"{letter}:{text}"


def most_similar_index(candidates: list[str], target: str) -> int | None:
    """test.py `find_most_similar_index`: highest difflib ratio, first on ties, None if all 0."""
    best, best_ratio = None, 0.0
    for i, candidate in enumerate(candidates):
        ratio = difflib.SequenceMatcher(None, candidate, target).ratio()
        if ratio > best_ratio:
            best, best_ratio = i, ratio
    return best


def pmc_vqa_letter(task: Task, text: str) -> str | None:
    """The option letter a response names, first rule that applies:

    1. a leading letter ("B", "(b)", "B:", "B: text", "B. text"): PMC-VQA writes answers
       as "B:text", and MedVInT_TE's letter matcher returns exactly this letter;
    2. the response is an option's text (case-insensitive);
    3. a trailing letter ("The answer is B."): MedVInT_TD reads the output's last
       character;
    4. the option string most similar to the whole response (MedVInT_TD's matcher).
    MedVInT_TD applies its matcher to the last character only, which fits its model
    (the answer is its final token) but not free text; rules 1-3 read the letter such
    output names, and rule 4 keeps TD's matching of option text.
    """
    text = text.strip()
    leading = _BARE_OPTION.match(text) or _PMC_LEADING_LETTER.match(text)
    if leading and leading.group(1).upper() in task.letters:
        return leading.group(1).upper()
    said = text.rstrip(".").strip().lower()
    for letter, choice in zip(task.letters, task.choices):
        if said == choice.strip().lower():
            return letter
    trailing = _PMC_TRAILING_LETTER.search(text)
    if trailing and trailing.group(1) in task.letters:
        return trailing.group(1)
    options = [_pmc_option_string(letter, choice) for letter, choice in zip(task.letters, task.choices)]
    index = most_similar_index(options, text)
    return None if index is None else task.letters[index]


def _pmc_vqa(task: Task, response_text: str) -> float:
    if task.answer_type is not AnswerType.MULTIPLE_CHOICE:
        return _strict(task, response_text)
    return float(pmc_vqa_letter(task, scored_text(response_text)) == task.answer)


# ---------------------------------------------------------------- MMMU
# Source: MMMU-Benchmark/MMMU eval/utils/eval_utils.py (read at its earlier path
# eval/eval_utils.py, commit bb91f23): parse_multi_choice_response, parse_open_response,
# eval_multi_choice, eval_open.


def mmmu_parse_choice(response: str, letters: str, index2ans: dict[str, str]) -> str | None:
    """`parse_multi_choice_response`, except that where nothing parses the official code
    returns `random.choice(all_choices)` and we return None (scored 0, deterministic)."""
    for mark in ",.!?;:'":  # stripped one after the other, as there
        response = response.strip(mark)
    response = f" {response} "  # spaces so " A " matches at the ends

    candidates = [c for c in letters if f"({c})" in response]
    bracketed = bool(candidates)
    if not candidates:
        candidates = [c for c in letters if f" {c} " in response]
    by_content = False
    if not candidates and len(response.split()) > 5:
        candidates = [c for c in letters if index2ans[c].lower() in response.lower()]
        by_content = bool(candidates)

    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]

    # Several: the one whose last occurrence starts latest; np.argmax keeps the first on ties.
    def last_start(c: str) -> int:
        if by_content:
            return response.lower().rfind(index2ans[c].lower())
        return response.rfind(f"({c})" if bracketed else f" {c} ")

    starts = [last_start(c) for c in candidates]
    return candidates[starts.index(max(starts))]


def _mmmu_is_number(text: str) -> bool:
    """`check_is_number`."""
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def mmmu_normalize(text: str) -> list[str | float]:
    """`normalize_str`: numbers to floats rounded to 2 places; strings lowercased, and a
    one-character string padded with a space on either side to avoid trivial matches."""
    text = text.strip()
    if _mmmu_is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


_MMMU_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_MMMU_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_MMMU_NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def mmmu_extract_numbers(text: str) -> list[str]:
    """`extract_numbers`: comma-grouped, then scientific, then simple numbers."""
    patterns = (_MMMU_NUMBER_WITH_COMMAS, _MMMU_NUMBER_SCIENTIFIC, _MMMU_NUMBER_SIMPLE)
    return [found for pattern in patterns for found in pattern.findall(text)]


_MMMU_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_MMMU_TRIVIAL = frozenset({":", ",", ".", "!", "?", ";", "'"})


def _mmmu_key_responses(response: str) -> list[str]:
    """`get_key_subresponses`: per line, the shortest tail after an indicator word."""
    response = response.strip().strip(".").lower()
    # The official split is r'\.\s(?=[A-Z])|\n' on the LOWERCASED text, so only the
    # newline alternative can ever match.
    lines = response.split("\n")
    keys = []
    for i, line in enumerate(lines):
        indicators = _MMMU_KEY_INDICATORS + (("=",) if i == len(lines) - 1 else ())
        shortest: str | None = None
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                # an empty tail counts as "none yet", as in the official `if not ...`
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest not in _MMMU_TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def mmmu_parse_open(response: str) -> list[str | float]:
    """`parse_open_response`: key sub-responses and the numbers in them, normalised."""
    keys = _mmmu_key_responses(response)
    found = keys + [number for key in keys for number in mmmu_extract_numbers(key)]
    normalised = [value for item in found for value in mmmu_normalize(item)]
    return list(dict.fromkeys(normalised))  # the official set(); order is irrelevant to eval_open


def mmmu_eval_open(gold: str | list[str], predictions: list[str | float]) -> bool:
    """`eval_open`: a string prediction must CONTAIN a normalised gold string; a number
    must equal a normalised gold number."""
    golds = gold if isinstance(gold, list) else [gold]
    answers = [value for item in golds for value in mmmu_normalize(item)]
    for prediction in predictions:
        if isinstance(prediction, str):
            if any(isinstance(answer, str) and answer in prediction for answer in answers):
                return True
        elif prediction in answers:
            return True
    return False


def _mmmu_gold(task: Task) -> str | list[str]:
    """The gold answer; MMMU stores several acceptable answers as a stringified list."""
    raw = task.metadata.get("raw_answer", task.answer)
    if isinstance(raw, (list, tuple)):
        return [str(item) for item in raw]
    raw = str(raw)
    if raw.strip().startswith("["):
        try:
            parsed = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            return raw
        if isinstance(parsed, (list, tuple)):
            return [str(item) for item in parsed]
    return raw


def _mmmu(task: Task, response_text: str) -> float:
    text = scored_text(response_text)
    if task.answer_type is AnswerType.MULTIPLE_CHOICE:
        index2ans = dict(zip(task.letters, task.choices))
        # `eval_multi_choice`: the parsed letter equals the gold letter
        return float(mmmu_parse_choice(text, task.letters, index2ans) == task.answer)
    return float(mmmu_eval_open(_mmmu_gold(task), mmmu_parse_open(text)))


# ---------------------------------------------------------------- MicroVQA
# Source: jmhb0/microvqa eval/eval.py `REGEX_PATTERN = r"answer is \*?\*?\(?([0-9])\)?\*?\*?"`
# read with `re.search`: case-sensitive "answer is", the FIRST match decides, options
# numbered from 1. Our prompts letter the options, so an uppercase letter is read too;
# unlike a digit it must end there, else "answer is Apoptosis" would read as A.

_MICROVQA_ANSWER = re.compile(r"answer is \*{0,2}\(?(?:([0-9])|([A-Z])(?![A-Za-z]))")


def microvqa_letter(task: Task, response_text: str) -> str | None:
    answer = extract_answer(response_text) if isinstance(response_text, str) else None
    if answer is not None:
        bare = _BARE_OPTION.match(answer)
        if bare:
            return bare.group(1).upper()
    match = _MICROVQA_ANSWER.search(scored_text(response_text))
    if match is None:
        return None
    digit, letter = match.groups()
    if digit is not None:
        number = int(digit)
        return LETTERS[number - 1] if 1 <= number <= len(task.choices) else None
    return letter


def _microvqa(task: Task, response_text: str) -> float:
    if task.answer_type is not AnswerType.MULTIPLE_CHOICE:
        return _strict(task, response_text)
    return float(microvqa_letter(task, response_text) == task.answer)


_RULES: dict[str, Callable[[Task, str], float]] = {
    "slake": _llava_med,
    "vqa-rad": _llava_med,
    "pathvqa": _llava_med,
    "pmc-vqa": _pmc_vqa,
    "mmmu-med": _mmmu,
    "microvqa": _microvqa,
}
