import json

from hypothesis import given, settings
from hypothesis import strategies as st

from medvistagym.env.protocol import extract_answer, format_tool_call, parse_action


def test_answer_with_reasoning():
    action = parse_action("<think>The lesion is in the left lobe.</think>\n<answer> left lobe </answer>")
    assert action.kind == "answer"
    assert action.answer == "left lobe"
    assert action.think == "The lesion is in the left lobe."
    assert action.well_formed


def test_several_tool_calls_in_one_turn():
    text = (
        '<think>two regions</think><tool_call>{"name": "zoom_in", "arguments": {"bbox_2d": [1, 2, 30, 40]}}</tool_call>\n'
        '<tool_call>\n{"name": "rotate", "arguments": {"angle": 90}}\n</tool_call>'
    )
    action = parse_action(text)
    assert action.kind == "tool_calls"
    assert [c.name for c in action.tool_calls] == ["zoom_in", "rotate"]
    assert action.tool_calls[0].arguments == {"bbox_2d": [1, 2, 30, 40]}


def test_code_fences_and_string_arguments_are_tolerated():
    fenced = '<tool_call>\n```json\n{"name": "flip", "arguments": {"direction": "vertical"}}\n```\n</tool_call>'
    assert parse_action(fenced).tool_calls[0].arguments == {"direction": "vertical"}
    as_string = '<tool_call>{"name": "flip", "arguments": "{\\"direction\\": \\"horizontal\\"}"}</tool_call>'
    assert parse_action(as_string).tool_calls[0].arguments == {"direction": "horizontal"}


def test_tags_inside_think_do_not_count():
    text = "<think>I could write <answer>yes</answer> but first look.</think>" + format_tool_call("zoom_in", {"bbox_2d": [0, 0, 9, 9]})
    action = parse_action(text)
    assert action.kind == "tool_calls" and action.answer is None


def test_think_opened_by_the_chat_template():
    action = parse_action("reasoning without an opening tag</think><answer>no</answer>")
    assert action.think == "reasoning without an opening tag"
    assert action.answer == "no"


def test_answer_and_tool_call_together_is_invalid():
    action = parse_action('<tool_call>{"name": "zoom_in", "arguments": {}}</tool_call><answer>yes</answer>')
    assert action.kind == "invalid"
    assert not action.tool_calls and action.answer is None
    assert "not both" in action.errors[0]


def test_strict_about_answers():
    assert parse_action("The answer is yes.").kind == "invalid"
    assert parse_action("<answer>yes").kind == "invalid"
    assert "unterminated" in parse_action("<answer>yes").errors[0]
    assert parse_action("<answer>  </answer>").kind == "invalid"
    two = parse_action("<answer>yes</answer><answer>no</answer>")
    assert two.kind == "invalid" and "exactly one" in two.errors[0]
    assert extract_answer("<answer>A</answer>") == "A"
    assert extract_answer("A") is None


def test_malformed_calls_name_the_problem():
    assert "not valid JSON" in parse_action("<tool_call>{name: zoom}</tool_call>").errors[0]
    assert "missing \"name\"" in parse_action('<tool_call>{"arguments": {}}</tool_call>').errors[0]
    assert "JSON object" in parse_action('<tool_call>{"name": "zoom_in", "arguments": [1]}</tool_call>').errors[0]
    assert "JSON object" in parse_action("<tool_call>[1, 2]</tool_call>").errors[0]
    assert "unterminated" in parse_action('<tool_call>{"name": "zoom_in"').errors[0]


def test_good_call_beside_a_bad_one_still_runs():
    action = parse_action('<tool_call>{"name": "rotate", "arguments": {"angle": 90}}</tool_call><tool_call>oops</tool_call>')
    assert action.kind == "tool_calls" and len(action.tool_calls) == 1
    assert not action.well_formed and len(action.errors) == 1


def test_format_tool_call_round_trips():
    args = {"bbox_2d": [1.5, 2, 3, 4], "label": "nodule"}
    call = parse_action(format_tool_call("zoom_in", args)).tool_calls[0]
    assert (call.name, call.arguments) == ("zoom_in", json.loads(json.dumps(args)))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(list("<>/{}[]\":, abtnswrhikcl_0123456789") + ["<answer>", "</answer>", "<tool_call>", "</tool_call>", "<think>", "</think>", '{"name": "zoom_in", "arguments": {}}'])).map("".join))
def test_parse_action_never_raises(text):
    action = parse_action(text)
    assert action.kind in ("answer", "tool_calls", "invalid")
    if action.kind == "invalid":
        assert action.errors
