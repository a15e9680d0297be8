"""GRPOTrainer: completed rollout groups in, one or more optimizer steps out.

    trainer = GRPOTrainer(config)                  # loads the model, AdamW, the LR schedule
    metrics = trainer.train_step(groups, version)  # advantages, packing, fused loss, clip, step
    await policy.update_weights(trainer.weights())

One rollout batch makes `updates_per_step` optimizer steps (mini-batches of whole groups);
each accumulates gradients over packed micro-batches of at most `micro_batch_tokens` tokens,
with the loss normalised over the whole mini-batch (so the split into micro-batches does not
change the gradient). With one update per batch the proximal policy is the current weights
(ratio 1, gradient of the plain policy gradient); with more, the first update's log-probs are
computed up front and held fixed as pi_old. Tokens sampled by older weights than those being
trained (async mode) are corrected by truncated importance sampling against the sampler's own
log-probs, and no token older than `max_staleness` versions enters the loss.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch

from ..engine.engine import Group
from ..engine.trajectory import Trajectory
from ..kernels import chunked_logprobs, fused_grpo_loss
from .advantages import group_advantages, is_uniform
from .config import OptimConfig, TrainConfig
from .model import TrainModel
from .packing import Packed, Sample, pack, to_sample


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then constant, linear or cosine decay to min_lr_ratio at `total`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total <= cfg.warmup_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    decay = 1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


class StaleTokens(ValueError):
    """A batch carried tokens older than max_staleness allows (the caller should have dropped them)."""


class GRPOTrainer:
    def __init__(self, config: TrainConfig, model: TrainModel | None = None) -> None:
        self.config = config
        self.model = model or TrainModel(config.model, device=config.device, dtype=config.dtype,
                                         gradient_checkpointing=config.gradient_checkpointing)
        self.ref = (TrainModel(config.model, device=config.device, dtype=config.dtype, trainable=False)
                    if config.loss.beta > 0 else None)
        o = config.optim
        self.optimizer = torch.optim.AdamW([p for p in self.model.module.parameters() if p.requires_grad], lr=o.lr,
                                           betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        total = config.steps * config.updates_per_step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, total, o))
        self.step = 0  # GRPO rollout batches trained on
        self.updates = 0  # optimizer steps, behaviour cloning included

    # -- GRPO --------------------------------------------------------------------------------

    def prepare(self, groups: Sequence[Group]) -> tuple[list[Sample], dict[str, float]]:
        """Advantages per group, groups without signal left out; the kept members as samples."""
        kept = [g for g in groups if g.kept]
        rewards = [[t.reward for t in g.kept] for g in kept]
        advantages = group_advantages(rewards, self.config.advantage_scale)
        samples: list[Sample] = []
        uniform = 0
        for group, adv, rew in zip(kept, advantages, rewards):
            if self.config.skip_uniform_groups and is_uniform(rew):
                uniform += 1
                continue
            samples += [to_sample(t, a, self.model.vision) for t, a in zip(group.kept, adv)]
        flat = [r for g in rewards for r in g]
        stats = {
            "reward/mean": sum(flat) / max(len(flat), 1),
            "score/mean": sum(t.score for g in kept for t in g.kept) / max(len(flat), 1),
            "groups/trained": len(kept) - uniform,
            "groups/uniform": uniform,
            "groups/dropped": len(groups) - len(kept),
        }
        return samples, stats

    def train_step(self, groups: Sequence[Group], version: int) -> dict[str, float]:
        """One rollout batch: `updates_per_step` optimizer steps. `version` is the policy version
        the trained weights correspond to (for staleness)."""
        start = time.perf_counter()
        samples, stats = self.prepare(groups)
        stats.update(self._staleness(samples, version))
        if samples:
            minis = _split(samples, self.config.updates_per_step)
            packed = [self._pack(mini) for mini in minis]  # packed once: pi_old lines up with the updates
            old = self._old_logprobs(packed) if len(minis) > 1 else [None] * len(minis)
            for mini, micro, mini_old in zip(minis, packed, old):
                stats.update(self._update(mini, micro, mini_old))
        self.step += 1
        stats["time/train_s"] = time.perf_counter() - start
        return stats

    def _staleness(self, samples: Sequence[Sample], version: int) -> dict[str, float]:
        sampled = [s.versions[s.loss_mask > 0] for s in samples]
        versions = torch.cat(sampled) if sampled else torch.zeros(0, dtype=torch.long)
        if not len(versions):
            return {"staleness/max": 0.0, "staleness/mean": 0.0}
        lag = (version - versions).float()
        limit = self.config.max_staleness
        if self.config.mode == "async" and lag.max() > limit:
            raise StaleTokens(f"a token {int(lag.max())} versions old reached the trainer (max_staleness {limit})")
        return {"staleness/max": float(lag.max()), "staleness/mean": float(lag.mean())}

    def _old_logprobs(self, packed: list[list[Packed]]) -> list[list[torch.Tensor]]:
        """pi_old for every micro-batch of every mini-batch, before any update."""
        return [[self._logprobs(self.model, mb) for mb in micro] for micro in packed]

    def _pack(self, samples: Sequence[Sample]) -> list[Packed]:
        rope = self.model.rope_index if self.model.vision else None
        return pack(samples, self.config.micro_batch_tokens, rope)

    def _update(self, samples: list[Sample], micro: list[Packed], old: list[torch.Tensor] | None) -> dict[str, float]:
        cfg, lc = self.config, self.config.loss
        norm = _normalizer(lc.loss_type, micro)
        longest = max(int(s.loss_mask.sum()) for s in samples)
        sums: dict[str, float] = {}
        tokens = 0
        self.optimizer.zero_grad(set_to_none=True)
        for i, mb in enumerate(micro):
            sc = mb.scored(self.model.device)
            hidden = self.model.hidden(mb).index_select(0, sc.rows)
            loss, metrics = fused_grpo_loss(
                hidden, self.model.lm_head_weight, sc.targets, torch.ones_like(sc.advantages), sc.advantages,
                seq_ids=sc.seq_ids, old_logprobs=None if old is None else old[i],
                ref_logprobs=self._ref_logprobs(mb), beta=lc.beta,
                behaviour_logprobs=sc.behaviour_logprobs if lc.tis_cap is not None else None,
                tis_cap=lc.tis_cap or 1.0, eps_low=lc.eps_low, eps_high=lc.eps_high, dual_clip=lc.dual_clip,
                loss_type=lc.loss_type, importance_level=lc.importance_level, temperature=cfg.engine.temperature,
                normalizer=norm, max_response_length=longest, chunk_size=lc.chunk_size,
            )
            if lc.loss_type == "bnpo":
                loss = loss / len(micro)  # a token mean per micro-batch, averaged
            loss.backward()
            n = len(sc)
            tokens += n
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value) * n
        out = {key: value / max(tokens, 1) for key, value in sums.items() if key != "loss"}
        out.update(self._optimizer_step())
        out.update({"loss": sums.get("loss", 0.0), "tokens/trained": tokens, "sequences/trained": len(samples),
                    "micro_batches": len(micro)})
        return out

    def _logprobs(self, model: TrainModel, mb: Packed) -> torch.Tensor:
        """Log-probs of the scored tokens under `model`, without a graph."""
        sc = mb.scored(model.device)
        with torch.no_grad():
            hidden = model.hidden(mb).index_select(0, sc.rows)
            return chunked_logprobs(hidden, model.lm_head_weight, sc.targets, temperature=self.config.engine.temperature)

    def _ref_logprobs(self, mb: Packed) -> torch.Tensor | None:
        return None if self.ref is None else self._logprobs(self.ref, mb)

    def _optimizer_step(self, scheduled: bool = True) -> dict[str, float]:
        """Clip, step, and advance the GRPO schedule (behaviour cloning sets its own lr)."""
        params = [p for p in self.model.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.optim.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        if scheduled:
            self.scheduler.step()
        self.updates += 1
        return {"grad_norm": float(norm), "lr": lr}

    # -- behaviour cloning -------------------------------------------------------------------

    def clone_step(self, trajectories: Sequence[Trajectory], lr: float) -> dict[str, float]:
        """One step of behaviour cloning: the mean negative log-likelihood of the model tokens.
        The fused loss on-policy with advantage 1 has exactly its gradient (d/dθ of
        -exp(logp - sg(logp)) is -d logp/dθ), so cloning shares the chunked LM head."""
        samples = [to_sample(t, 1.0, self.model.vision) for t in trajectories]
        micro = self._pack(samples)
        total = max(sum(float(mb.loss_mask.sum()) for mb in micro), 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        nll = 0.0
        for mb in micro:
            sc = mb.scored(self.model.device)
            hidden = self.model.hidden(mb).index_select(0, sc.rows)
            ones = torch.ones_like(sc.advantages)
            loss, metrics = fused_grpo_loss(hidden, self.model.lm_head_weight, sc.targets, ones, ones,
                                            loss_type="dapo", normalizer=total, chunk_size=self.config.loss.chunk_size)
            loss.backward()
            nll -= float(metrics["logp"]) * len(sc) / total
        scheduled = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        out = self._optimizer_step(scheduled=False)
        for group, value in zip(self.optimizer.param_groups, scheduled):
            group["lr"] = value
        out["nll"] = nll
        return out

    # -- weights and state -------------------------------------------------------------------

    def weights(self) -> list[tuple[str, torch.Tensor]]:
        """Named tensors for `policy.update_weights` (detached; the policy copies them)."""
        return [(name, tensor.detach()) for name, tensor in self.model.named_weights()]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.updates = state["step"], state["updates"]


def _split(samples: list[Sample], parts: int) -> list[list[Sample]]:
    """`parts` mini-batches of near-equal size, in order (fewer when there are fewer samples)."""
    parts = min(parts, len(samples))
    size = math.ceil(len(samples) / parts)
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def _normalizer(loss_type: str, micro: Sequence[Packed]) -> float | None:
    """The mini-batch-wide count the loss divides by: tokens (dapo) or sequences (grpo, dr_grpo)."""
    if loss_type == "dapo":
        return max(sum(float(mb.loss_mask.sum()) for mb in micro), 1.0)
    if loss_type in ("grpo", "dr_grpo"):
        return float(sum(len(torch.unique(mb.seq_ids[mb.loss_mask > 0])) for mb in micro)) or 1.0
    return None
