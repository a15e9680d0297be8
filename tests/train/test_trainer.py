"""GRPOTrainer on real trajectories of the tiny Qwen2.5-VL: updates, options, staleness,
behaviour cloning, and log-prob parity between the trainer and the policy that sampled."""

from dataclasses import replace

import pytest
import torch

from medvistagym.engine import EngineConfig, RolloutEngine, run
from medvistagym.policy import build_policy
from medvistagym.train.config import LossConfig, TrainConfig
from medvistagym.train.packing import pack, to_sample
from medvistagym.train.trainer import GRPOTrainer, StaleTokens, lr_factor

CONFIG = TrainConfig(steps=4, micro_batch_tokens=1500)  # several micro-batches per step


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.module.named_parameters()}


def _changed(before, trainer):
    return sum(not torch.equal(before[k], v) for k, v in trainer.model.module.named_parameters())


def test_a_step_updates_the_weights_with_finite_metrics(groups):
    trainer = GRPOTrainer(CONFIG)
    before = _weights(trainer)
    metrics = trainer.train_step(groups, version=0)
    assert _changed(before, trainer) > 0
    uniform = sum(g.kept[0].reward == g.kept[1].reward for g in groups)  # the random expert may guess right
    assert metrics["micro_batches"] > 1 and metrics["groups/trained"] == len(groups) - uniform > 0
    assert metrics["groups/uniform"] == uniform
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert trainer.step == 1 and trainer.updates == 1
    # The oracle (reward > 1) and the random expert: advantages of opposite sign.
    assert metrics["reward/mean"] > 0


def test_uniform_groups_are_skipped(groups):
    same = [replace(g, kept=[g.kept[0], g.kept[0]]) for g in groups]
    trainer = GRPOTrainer(CONFIG)
    before = _weights(trainer)
    metrics = trainer.train_step(same, version=0)
    assert metrics["groups/uniform"] == len(groups) and _changed(before, trainer) == 0


@pytest.mark.parametrize("loss", [
    LossConfig(loss_type="grpo", importance_level="sequence", eps_low=3e-4, eps_high=4e-4),
    LossConfig(loss_type="dr_grpo", dual_clip=3.0, beta=0.04),
    LossConfig(loss_type="bnpo", tis_cap=None),
])
def test_loss_options_and_several_updates_per_batch(groups, loss):
    trainer = GRPOTrainer(replace(CONFIG, loss=loss, updates_per_step=2))
    metrics = trainer.train_step(groups, version=0)
    assert trainer.updates == 2
    assert ("kl" in metrics) == (loss.beta > 0)
    assert torch.isfinite(torch.tensor(metrics["loss"]))


def test_tokens_older_than_max_staleness_never_reach_the_loss(groups):
    trainer = GRPOTrainer(replace(CONFIG, mode="async", max_staleness=1))
    trainer.train_step(groups, version=1)  # the expert tokens carry version 0: one behind, allowed
    with pytest.raises(StaleTokens, match="2 versions old"):
        trainer.train_step(groups, version=2)


def test_behaviour_cloning_lowers_the_experts_nll(oracle_trajectories):
    trainer = GRPOTrainer(CONFIG)
    first = trainer.clone_step(oracle_trajectories, lr=3e-3)["nll"]
    for _ in range(3):
        last = trainer.clone_step(oracle_trajectories, lr=3e-3)["nll"]
    assert last < first - 0.5


def test_lr_schedule():
    from medvistagym.train.config import OptimConfig

    cfg = OptimConfig(warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    values = [lr_factor(s, 10, cfg) for s in range(11)]
    assert values[:2] == [0.5, 1.0] and values[2] == pytest.approx(1.0) and values[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))


def test_trainer_log_probs_equal_the_sampling_policys(mini_tasks, env_config):
    """The trainer's packed forward reproduces the log-probs the policy sampled with, turn after
    turn with tool images: same tokens, positions, images, temperature (fp32)."""
    trainer = GRPOTrainer(replace(CONFIG, engine=replace(CONFIG.engine, temperature=0.7)))

    async def rollout():
        policy = build_policy("transformers", model="qwen2.5-vl-tiny")
        try:
            await policy.update_weights(trainer.weights())
            engine = RolloutEngine(policy, env_config, EngineConfig(group_size=2, temperature=0.7, max_new_tokens=24))
            return [t for g in await engine.generate(mini_tasks[:2]) for t in g.trajectories]
        finally:
            await policy.close()

    trajectories = run(rollout())
    assert all(t.ok for t in trajectories) and sum(len(t.turns) for t in trajectories) > len(trajectories)
    samples = [to_sample(t, 0.0, trainer.model.vision) for t in trajectories]
    for mb in pack(samples, 100_000, trainer.model.rope_index):
        recomputed = trainer._logprobs(trainer.model, mb)
        sampled = mb.scored(torch.device("cpu")).behaviour_logprobs
        torch.testing.assert_close(recomputed, sampled, atol=2e-3, rtol=0)
