import pytest
import torch

from medvistagym.train.advantages import group_advantages, is_uniform


def test_group_scaling_matches_the_grpo_formula():
    rewards = [[1.0, 0.0, 0.5, 0.5], [2.0, 2.0]]
    adv = group_advantages(rewards, "group")
    r = torch.tensor(rewards[0])
    assert adv[0] == pytest.approx(((r - r.mean()) / (r.std() + 1e-6)).tolist())
    assert adv[1] == [0.0, 0.0]


def test_batch_scaling_uses_one_std_and_none_only_centres():
    rewards = [[1.0, 0.0], [0.3, 0.1, 0.2]]
    everything = torch.tensor([1.0, 0.0, 0.3, 0.1, 0.2])
    batch = group_advantages(rewards, "batch")
    assert batch[0] == pytest.approx([0.5 / (everything.std().item() + 1e-6), -0.5 / (everything.std().item() + 1e-6)])
    assert group_advantages(rewards, "none")[1] == pytest.approx([0.1, -0.1, 0.0])


def test_single_members_and_uniform_groups():
    assert group_advantages([[3.0]], "group") == [[0.0]]
    assert is_uniform([0.2, 0.2, 0.2]) and not is_uniform([0.2, 0.3]) and is_uniform([1.0])
    with pytest.raises(ValueError, match="scale"):
        group_advantages([[1.0]], "rank")
