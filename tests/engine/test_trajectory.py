"""The engine's bookkeeping pieces on their own: the sequence builder and derived sampling params."""

from __future__ import annotations

import pytest

from medvistagym.engine import EngineConfig
from medvistagym.engine.trajectory import SequenceBuilder, Trajectory
from medvistagym.policy import SamplingParams


def test_sequence_builder_writes_the_same_lists_as_append() -> None:
    runs = [([5, 6, 7], None, None), ([8, 9], [-0.1, -0.2], [0, 1]), ([10], None, None), ([11], [-0.3], [1])]
    eager, lazy = Trajectory("a", "g", 0, "t", "d", "q", "x"), Trajectory("b", "g", 1, "t", "d", "q", "x")
    builder = SequenceBuilder(lazy)
    for ids, logprobs, versions in runs:
        if logprobs is None:
            eager.append(ids)
        else:
            eager.append(ids, logprobs=logprobs, version=versions)
        builder.add(ids, logprobs=logprobs, versions=versions)
    assert len(lazy.token_ids) == 7 and lazy.token_ids == eager.token_ids and lazy.loss_mask == []  # not yet sealed
    builder.seal()
    assert (lazy.loss_mask, lazy.logprobs, lazy.versions) == (eager.loss_mask, eager.logprobs, eager.versions)
    assert lazy.loss_mask == [0, 0, 0, 1, 1, 0, 1] and lazy.oldest_version() == 0


def test_sequence_builder_refuses_misaligned_runs_and_a_started_trajectory() -> None:
    builder = SequenceBuilder(Trajectory("a", "g", 0, "t", "d", "q", "x"))
    with pytest.raises(ValueError, match="2 tokens but 1 log-probs"):
        builder.add([1, 2], logprobs=[-0.5], versions=[0, 0])
    started = Trajectory("b", "g", 0, "t", "d", "q", "x", token_ids=[1])
    with pytest.raises(ValueError, match="empty trajectory"):
        SequenceBuilder(started)


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
