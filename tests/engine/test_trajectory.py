"""The engine's bookkeeping pieces on their own: a trajectory's sampled runs and derived sampling params."""

from __future__ import annotations

import pytest

from medvistagym.engine import EngineConfig
from medvistagym.engine.trajectory import Trajectory, sampled_runs
from medvistagym.policy import SamplingParams


def _trajectory() -> Trajectory:
    t = Trajectory("a", "g", 0, "t", "d", "q", "x")
    t.append([5, 6, 7])
    t.append([8, 9], logprobs=[-0.1, -0.2], version=[0, 1])
    t.append([10])
    t.append([11], logprobs=[-0.3], version=1)
    return t


def test_sampled_runs_give_the_flat_per_token_views() -> None:
    t = _trajectory()
    assert t.token_ids == [5, 6, 7, 8, 9, 10, 11] and t.sampled == [(3, [-0.1, -0.2], [0, 1]), (6, [-0.3], [1])]
    assert t.loss_mask == [0, 0, 0, 1, 1, 0, 1]
    assert t.logprobs == [0.0, 0.0, 0.0, -0.1, -0.2, 0.0, -0.3]
    assert t.versions == [-1, -1, -1, 0, 1, -1, 1]
    assert t.model_tokens == 3 and t.oldest_version() == 0
    assert Trajectory("b", "g", 0, "t", "d", "q", "x", token_ids=[1]).oldest_version() is None
    t.check()


def test_flat_views_give_back_the_runs() -> None:
    t = _trajectory()
    assert sampled_runs(t.loss_mask, t.logprobs, t.versions) == t.sampled
    t.append([12], logprobs=[-0.4], version=2)  # adjacent to the last run: the two read back as one
    assert sampled_runs(t.loss_mask, t.logprobs, t.versions) == [(3, [-0.1, -0.2], [0, 1]), (6, [-0.3, -0.4], [1, 2])]
    with pytest.raises(ValueError, match="differ in length"):
        sampled_runs([0, 1], [0.0, -0.1], [-1])


def test_misaligned_runs_are_refused() -> None:
    t = _trajectory()
    with pytest.raises(ValueError, match="2 tokens but 1 log-probs and 2 versions"):
        t.append([1, 2], logprobs=[-0.5], version=[0, 0])
    assert len(t.token_ids) == 7  # nothing appended
    t.sampled[0][2].pop()
    with pytest.raises(ValueError, match="episode a: .*differ in length"):
        t.check()
    t = _trajectory()
    t.sampled.append((6, [-0.5], [0]))
    with pytest.raises(ValueError, match="overlap"):
        t.check()
    t = _trajectory()
    t.sampled.append((7, [-0.5], [0]))
    with pytest.raises(ValueError, match="past the 7 tokens"):
        t.check()


def test_per_turn_sampling_params_keep_the_config_and_check_the_limit() -> None:
    config = EngineConfig(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=64)
    params = config.sampling(32, seed=5)
    expected = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=32, seed=5,
                              stop=params.stop)
    assert params == expected and config.sampling(64, seed=6).seed == 6 and params.seed == 5
    with pytest.raises(ValueError, match="max_new_tokens"):
        config.sampling(0, seed=1)
    with pytest.raises(ValueError, match="top_p"):
        EngineConfig(top_p=0.0)  # checked when the config is made, not at the first turn
