"""Triton kernels of the fused GRPO loss (`grpo_loss.py`): what it does to a chunk of logits
between the LM head's matmuls, which stay in torch (cuBLAS).

- `row_stats`: one program per row streams the row once over the vocab and writes its
  logsumexp, the log-prob of its target and, when asked, its entropy, all of softmax(z / T). Each
  lane keeps a running max m, sum of exp(z - m) and sum of exp(z - m) z (the entropy's
  E[z]), rescaled when m grows; lanes are combined once at the end, so the loop has no
  cross-lane reduction.
- `grad_logits_`: one program per row of a (tokens x vocab block) tile overwrites the tile's
  logits with g * (onehot(target) - softmax) / T, the softmax recomputed from the saved
  logsumexp. The tile is the buffer the next matmuls read: no second tile-sized buffer.

Logits are read in their dtype (bf16 from a bf16 LM head) and computed in fp32 (the interpreter
also computes bf16 wrongly without the cast); gradients are stored in the tile's dtype, as the
naive loss's bf16 grad_logits. On a GPU tensors are CUDA; under the Triton interpreter
(TRITON_INTERPRET=1, set before this module is imported) they are CPU tensors. Block size and
warps are not tuned: no GPU has run these kernels yet.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    jit, constexpr = triton.jit, tl.constexpr
except ImportError:  # the module still imports, so that available() can say no
    triton = tl = None
    jit, constexpr = (lambda fn: fn), int

# triton.jit picks the interpreter when it decorates, so what counts is the setting at import.
# Reductions go through tl.reduce with our own combine functions: tl.max and tl.sum are
# themselves @jit and were decorated when triton was first imported, perhaps before the setting.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

BLOCK_V = 2048  # vocab entries a program handles per step (fewer when the vocab is smaller)
NUM_WARPS = 8  # few programs per forward chunk (its rows): more warps keep more loads in flight


def available() -> bool:
    """Triton is importable and has somewhere to run: a CUDA device, or the interpreter."""
    return triton is not None and (INTERPRETED or torch.cuda.is_available())


def check_device(t: torch.Tensor) -> None:
    wanted = "cpu" if INTERPRETED else "cuda"
    if t.device.type != wanted:
        why = "under the Triton interpreter" if INTERPRETED else "without the Triton interpreter"
        raise ValueError(f"tensors are on {t.device}; {why} the Triton back end needs {wanted} tensors")


def row_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float, lse: torch.Tensor,
              logp: torch.Tensor, entropy: torch.Tensor | None) -> None:
    """Writes each row's logsumexp, target log-prob and (when given a buffer) entropy."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    _row_stats_kernel[(rows,)](
        logits, logits.stride(0), targets, lse, logp, lse if entropy is None else entropy, vocab, 1.0 / temperature,
        BLOCK=_block(vocab), ENTROPY=entropy is not None, num_warps=NUM_WARPS,
    )  # fmt: skip


def grad_logits_(tile: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, targets: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """The tile's logits overwritten with grad * (onehot(targets) - softmax) / T; targets are
    column indices, those outside the tile have no onehot."""
    rows, vocab = tile.shape
    if rows:
        _grad_logits_kernel[(rows,)](
            tile, tile.stride(0), lse, grad, targets, vocab, 1.0 / temperature, BLOCK=_block(vocab), num_warps=NUM_WARPS
        )
    return tile


def _block(vocab: int) -> int:
    return min(BLOCK_V, triton.next_power_of_2(vocab))


@jit
def _row_stats_kernel(logits, stride, targets, lse_out, logp_out, ent_out, V, inv_t,
                      BLOCK: constexpr, ENTROPY: constexpr):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    row = logits + r * stride
    cols = tl.arange(0, BLOCK)
    # A finite floor for the running max: exp(m - m_new) stays defined on lanes that only saw padding.
    m = tl.full((BLOCK,), -1.0e30, tl.float32)
    s = tl.full((BLOCK,), 0.0, tl.float32)
    t = tl.full((BLOCK,), 0.0, tl.float32)
    for v0 in range(0, V, BLOCK):
        valid = v0 + cols < V
        z = tl.load(row + v0 + cols, mask=valid, other=-float("inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, z)
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * scale + e
        if ENTROPY:
            t = t * scale + e * tl.where(valid, z, 0.0)  # padding: e = 0, and 0 * -inf would be NaN
        m = m_new
    top = tl.reduce(m, 0, _maximum)
    w = tl.exp(m - top)
    total = tl.reduce(s * w, 0, _add)
    lse = top + tl.log(total)
    tl.store(lse_out + r, lse)
    target = tl.load(targets + r)
    tl.store(logp_out + r, tl.load(row + target).to(tl.float32) * inv_t - lse)
    if ENTROPY:
        tl.store(ent_out + r, lse - tl.reduce(t * w, 0, _add) / total)


@jit
def _grad_logits_kernel(tile, stride, lse, grad, targets, V, inv_t, BLOCK: constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = tile + r * stride
    shift = tl.load(lse + r)
    g = tl.load(grad + r).to(tl.float32) * inv_t
    target = tl.load(targets + r)
    cols = tl.arange(0, BLOCK)
    for v0 in range(0, V, BLOCK):
        c = v0 + cols
        valid = c < V
        z = tl.load(row + c, mask=valid, other=0.0).to(tl.float32) * inv_t
        d = tl.where(c == target, 1.0, 0.0) - tl.exp(z - shift)
        tl.store(row + c, (d * g).to(tile.dtype.element_ty), mask=valid)


@jit
def _maximum(a, b):
    return tl.maximum(a, b)


@jit
def _add(a, b):
    return a + b
