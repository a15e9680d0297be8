"""The fused GRPO loss's Triton kernels, run by the Triton interpreter on CPU, against its torch
path (itself checked against the reference in test_grpo_loss.py). Shapes stay tiny: each
program costs the interpreter milliseconds."""

from __future__ import annotations

import os

# triton.jit picks the interpreter when it decorates the kernels, i.e. on import.
os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from importlib.util import find_spec  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from medvistagym.kernels import grpo_loss  # noqa: E402
from medvistagym.kernels import grpo_loss_triton as gt  # noqa: E402
from medvistagym.kernels.grpo_loss import chunked_logprobs, fused_grpo_loss  # noqa: E402

if not gt.INTERPRETED:
    # Something imported the kernels before this module switched the interpreter on, so they
    # were decorated for a GPU; set TRITON_INTERPRET=1 in a conftest.py instead.
    raise RuntimeError("medvistagym.kernels.grpo_loss_triton was imported before TRITON_INTERPRET=1 was set")

N, H, V = 12, 8, 300  # backward tiles: vocab blocks of 128, 128, 44


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """16-wide vocab steps: rows take many steps (the online rescaling) and end in a partial one."""
    monkeypatch.setattr(gt, "BLOCK_V", 16)


def make_case(dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 2).to(dtype).requires_grad_()
    token_ids = torch.randint(0, V, (N,), generator=g)
    token_ids[:3] = torch.tensor([0, V - 1, 129])  # the first and last columns, a second-block column
    seq_ids = torch.tensor([1, 0, 1, 2, 0, 2, 1, 1, 0, 2, 2, 1])
    logp = chunked_logprobs(hidden.detach().float(), weight.detach().float(), token_ids, temperature=0.8)
    return dict(hidden=hidden, lm_head_weight=weight, token_ids=token_ids,
                loss_mask=torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool),
                advantages=torch.tensor([0.5, -1.0, 1.2])[seq_ids], seq_ids=seq_ids,
                old_logprobs=logp + 0.3 * torch.randn(N, generator=g),
                ref_logprobs=logp + 0.2 * torch.randn(N, generator=g))


OPTIONS = dict(beta=0.05, eps_high=0.28, temperature=0.8, compute_entropy=True, chunk_size=5)


def run(case: dict[str, Any], backend: str, **options: Any):
    loss, metrics = fused_grpo_loss(**case, **options, backend=backend)
    return loss, metrics, torch.autograd.grad(loss, [case["hidden"], case["lm_head_weight"]])


@pytest.mark.parametrize("level", ("token", "sequence"))
def test_float32_matches_the_torch_path(level: str) -> None:
    case = make_case(torch.float32)
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = (
        run(case, b, importance_level=level, **OPTIONS) for b in ("triton", "torch"))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for key in ref_metrics:
        torch.testing.assert_close(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6, msg=key)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ref_grads[1].abs().max() > 0


def test_bfloat16_logits_are_read_as_stored() -> None:
    # The kernels compute in fp32 from the bf16 logits and store bf16 gradients, as the torch
    # path rounds its fp32 gradient tile: equal up to one bf16 rounding.
    case = make_case(torch.bfloat16, seed=1)
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = (run(case, b, **OPTIONS) for b in ("triton", "torch"))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["entropy"], ref_metrics["entropy"], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2 * float(b.float().abs().max()))


def test_chunked_logprobs_and_entropy() -> None:
    case = make_case(torch.float32, seed=2)
    args = (case["hidden"], case["lm_head_weight"], case["token_ids"])
    ours = chunked_logprobs(*args, temperature=1.3, chunk_size=4, compute_entropy=True, backend="triton")
    ref = chunked_logprobs(*args, temperature=1.3, chunk_size=4, compute_entropy=True, backend="torch")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_interpreter_takes_cpu_tensors_only_and_auto_stays_on_torch() -> None:
    assert gt.available()
    gt.check_device(torch.zeros(1))
    with pytest.raises(ValueError, match="needs cpu tensors"):
        gt.check_device(torch.zeros(1, device="meta"))
    assert grpo_loss._ops("auto", torch.zeros(1)) == (grpo_loss._row_stats_torch, grpo_loss._grad_logits_torch)
    assert grpo_loss._ops("triton", torch.zeros(1)) == (gt.row_stats, gt.grad_logits_)


# ---------------------------------------------------------------------------------------------
# What the interpreter cannot check: that the kernels compile for a GPU


@pytest.mark.skipif(find_spec("triton.backends.nvidia") is None, reason="Triton's CUDA back end is not installed")
def test_kernels_compile_for_h100() -> None:
    # Compiles both kernels to sm_90 machine code (ptxas runs; no GPU needed) in a fresh process
    # without the interpreter, for fp32 and bf16 logits, with and without the entropy.
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from medvistagym.kernels import grpo_loss_triton as gt

        def compile(kernel, signature, constants):
            signature = signature | {name: "constexpr" for name in constants}
            compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": gt.NUM_WARPS})
            assert compiled.asm["cubin"], kernel

        for dtype in ("fp32", "bf16"):
            for entropy in (False, True):
                compile(gt._row_stats_kernel, {"logits": f"*{dtype}", "stride": "i64", "targets": "*i64",
                        "lse_out": "*fp32", "logp_out": "*fp32", "ent_out": "*fp32", "V": "i32", "inv_t": "fp32"},
                        {"BLOCK": gt.BLOCK_V, "ENTROPY": entropy})
            compile(gt._grad_logits_kernel, {"tile": f"*{dtype}", "stride": "i64", "lse": "*fp32", "grad": "*fp32",
                    "targets": "*i64", "V": "i32", "inv_t": "fp32"}, {"BLOCK": gt.BLOCK_V})
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
