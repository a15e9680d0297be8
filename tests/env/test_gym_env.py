import json
from dataclasses import replace

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medvistagym.env import EnvConfig, MedVistaEnv
from medvistagym.env.experts import OracleExpert
from medvistagym.env.protocol import format_tool_call


@pytest.fixture()
def env(tasks, store):
    return MedVistaEnv(tasks, config=EnvConfig(max_turns=3), store=store, render_mode="ansi")


def zoom(box, **extra):
    return "<think>look</think>" + format_tool_call("zoom_in", {"bbox_2d": box, **extra})


def test_passes_the_gymnasium_checker(tasks, store):
    env = gymnasium.make("MedVista-v0", tasks=tasks, config=EnvConfig(max_turns=3), store=store, render_mode="ansi")
    check_env(env.unwrapped)  # render_mode="ansi" is checked too
    obs, info = env.reset(seed=1)
    assert env.step("<answer>yes</answer>")[2]


def test_reset_shows_the_question_and_images(env):
    obs, info = env.reset(seed=0, options={"task_id": "two-images"})
    assert env.observation_space.contains(obs)
    assert obs["text"].count("<image>") == 2 and "Compare <image 1>" in obs["text"]
    assert "Image 0 = <image 1>" in obs["text"]
    assert [a.shape[2] for a in obs["images"]] == [3, 3]
    assert info["messages"][0]["role"] == "system" and "<tools>" in info["messages"][0]["content"]
    w, h = info["image_sizes"][0]
    assert obs["images"][0].shape[:2] == (h, w) and w * h <= EnvConfig().image_max_pixels


def test_reset_is_deterministic_under_a_seed(env):
    first = env.reset(seed=7)[1]["task_id"]
    assert all(env.reset(seed=7)[1]["task_id"] == first for _ in range(3))
    assert len({env.reset(seed=s)[1]["task_id"] for s in range(20)}) > 1


def test_zoom_then_answer(env):
    obs, info = env.reset(options={"task_id": "ct-closed"})
    obs, reward, terminated, truncated, info = env.step(zoom([60, 60, 140, 140], label="lesion"))
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert obs["text"].startswith("<tool_response>") and "Image 1: zoom of image 0" in obs["text"]
    assert len(obs["images"]) == 1 and info["messages"][-1]["role"] == "tool"
    obs, reward, terminated, truncated, info = env.step("<think>seen</think><answer>yes</answer>")
    assert terminated and not truncated
    assert info["status"] == "ok" and info["score"] == 1.0
    assert reward == pytest.approx(info["reward_parts"]["total"]) and reward > 1.0
    assert "[assistant]" in env.render()


def test_oracle_zoom_pays_the_tool_reward(env):
    env.reset(options={"task_id": "ct-closed"})
    oracle = OracleExpert()
    env.step(oracle.act(env.episode))
    *_, info = env.step(oracle.act(env.episode))
    assert info["reward_parts"]["tool"] == pytest.approx(1.0, abs=0.05)


def test_bad_tool_arguments_come_back_as_errors(env):
    env.reset(options={"task_id": "ct-closed"})
    obs, reward, terminated, truncated, info = env.step(zoom([500, 500, 900, 900]))
    assert "error: zoom_in: box" in obs["text"] and "outside image 0" in obs["text"]
    assert obs["images"] == () and not terminated
    assert info["errors"]


def test_max_turns_truncates(env):
    env.reset(options={"task_id": "ct-open"})
    for _ in range(2):
        assert not env.step("no idea")[3]
    obs, reward, terminated, truncated, info = env.step("still no idea")
    assert truncated and not terminated and info["status"] == "truncated"
    assert reward <= 0.0
    obs, reward, terminated, truncated, info = env.step("<answer>brain</answer>")  # after the end: no crash
    assert truncated and reward == 0.0 and "over" in obs["text"]


def test_per_turn_and_image_limits(tasks, store):
    env = MedVistaEnv(tasks, config=EnvConfig(max_calls_per_turn=2, max_images=3), store=store)
    env.reset(options={"task_id": "ct-open"})
    calls = "".join(format_tool_call("zoom_in", {"bbox_2d": [0, 0, 50, 50]}) for _ in range(4))
    obs, *_ , info = env.step(calls)
    assert len(obs["images"]) == 2
    assert obs["text"].count("at most 2 tool calls per turn") == 2
    obs, *_ = env.step(calls)
    assert len(obs["images"]) == 0 and "the most is 3" in obs["text"]


def test_step_before_reset_is_an_api_error(tasks, store):
    with pytest.raises(gymnasium.error.ResetNeeded):
        MedVistaEnv(tasks, store=store).step("<answer>yes</answer>")


def test_corrupt_task_image_raises_at_reset(tmp_path, tasks, store):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    task = replace(tasks[1], id="broken", images=(type(tasks[1].images[0])(path=str(bad)),))
    with pytest.raises(ValueError, match="broken.png"):
        MedVistaEnv([task], store=store).reset()


_TOKENS = [
    "<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>", "{", "}", "[", "]", '"', ":", ",",
    '"name"', '"arguments"', '"zoom_in"', '"zoom_in_multi"', '"rotate"', '"flip"', '"adjust_window"',
    '"enhance_contrast"', '"bbox_2d"', '"bboxes"', '"image_index"', '"angle"', '"direction"', '"center"', '"width"',
    '"method"', '"label"', "-1", "0", "3", "90", "1e308", "NaN", "true", "null", "yes", "B", "\n", " ", "```",
]
_CALL = st.fixed_dictionaries({
    "name": st.sampled_from(["zoom_in", "zoom_in_multi", "rotate", "flip", "adjust_window", "enhance_contrast", "x"]),
    "arguments": st.dictionaries(
        st.sampled_from(["bbox_2d", "bboxes", "image_index", "angle", "direction", "center", "width", "method", "label"]),
        st.recursive(
            st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=5),
            lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(["bbox_2d", "label"]), inner, max_size=2),
            max_leaves=12,
        ),
        max_size=4,
    ),
})
_ACTIONS = (
    st.lists(st.sampled_from(_TOKENS) | st.text(max_size=4), max_size=40).map("".join)
    | st.lists(_CALL, min_size=1, max_size=5).map(
        lambda calls: "".join(f"<tool_call>{json.dumps(c, allow_nan=True)}</tool_call>" for c in calls))
    | st.text(max_size=200)
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(actions=st.lists(_ACTIONS, min_size=1, max_size=4), task_index=st.integers(0, 3))
def test_no_action_makes_step_raise(env, actions, task_index):
    obs, _ = env.reset(options={"task_index": task_index})
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        assert env.observation_space.contains(obs)
        assert np.isfinite(reward)
        if terminated or truncated:
            break
