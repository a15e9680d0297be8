"""The GRPO family of policy losses fused with the LM head: per-token log-probs of the sampled
tokens straight from final hidden states, without ever holding the [N, V] logits.

`fused_grpo_loss` is TRL's GRPOTrainer `_compute_loss` on packed tokens: loss types grpo, bnpo,
dr_grpo and dapo, token or sequence (GSPO) importance ratios, asymmetric and dual clipping, the
k3 KL to a reference model, truncated importance sampling against the sampler's log-probs.
`grpo_loss_reference` computes the same from full logits on a padded (sequences x length)
batch, the obvious way: the tests' oracle and the benchmark's baseline. `chunked_logprobs` gives
the no-grad log-probs the trainer needs for pi_old and the reference model.

Design
------
Exact by construction. One autograd Function maps (hidden, weight) to the log-prob of each
token's target (and, detached, its entropy); the loss is plain torch on [N]-vectors, so every
option, however it mixes tokens (sequence means, normalisers), is differentiated by autograd
exactly as in the reference. Only the Function is chunked:
- forward, by rows: a chunk's logits [rows, V] come from one matmul, are reduced to logsumexp,
  target logit (and entropy) in fp32, and are dropped. Saved: the inputs, targets, logsumexp.
- backward, by vocab blocks: a tile (tokens x vocab block) of logits is recomputed and turned in
  place into g * (onehot - softmax) / T (softmax from the saved logsumexp), then
  grad_hidden += tile @ W_block and grad_W_block = tile^T @ hidden. Vocab-major order writes
  each block of grad_W once, from one matmul when the tile spans all tokens (the usual case), so
  bf16 weights need no fp32 [V, H] accumulator; the fp32 accumulator is grad_hidden's [N, H].
Rows without gradient cost nothing: tokens outside the loss mask are never projected, and the
backward skips rows whose log-prob gradient is zero (zero advantage at beta = 0, clipped ratios).

Why recompute rather than Liger's single pass (gradients formed during the forward, logits
computed once: 3 matmuls of N x H x V instead of our 4)? The single pass needs the loss's
gradient for each log-prob before the other chunks' log-probs exist, so chunks must align with
sequences for GSPO and the per-sequence means, normalisers must be known up front, and the
gradient is paid for even when no backward follows (evaluation, metrics). Recomputation keeps
the loss ordinary torch code, exact for every option, for a third more matmul FLOPs.

Memory beyond the inputs and their gradients: one chunk of logits (LOGITS_BUDGET elements,
128 MiB in fp32, or chunk_size rows), a few temporaries its size on the torch path, and
[N]-vectors. On CUDA the matmuls stay in torch and two Triton kernels (grpo_loss_triton.py) do
the rest: row statistics in one pass over the vocab, and the gradient written over the tile,
so bf16 logits are never copied to fp32.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")
BACKENDS = ("auto", "torch", "triton")
# Logits per forward chunk or backward tile when chunk_size is None: 128 MiB in fp32, 220 rows
# of a 151,936-token vocab (skinnier chunks lose matmul efficiency, on CPU especially).
LOGITS_BUDGET = 1 << 25
# Narrowest vocab block of a backward tile: narrower ones make the matmuls inefficient.
MIN_VOCAB_BLOCK = 128

RowStats = Callable[[Tensor, Tensor, float, Tensor, Tensor, "Tensor | None"], None]
GradLogits = Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]


@dataclass(frozen=True)
class _Options:
    """The scalar options of the loss, checked on construction."""

    beta: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    tis_cap: float = 2.0
    loss_type: str = "dapo"
    importance_level: str = "token"
    temperature: float = 1.0
    normalizer: float | None = None
    max_response_length: int | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {LOSS_TYPES}")
        if self.importance_level not in IMPORTANCE_LEVELS:
            raise ValueError(f"unknown importance_level {self.importance_level!r}; expected one of {IMPORTANCE_LEVELS}")
        if not 0.0 <= self.eps_low < 1.0 or self.eps_high < 0.0:
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.beta < 0.0 or self.tis_cap <= 0.0 or self.temperature <= 0.0:
            raise ValueError(f"need beta >= 0, tis_cap > 0, temperature > 0; got {self.beta}, {self.tis_cap}, "
                             f"{self.temperature}")
        if self.normalizer is not None and self.normalizer <= 0:
            raise ValueError(f"normalizer must be > 0 (or None), got {self.normalizer}")
        if self.max_response_length is not None and self.max_response_length < 1:
            raise ValueError(f"max_response_length must be >= 1 (or None), got {self.max_response_length}")


def fused_grpo_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    token_ids: Tensor,
    loss_mask: Tensor,
    advantages: Tensor,
    *,
    seq_ids: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    behaviour_logprobs: Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    tis_cap: float = 2.0,
    loss_type: str = "dapo",
    importance_level: str = "token",
    temperature: float = 1.0,
    normalizer: float | None = None,
    max_response_length: int | None = None,
    compute_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss of N packed tokens and its metrics, from hidden states [N, H] and the LM
    head [V, H]; row i predicts token_ids[i] (the caller has shifted). Both hidden and the
    weight get gradients. Per-token inputs are [N]; seq_ids (any order) names each token's
    sequence, None for one sequence. old_logprobs None is on-policy (ratio 1, gradient flows).

    Aggregation over the mask m: bnpo sum(loss m) / sum(m); dapo sum(loss m) / normalizer
    (default sum(m)); grpo the sum of per-sequence masked means / normalizer; dr_grpo
    sum(loss m) / (normalizer * max_response_length). Sequence counts (grpo and dr_grpo's default
    normalizer) are the sequences with a masked token; max_response_length defaults to the
    largest sum(m) of a sequence. chunk_size is tokens per chunk of logits (default: chunks of
    LOGITS_BUDGET logits). Metrics are detached scalars: clip_ratio/low, /high, /region, logp,
    kl (with ref_logprobs), entropy (with compute_entropy).
    """
    opts = _Options(beta, eps_low, eps_high, dual_clip, tis_cap, loss_type, importance_level, temperature,
                   normalizer, max_response_length)
    per_token = {"loss_mask": loss_mask, "advantages": advantages, "seq_ids": seq_ids, "old_logprobs": old_logprobs,
                 "ref_logprobs": ref_logprobs, "behaviour_logprobs": behaviour_logprobs}
    _check(hidden, lm_head_weight, token_ids, per_token, opts, chunk_size)
    ops = _ops(backend, hidden)
    rows = (loss_mask > 0).nonzero().squeeze(1)
    # Tokens outside the loss are never projected: they would only be multiplied by zero.
    if rows.numel() < token_ids.numel():
        hidden = hidden.index_select(0, rows)
        token_ids, per_token = token_ids[rows], {k: None if v is None else v[rows] for k, v in per_token.items()}
    logp, entropy = _LinearLogprobs.apply(hidden, lm_head_weight, token_ids, temperature,
                                          _budget(chunk_size, lm_head_weight.shape[0]), compute_entropy, ops)
    return _packed_loss(logp, entropy if compute_entropy else None, per_token, opts)


