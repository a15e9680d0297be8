"""Packing several multi-image sequences into one row changes nothing a sequence sees."""

import pytest
import torch

from medvistagym.train.model import TrainModel
from medvistagym.train.packing import pack, plan_bins, to_sample


@pytest.fixture(scope="module")
def model():
    return TrainModel("qwen2.5-vl-tiny", trainable=False)


def test_plan_bins_respects_the_budget_and_keeps_every_index():
    lengths = [500, 300, 900, 200, 1200, 100]
    bins = plan_bins(lengths, 1000)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 1000 for b in bins if len(b) > 1)
    assert [4] in bins  # longer than the budget: alone


def test_packed_hidden_states_equal_each_sequence_alone(model, oracle_trajectories):
    samples = [to_sample(t, 0.5, model.vision) for t in oracle_trajectories]
    assert {len(s.grid_thw) for s in samples} == {1, 2}  # question image, plus a zoom for some
    with torch.no_grad():
        (packed,) = pack(samples, 100_000, model.rope_index)
        together = model.hidden(packed)
        offset = 0
        for s in samples:
            (alone,) = pack([s], 100_000, model.rope_index)
            torch.testing.assert_close(together[offset : offset + len(s)], model.hidden(alone), atol=1e-5, rtol=1e-5)
            offset += len(s)


def test_targets_are_shifted_within_each_sequence(model, oracle_trajectories):
    samples = [to_sample(t, float(i), model.vision) for i, t in enumerate(oracle_trajectories[:2])]
    (packed,) = pack(samples, 100_000, model.rope_index)
    n0 = len(samples[0])
    ids = packed.input_ids[0]
    assert torch.equal(packed.targets[: n0 - 1], ids[1:n0])
    assert packed.loss_mask[n0 - 1] == 0 and packed.targets[n0 - 1] == 0  # no prediction across sequences
    assert torch.equal(packed.loss_mask[: n0 - 1], samples[0].loss_mask[1:])
    assert packed.seq_ids.tolist() == [0] * n0 + [1] * len(samples[1])
    assert packed.advantages[n0:].eq(1.0).all()
    assert packed.position_ids.shape == (4, 1, packed.num_tokens)
    assert packed.position_ids[0, 0, n0] == 0  # text positions restart
    scored = packed.scored(torch.device("cpu"))
    assert len(scored) == int(packed.loss_mask.sum()) == sum(int(s.loss_mask.sum()) for s in samples)
    assert torch.equal(scored.targets, packed.targets[packed.loss_mask > 0])
