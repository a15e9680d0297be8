"""Sampling a batch of rows with per-row temperature, top-k, top-p and seeds.

Log-probs returned are log_softmax(logits / temperature) of the sampled tokens, before top-k /
top-p truncation (the distribution the GRPO loss recomputes); greedy rows use temperature 1.

Draws are inverse-CDF: one uniform number per row (from the row's own generator when it has
a seed) against the row's cumulative distribution. That is a few passes over the [rows x
vocabulary] logits for the whole batch, where `torch.multinomial` per seeded row costs several
passes per row.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import SamplingParams


def _truncate(weights: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the unnormalised probabilities outside each row's top-k and top-p nucleus."""
    sorted_w, order = weights.sort(dim=-1, descending=True)
    rank = torch.arange(weights.shape[-1], device=weights.device).expand_as(sorted_w)
    k = torch.where(top_k > 0, top_k, weights.shape[-1]).unsqueeze(1)
    # Keep a token while the mass before it is below top_p (the first token is always kept).
    cumulative = sorted_w.cumsum(dim=-1)
    before = (cumulative - sorted_w) / cumulative[:, -1:]
    keep = (rank < k) & (before < top_p.unsqueeze(1))
    return torch.zeros_like(weights).scatter_(-1, order, sorted_w * keep)


def _uniforms(generators: Sequence[torch.Generator | None], default: torch.Generator | None, device) -> torch.Tensor:
    free = torch.rand(len(generators), generator=default, device=device)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if seeded:
        free[seeded] = torch.cat([torch.rand(1, generator=generators[i], device=device) for i in seeded])
    return free


class Sampler:
    """Samples rows of logits it computes into reused buffers: on CPU, allocating fresh
    [rows x vocabulary] tensors every step costs more (page faults) than the math."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, like: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(max(rows, 1), cols, dtype=torch.float32, device=like.device)
        return buf[:rows]

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """float32 logits of hidden states (B, H) under an output projection (V, H)."""
        if hidden.dtype != torch.float32 or weight.dtype != torch.float32:
            return torch.nn.functional.linear(hidden, weight).float()
        return torch.matmul(hidden, weight.T, out=self._buffer("logits", hidden, hidden.shape[0], weight.shape[0]))

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        default_generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, logprobs), each (B,), for float32 logits (B, V), which are overwritten; row i
        samples under params[i], with generators[i] when it has a seed, else `default_generator`."""
        device = logits.device
        if any(p.temperature not in (0.0, 1.0) for p in params):
            logits.div_(torch.tensor([p.temperature or 1.0 for p in params], device=device).unsqueeze(1))
        peak = logits.amax(dim=-1, keepdim=True)
        weights = torch.sub(logits, peak, out=self._buffer("weights", logits, *logits.shape)).exp_()
        log_norm = weights.sum(dim=-1).log_() + peak.squeeze(1)
        greedy = [i for i, p in enumerate(params) if p.temperature == 0]
        tokens = torch.zeros(len(params), dtype=torch.long, device=device)
        if greedy:
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if p.temperature > 0]
        if rows:
            tokens[rows] = _draw(weights if len(rows) == len(params) else weights[rows], [params[i] for i in rows],
                                 [generators[i] for i in rows], default_generator)
        logprobs = logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - log_norm
        return tokens, logprobs


def _draw(weights: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
          default: torch.Generator | None) -> torch.Tensor:
    """Inverse-CDF draws from unnormalised probabilities (overwritten by their running sums)."""
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        top_k = torch.tensor([p.top_k for p in params], device=weights.device)
        top_p = torch.tensor([p.top_p for p in params], device=weights.device)
        weights = _truncate(weights, top_k, top_p)
    cdf = torch.cumsum(weights, dim=-1, out=weights)
    u = _uniforms(generators, default, weights.device) * cdf[:, -1]
    return torch.searchsorted(cdf, u.unsqueeze(1), right=True).squeeze(1).clamp_(max=weights.shape[-1] - 1)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    default_generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`Sampler.sample` on a copy of `logits`, for one-off use."""
    return Sampler().sample(logits.float().clone(), params, generators, default_generator)