@torch.no_grad()
def chunked_logprobs(
    hidden: Tensor,
    lm_head_weight: Tensor,
    token_ids: Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    compute_entropy: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(hidden @ W^T / T)[i, token_ids[i]] for every row (fp32, float64 for float64
    inputs), and the entropies when asked; without gradients, chunked like the loss."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check(hidden, lm_head_weight, token_ids, {}, None, chunk_size)
    budget = _budget(chunk_size, lm_head_weight.shape[0])
    _, logp, entropy = _forward(hidden, lm_head_weight, token_ids, temperature, budget, compute_entropy,
                                _ops(backend, hidden)[0])
    return (logp, entropy) if compute_entropy else logp


def grpo_loss_reference(
    hidden: Tensor,
    lm_head_weight: Tensor,
    token_ids: Tensor,
    loss_mask: Tensor,
    advantages: Tensor,
    *,
    seq_ids: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    behaviour_logprobs: Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    tis_cap: float = 2.0,
    loss_type: str = "dapo",
    importance_level: str = "token",
    temperature: float = 1.0,
    normalizer: float | None = None,
    max_response_length: int | None = None,
    compute_entropy: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`fused_grpo_loss` the obvious way: full logits, log_softmax, gather, then TRL's
    `_compute_loss` on the sequences laid out as a padded (S, L) batch."""
    opts = _Options(beta, eps_low, eps_high, dual_clip, tis_cap, loss_type, importance_level, temperature,
                   normalizer, max_response_length)
    per_token = {"loss_mask": loss_mask, "advantages": advantages, "seq_ids": seq_ids, "old_logprobs": old_logprobs,
                 "ref_logprobs": ref_logprobs, "behaviour_logprobs": behaviour_logprobs}
    _check(hidden, lm_head_weight, token_ids, per_token, opts, None)
    logits = (hidden @ lm_head_weight.T).to(_acc_dtype(hidden)) / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    pad = _padder(seq_ids, token_ids)
    padded = {k: None if v is None else pad(v.to(logp.dtype)) for k, v in per_token.items() if k != "seq_ids"}
    logp = pad(logp)
    per_token_loss, coef_1, kl = _trl_per_token_loss(logp, padded, opts)
    mask, adv = padded["loss_mask"], padded["advantages"]
    lengths = mask.sum(-1)
    sequences = (lengths > 0).sum().clamp(min=1)
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / lengths.clamp(min=1.0)).sum() / (normalizer or sequences)
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        longest = max_response_length or lengths.max().clamp(min=1.0)
        loss = (per_token_loss * mask).sum() / ((normalizer or sequences) * longest)
    else:
        loss = (per_token_loss * mask).sum() / (normalizer or mask.sum().clamp(min=1.0))

    def mean(x: Tensor) -> Tensor:
        return ((x * mask).sum() / mask.sum().clamp(min=1.0)).detach()

    low, high = (coef_1 < 1 - eps_low) & (adv < 0), (coef_1 > 1 + eps_high) & (adv > 0)
    metrics = {"clip_ratio/low": mean(low), "clip_ratio/high": mean(high), "clip_ratio/region": mean(low | high),
               "logp": mean(logp)}
    if kl is not None:
        metrics["kl"] = mean(kl)
    if compute_entropy:
        metrics["entropy"] = mean(pad(-(logprobs.exp() * logprobs).sum(-1)))
    return loss, metrics


def _trl_per_token_loss(logp: Tensor, t: dict[str, Tensor | None],
                        opts: _Options) -> tuple[Tensor, Tensor, Tensor | None]:
    """TRL's per-token loss on a padded (S, L) batch (t: the padded per-token inputs): the loss,
    the importance ratio ((S, 1) at sequence level) and the k3 KL (None without ref_logprobs)."""
    mask, adv = t["loss_mask"], t["advantages"]
    old = logp.detach() if t["old_logprobs"] is None else t["old_logprobs"]
    log_ratio = logp - old
    if opts.importance_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - opts.eps_low, 1 + opts.eps_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if opts.dual_clip is not None:
        per_token_loss = torch.where(adv < 0, torch.min(per_token_loss, -opts.dual_clip * adv), per_token_loss)
    if t["behaviour_logprobs"] is not None:
        tis = torch.clamp(torch.exp(old - t["behaviour_logprobs"]), max=opts.tis_cap).detach()
        per_token_loss = per_token_loss * tis
    kl = None
    if t["ref_logprobs"] is not None:
        kl = torch.exp(t["ref_logprobs"] - logp) - (t["ref_logprobs"] - logp) - 1
        if opts.beta > 0:
            per_token_loss = per_token_loss + opts.beta * kl
    return per_token_loss, coef_1, kl


# ---------------------------------------------------------------------------------------------
# The loss on packed [N]-vectors


def _packed_loss(logp: Tensor, entropy: Tensor | None, t: dict[str, Tensor | None],
                 opts: _Options) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss from the log-probs of the masked tokens (every input here is restricted to them)."""
    m, adv = t["loss_mask"].to(logp.dtype), t["advantages"].to(logp.dtype)
    # Sequences renumbered 0..S-1 among the tokens present, so S counts those with a masked token.
    if t["seq_ids"] is None:
        seq, n_seq = torch.zeros_like(m, dtype=torch.long), int(m.numel() > 0)
    else:
        present, seq = torch.unique(t["seq_ids"], return_inverse=True)
        n_seq = present.numel()

    def per_seq(x: Tensor) -> Tensor:
        return torch.zeros(n_seq, dtype=x.dtype, device=x.device).index_add(0, seq, x)

    lengths = per_seq(m)
    old = logp.detach() if t["old_logprobs"] is None else t["old_logprobs"].to(logp.dtype)
    log_ratio = logp - old
    if opts.importance_level == "sequence":
        log_ratio = (per_seq(log_ratio * m) / lengths.clamp(min=1.0))[seq]
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - opts.eps_low, 1 + opts.eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    if opts.dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -opts.dual_clip * adv), loss)
    if t["behaviour_logprobs"] is not None:
        loss = loss * torch.exp(old.detach() - t["behaviour_logprobs"].to(logp.dtype)).clamp(max=opts.tis_cap)
    kl = None
    if t["ref_logprobs"] is not None:
        delta = t["ref_logprobs"].to(logp.dtype) - logp
        kl = torch.exp(delta) - delta - 1
        if opts.beta > 0:
            loss = loss + opts.beta * kl
    total = _aggregate(loss * m, m, per_seq, lengths, n_seq, opts)
    return total, _metrics(m, adv, ratio, logp, kl, entropy, opts)


