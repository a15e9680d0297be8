import pytest

from medvistagym.env import EnvConfig, Episode
from medvistagym.env.protocol import format_tool_call


def _zoom(box, **extra):
    return format_tool_call("zoom_in", {"bbox_2d": box, **extra})


@pytest.fixture()
def episode(tasks, store):
    ep = Episode(tasks[0], EnvConfig(), store)  # the CT task with an annotated region
    ep.start()
    return ep


def test_messages_follow_the_chat_form(episode):
    roles = [m["role"] for m in episode.messages]
    assert roles == ["system", "user"]
    assert {"type": "image", "index": 0} in episode.messages[1]["content"]
    obs = episode.act(_zoom([10, 10, 100, 100]))
    assert [m["role"] for m in episode.messages] == ["system", "user", "assistant", "tool"]
    assert {"type": "image", "index": 1} in episode.messages[-1]["content"]
    assert obs.first_image == 1 and len(obs.views) == 1


def test_zoom_boxes_are_recorded_in_source_pixels_even_through_a_zoom(episode):
    w, h = episode.views[0].size
    episode.act(_zoom([0, 0, w / 2, h / 2]))
    episode.act(_zoom([0, 0, 56, 56], image_index=1))
    (first,), (second,) = (use.boxes for use in episode.record.tool_uses)
    image = episode.views[0].image
    assert first == (0, pytest.approx((0, 0, image.width / 2, image.height / 2)))
    zoom = episode.views[1]
    assert second[0] == 0 and second[1] == pytest.approx(zoom.to_source((0, 0, 56, 56)))


def test_several_calls_in_one_turn_get_one_response_each(episode):
    text = _zoom([0, 0, 50, 50]) + format_tool_call("rotate", {"angle": 90}) + format_tool_call("flip", {"direction": "up"})
    obs = episode.act(text)
    assert [m["role"] for m in episode.messages[-3:]] == ["tool"] * 3
    assert obs.text.count("<tool_response>") == 3 and "direction must be" in obs.text
    assert len(obs.views) == 2 and [u.ok for u in episode.record.tool_uses] == [True, True, False]


def test_an_answer_beside_a_broken_call_is_not_accepted(episode):
    obs = episode.act("<answer>yes</answer><tool_call>{oops")
    assert not episode.done and "unterminated" in obs.text


def test_reward_parts_for_a_good_and_a_spamming_episode(tasks, store):
    good = Episode(tasks[0], EnvConfig(), store)
    good.start()
    region = good.views[0].from_source(tasks[0].regions[0].box)
    good.act(_zoom([round(v) for v in region]))
    good.act("<think>ok</think><answer>yes</answer>")
    assert good.status == "ok" and good.reward.correct == 1.0 and good.reward.tool > 0.9

    spam = Episode(tasks[0], EnvConfig(max_turns=3), store)
    spam.start()
    for _ in range(2):
        spam.act(_zoom([0, 0, 50, 50]) * 4)
    spam.act("<answer>yes</answer>")
    assert spam.reward.tool == 0.0 and spam.reward.penalty > 0
    assert spam.reward.total < good.reward.total