def _metrics(m: Tensor, adv: Tensor, ratio: Tensor, logp: Tensor, kl: Tensor | None, entropy: Tensor | None,
             opts: _Options) -> dict[str, Tensor]:
    """Masked means, detached: clip fractions (TRL's definitions), log-prob, KL and entropy."""

    def mean(x: Tensor) -> Tensor:
        return ((x * m).sum() / m.sum().clamp(min=1.0)).detach()

    low, high = (ratio < 1 - opts.eps_low) & (adv < 0), (ratio > 1 + opts.eps_high) & (adv > 0)
    metrics = {"clip_ratio/low": mean(low), "clip_ratio/high": mean(high), "clip_ratio/region": mean(low | high),
               "logp": mean(logp)}
    if kl is not None:
        metrics["kl"] = mean(kl)
    if entropy is not None:
        metrics["entropy"] = mean(entropy)
    return metrics


def _aggregate(weighted: Tensor, m: Tensor, per_seq: Callable[[Tensor], Tensor], lengths: Tensor, n_seq: int,
               opts: _Options) -> Tensor:
    """The loss type's reduction of the masked per-token losses `weighted` (= loss * m)."""
    tokens = m.sum().clamp(min=1.0)
    if opts.loss_type == "bnpo":
        return weighted.sum() / tokens
    if opts.loss_type == "dapo":
        return weighted.sum() / (opts.normalizer or tokens)
    sequences = opts.normalizer or max(n_seq, 1)
    if opts.loss_type == "grpo":
        return (per_seq(weighted) / lengths.clamp(min=1.0)).sum() / sequences
    longest = opts.max_response_length or (lengths.max().clamp(min=1.0) if n_seq else 1.0)
    return weighted.sum() / (sequences * longest)


# ---------------------------------------------------------------------------------------------
# Log-probs through the LM head, chunked


class _LinearLogprobs(torch.autograd.Function):
    """(hidden [n, H], weight [V, H]) -> (log-prob of each row's target [n], its entropy [n] or
    an empty tensor), never holding more than `budget` logits at once."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, budget: int,
                entropy: bool, ops: tuple[RowStats, GradLogits]) -> tuple[Tensor, Tensor]:
        lse, logp, ent = _forward(hidden, weight, targets, temperature, budget, entropy, ops[0])
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.budget, ctx.grad_logits = temperature, budget, ops[1]
        ent = logp.new_empty(0) if ent is None else ent
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, targets, lse = ctx.saved_tensors
        grads = _backward(hidden, weight, targets, lse, grad_logp, ctx.temperature, ctx.budget, ctx.grad_logits,
                          ctx.needs_input_grad[:2])
        return (*grads, None, None, None, None, None)


def _forward(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, budget: int, entropy: bool,
             row_stats: RowStats) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logsumexp, target log-prob, entropy or None) of every row, a chunk of rows at a time."""
    n, vocab = hidden.shape[0], weight.shape[0]
    lse, logp = (torch.empty(n, dtype=_acc_dtype(hidden), device=hidden.device) for _ in range(2))
    ent = torch.empty_like(lse) if entropy else None
    rows = max(1, budget // vocab)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        chunk_ent = None if ent is None else ent[s:e]
        row_stats(hidden[s:e] @ weight.T, targets[s:e], temperature, lse[s:e], logp[s:e], chunk_ent)
    return lse, logp, ent


def _backward(hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor, grad: Tensor, temperature: float,
              budget: int, grad_logits: GradLogits, needs: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of sum(grad * logp) w.r.t. hidden and weight, by tiles of (tokens x vocab block)."""
    grad = grad.to(lse.dtype)
    active = (grad != 0).nonzero().squeeze(1)
    partial = active.numel() < grad.numel()
    h = hidden.index_select(0, active) if partial else hidden
    if partial:
        targets, lse, grad = targets[active], lse[active], grad[active]
    n, vocab = h.shape[0], weight.shape[0]
    vb = min(vocab, max(MIN_VOCAB_BLOCK, budget // max(n, 1) // MIN_VOCAB_BLOCK * MIN_VOCAB_BLOCK))
    grad_h = torch.zeros(n, h.shape[1], dtype=lse.dtype, device=h.device) if needs[0] else None
    grad_w = torch.empty_like(weight) if needs[1] else None
    for v0 in range(0, vocab, vb):
        block = None if grad_w is None else grad_w[v0 : v0 + vb]
        _vocab_block(h, weight[v0 : v0 + vb], targets - v0, lse, grad, temperature, max(1, budget // vb), grad_logits,
                     grad_h, block)
    if grad_h is None:
        return None, grad_w
    grad_h = grad_h.to(hidden.dtype)
    return (torch.zeros_like(hidden).index_copy_(0, active, grad_h) if partial else grad_h), grad_w


def _vocab_block(h: Tensor, w: Tensor, targets: Tensor, lse: Tensor, grad: Tensor, temperature: float, rows: int,
                 grad_logits: GradLogits, grad_h: Tensor | None, block: Tensor | None) -> None:
    """One vocab block w of the weight, in tiles of `rows` tokens: adds its share to grad_h and
    writes grad_W's block. targets are relative to the block's first column."""
    n = h.shape[0]
    one_tile = 0 < n <= rows
    # One token tile writes its product straight into the block; several accumulate in fp32
    # (in place for fp32 weights), rounded once into the block.
    acc = block
    if block is not None and not one_tile:
        acc = block.zero_() if block.dtype == lse.dtype else torch.zeros_like(block, dtype=lse.dtype)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        tile = grad_logits(h[s:e] @ w.T, lse[s:e], grad[s:e], targets[s:e], temperature)
        if grad_h is not None:
            _addmm_(grad_h[s:e], tile, w)
        if block is not None and one_tile:
            torch.mm(tile.T, h, out=block)
        elif block is not None:
            _addmm_(acc, tile.T, h[s:e])
    if acc is not block:
        block.copy_(acc)


def _addmm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, in place when the dtypes agree, else through a product in a's dtype."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc += a @ b


def _row_stats_torch(logits: Tensor, targets: Tensor, temperature: float, lse: Tensor, logp: Tensor,
                     entropy: Tensor | None) -> None:
    """Writes each row's logsumexp, target log-prob and entropy of softmax(logits / T)."""
    z = logits.to(lse.dtype)  # the chunk is ours: fp32 logits are scaled in place
    if temperature != 1.0:
        z.div_(temperature)
    torch.logsumexp(z, dim=1, out=lse)
    torch.sub(z.gather(1, targets[:, None]).squeeze(1), lse, out=logp)
    if entropy is not None:
        p = torch.exp(z - lse[:, None])
        torch.sub(lse, p.mul_(z).sum(1), out=entropy)


def _grad_logits_torch(tile: Tensor, lse: Tensor, grad: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """The tile's logits turned into grad * (onehot(targets) - softmax) / T, in the tile's dtype
    (in place for fp32); targets outside the tile's columns have no onehot."""
    p = tile.to(lse.dtype)
    if temperature != 1.0:
        p.div_(temperature)
    g = grad / temperature
    p.sub_(lse[:, None]).exp_().mul_(-g[:, None])
    inside = (targets >= 0) & (targets < tile.shape[1])
    p.scatter_add_(1, torch.where(inside, targets, 0)[:, None], torch.where(inside, g, 0.0)[:, None])
    return p.to(tile.dtype)


# ---------------------------------------------------------------------------------------------
# Checks and helpers


def _ops(backend: str, hidden: Tensor) -> tuple[RowStats, GradLogits]:
    """The row-statistics and gradient functions of a back end; "auto" is Triton for CUDA
    tensors when it is installed. The Triton module is imported only when used: under its
    interpreter, TRITON_INTERPRET must be set before its kernels are defined."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch" or (backend == "auto" and not hidden.is_cuda):
        return _row_stats_torch, _grad_logits_torch
    triton_ops = importlib.import_module("medvistagym.kernels.grpo_loss_triton")
    if not triton_ops.available():
        if backend == "auto":
            return _row_stats_torch, _grad_logits_torch
        raise ValueError("backend 'triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1): pip install triton")
    triton_ops.check_device(hidden)
    return triton_ops.row_stats, triton_ops.grad_logits_


def _check(hidden: Tensor, weight: Tensor, token_ids: Tensor, per_token: dict[str, Tensor | None],
           opts: _Options | None, chunk_size: int | None) -> None:
    """ValueError for inputs the loss cannot take, naming the input."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and lm_head_weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(f"hidden and lm_head_weight must share a floating dtype and a device, got {hidden.dtype} on "
                         f"{hidden.device} and {weight.dtype} on {weight.device}")
    n, vocab = hidden.shape[0], weight.shape[0]
    for name, t in {"token_ids": token_ids, **per_token}.items():
        if t is not None and (t.shape != (n,) or t.device != hidden.device):
            raise ValueError(f"{name} must be [{n}] on {hidden.device}, got {tuple(t.shape)} on {t.device}")
    for name, t in (("token_ids", token_ids), ("seq_ids", per_token.get("seq_ids"))):
        if t is not None and (t.dtype.is_floating_point or t.dtype == torch.bool):
            raise ValueError(f"{name} must be integers, got {t.dtype}")
    if n and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab):
        raise ValueError(f"token_ids must lie in [0, {vocab}), got {int(token_ids.min())}..{int(token_ids.max())}")
    if per_token.get("seq_ids") is not None and n and int(per_token["seq_ids"].min()) < 0:
        raise ValueError("seq_ids must be >= 0")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None), got {chunk_size}")
    if opts is not None and opts.beta > 0 and per_token["ref_logprobs"] is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference model's log-probs) for the KL term")


def _budget(chunk_size: int | None, vocab: int) -> int:
    """Logits per forward chunk and backward tile."""
    return LOGITS_BUDGET if chunk_size is None else chunk_size * vocab


def _acc_dtype(hidden: Tensor) -> torch.dtype:
    """fp32 for fp32 and narrower inputs, float64 for float64 ones."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _padder(seq_ids: Tensor | None, token_ids: Tensor) -> Callable[[Tensor], Tensor]:
    """[N] -> [S, L], token i at (its sequence, its rank among that sequence's tokens), zeros
    elsewhere; S = max(seq_ids) + 1, L = the longest sequence."""
    seq = torch.zeros_like(token_ids) if seq_ids is None else seq_ids.long()
    n = seq.numel()
    counts = torch.bincount(seq, minlength=1)
    order = torch.argsort(seq, stable=True)
    pos = torch.empty_like(seq)
    pos[order] = torch.arange(n, device=seq.device) - (counts.cumsum(0) - counts)[seq[order]]
    shape = (counts.numel(), int(counts.max()))
    return lambda x: x.new_zeros(shape).index_put((seq, pos), x)
