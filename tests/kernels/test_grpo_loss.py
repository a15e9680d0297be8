"""The fused GRPO loss's torch path against `grpo_loss_reference` (full logits, padded batch):
loss, gradients of hidden and LM head, and metrics, over every loss type, importance level and
option; the autograd graph never saves a [N, V] tensor; bad input is a ValueError."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from medvistagym.kernels import grpo_loss
from medvistagym.kernels.grpo_loss import chunked_logprobs, fused_grpo_loss, grpo_loss_reference

N, H, V = 37, 16, 300  # chunk_size 7 divides neither N nor V; backward tiles span 128-wide vocab blocks
SEQ_LENGTHS = (11, 3, 14, 9)  # four sequences, interleaved below


def make_case(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, Any]:
    """Packed tokens of four sequences in shuffled order (seq_ids unsorted), some tokens out of
    the loss, one sequence with zero advantage, and off-policy log-probs far enough from the
    current ones that ratios clip on both sides."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / 2).to(dtype).requires_grad_()
    seq_ids = torch.repeat_interleave(torch.arange(4), torch.tensor(SEQ_LENGTHS))[torch.randperm(N, generator=g)]
    token_ids = torch.randint(0, V, (N,), generator=g)
    loss_mask = torch.rand(N, generator=g) > 0.25
    advantages = torch.tensor([1.0, 0.0, -0.7, 0.4], dtype=torch.float64)[seq_ids]
    logp = chunked_logprobs(hidden.double().detach(), weight.double().detach(), token_ids, temperature=0.7)

    def near(scale: float) -> torch.Tensor:
        return logp + scale * torch.randn(N, generator=g, dtype=torch.float64)

    # Per-sequence shifts push whole sequences out of the clip range too (high for the positive
    # advantage, low for the negative one), so sequence-level (GSPO) ratios clip as well.
    old = near(0.3) + torch.tensor([-0.4, 0.0, 0.4, 0.1], dtype=torch.float64)[seq_ids]
    behaviour = old + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)
    return dict(hidden=hidden, lm_head_weight=weight, token_ids=token_ids, loss_mask=loss_mask, advantages=advantages,
                seq_ids=seq_ids, old_logprobs=old, ref_logprobs=near(0.2), behaviour_logprobs=behaviour)


ALL_OPTIONS = dict(beta=0.1, eps_low=0.2, eps_high=0.28, dual_clip=3.0, temperature=0.7, compute_entropy=True)


def both(case: dict[str, Any], drop: tuple[str, ...] = (), chunk_size: int | None = 7, **options: Any):
    """((loss, metrics, grads) of ours, the same of the reference), grads w.r.t. hidden and weight."""
    inputs = {k: v for k, v in case.items() if k not in drop}
    params = [inputs["hidden"], inputs["lm_head_weight"]]
    results = []
    for fn, extra in ((fused_grpo_loss, dict(chunk_size=chunk_size, backend="torch")), (grpo_loss_reference, {})):
        loss, metrics = fn(**inputs, **options, **extra)
        results.append((loss, metrics, torch.autograd.grad(loss, params)))
    return results


def assert_same(ours, ref, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = ours, ref
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        assert not metrics[key].requires_grad, key
        torch.testing.assert_close(metrics[key], ref_metrics[key], rtol=rtol, atol=atol, msg=key)
    for name, a, b in zip(("hidden", "weight"), grads, ref_grads):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * float(b.abs().max()), msg=name)


LEVELS = list(itertools.product(("grpo", "bnpo", "dr_grpo", "dapo"), ("token", "sequence")))


@pytest.mark.parametrize(("loss_type", "level"), LEVELS)
def test_every_loss_type_and_level_with_all_options(loss_type: str, level: str) -> None:
    case = make_case()
    ours, ref = both(case, loss_type=loss_type, importance_level=level, **ALL_OPTIONS)
    assert_same(ours, ref)
    metrics = ref[1]
    assert metrics["clip_ratio/low"] > 0 and metrics["clip_ratio/high"] > 0  # the case does clip
    assert float(ref[0].detach()) != 0.0 and ref[2][1].abs().max() > 0


@pytest.mark.parametrize(
    ("drop", "options"),
    [
        (("old_logprobs", "ref_logprobs", "behaviour_logprobs"), {}),  # on-policy, plain
        (("old_logprobs", "behaviour_logprobs"), dict(beta=0.05)),  # on-policy with KL
        (("behaviour_logprobs",), dict(eps_low=0.1, eps_high=0.4)),  # no TIS, asymmetric clip
        (("ref_logprobs",), dict(dual_clip=1.5, tis_cap=1.2)),  # no KL; tight dual clip and TIS cap
        ((), dict(beta=0.0, temperature=1.3)),  # ref given at beta 0: the KL is a metric only
        (("seq_ids",), dict(beta=0.1)),  # one sequence
    ],
)
@pytest.mark.parametrize("loss_type", ("grpo", "dr_grpo", "dapo"))
def test_option_combinations(drop: tuple[str, ...], options: dict[str, Any], loss_type: str) -> None:
    for level in ("token", "sequence"):
        assert_same(*both(make_case(seed=1), drop, loss_type=loss_type, importance_level=level, **options))


@pytest.mark.parametrize("loss_type", ("grpo", "dr_grpo", "dapo"))
def test_given_normalizer_and_response_length(loss_type: str) -> None:
    options = dict(ALL_OPTIONS, loss_type=loss_type, normalizer=13.0, max_response_length=20)
    ours, ref = both(make_case(seed=2), **options)
    assert_same(ours, ref)
    default, _ = fused_grpo_loss(**make_case(seed=2), **dict(options, normalizer=None, max_response_length=None))
    assert not torch.isclose(ours[0], default)  # the arguments are used


@pytest.mark.parametrize("chunk_size", (1, 5, 36, None))
def test_chunk_sizes(chunk_size: int | None) -> None:
    assert_same(*both(make_case(seed=3), chunk_size=chunk_size, **ALL_OPTIONS))


def test_float32_tolerance_of_the_brief() -> None:
    assert_same(*both(make_case(torch.float32, seed=4), **ALL_OPTIONS), rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs() -> None:
    # Chunked and naive bf16 matmuls may round differently in the last bit; the softmax is fp32 in both.
    case = make_case(torch.bfloat16, seed=5)
    ours, ref = both(case, **ALL_OPTIONS)
    assert ours[2][0].dtype == ours[2][1].dtype == torch.bfloat16
    assert_same(ours, ref, rtol=2e-2, atol=2e-2)
    # Against float64 arithmetic on the same bf16 values: still close.
    exact = dict(case, hidden=case["hidden"].detach().double().requires_grad_(),
                 lm_head_weight=case["lm_head_weight"].detach().double().requires_grad_())
    exact_loss, _ = grpo_loss_reference(**exact, **ALL_OPTIONS)
    torch.testing.assert_close(ours[0].double(), exact_loss, rtol=2e-2, atol=2e-2)


def test_weights_of_a_float_mask_and_gradients_of_only_one_input() -> None:
    case = make_case(seed=6)
    case["loss_mask"] = case["loss_mask"] * torch.rand(N, dtype=torch.float64)
    for loss_type, level in LEVELS:
        assert_same(*both(case, loss_type=loss_type, importance_level=level, **ALL_OPTIONS))
    for frozen in ("hidden", "lm_head_weight"):
        case = make_case(seed=6)
        case[frozen] = case[frozen].detach()
        trained = "lm_head_weight" if frozen == "hidden" else "hidden"
        grads = [torch.autograd.grad(fn(**case, **ALL_OPTIONS)[0], case[trained])[0]
                 for fn in (fused_grpo_loss, grpo_loss_reference)]
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_nothing_in_the_loss() -> None:
    case = make_case(seed=7)
    case["loss_mask"] = torch.zeros(N, dtype=torch.bool)
    ours, ref = both(case, **ALL_OPTIONS)
    assert float(ours[0].detach()) == 0.0
    assert_same(ours, ref)
    assert all(float(g.abs().max()) == 0.0 for g in ours[2])


@pytest.mark.parametrize("chunk_size", (3, None))
def test_chunked_logprobs(chunk_size: int | None) -> None:
    case = make_case(seed=8)
    hidden, weight, ids = case["hidden"], case["lm_head_weight"], case["token_ids"]
    logprobs = torch.log_softmax((hidden @ weight.T) / 0.7, dim=-1)
    logp, entropy = chunked_logprobs(hidden, weight, ids, temperature=0.7, chunk_size=chunk_size, compute_entropy=True)
    assert not logp.requires_grad and logp.dtype == torch.float64
    torch.testing.assert_close(logp, logprobs.gather(1, ids[:, None]).squeeze(1).detach())
    torch.testing.assert_close(entropy, -(logprobs.exp() * logprobs).sum(-1).detach())
    low = chunked_logprobs(hidden.float(), weight.float(), ids, chunk_size=chunk_size)
    assert low.dtype == torch.float32 and low.shape == (N,)


@pytest.mark.parametrize("chunk_size", (7, None))
def test_logits_are_chunked(chunk_size: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every chunk of logits the forward reduces and every tile the backward recomputes stays
    # within the budget: chunk_size rows of V logits, or LOGITS_BUDGET logits.
    monkeypatch.setattr(grpo_loss, "LOGITS_BUDGET", 2000)
    seen: dict[str, list[tuple[int, int]]] = {"forward": [], "backward": []}

    def spy(name: str, fn):
        def wrapped(logits: torch.Tensor, *args: Any) -> Any:
            seen[name].append(tuple(logits.shape))
            return fn(logits, *args)
        return wrapped

    monkeypatch.setattr(grpo_loss, "_row_stats_torch", spy("forward", grpo_loss._row_stats_torch))
    monkeypatch.setattr(grpo_loss, "_grad_logits_torch", spy("backward", grpo_loss._grad_logits_torch))
    case = make_case(seed=11)
    seen["forward"].clear()  # make_case's own chunked_logprobs
    loss, _ = fused_grpo_loss(**case, **ALL_OPTIONS, chunk_size=chunk_size, backend="torch")
    loss.backward()
    budget = 2000 if chunk_size is None else chunk_size * V
    in_loss = int(case["loss_mask"].sum())
    assert sum(rows for rows, _ in seen["forward"]) == in_loss  # masked-out rows are never projected
    assert all(rows * cols <= budget and cols == V for rows, cols in seen["forward"])
    assert all(rows * cols <= budget for rows, cols in seen["backward"]) and len(seen["backward"]) > 3
    assert {cols for _, cols in seen["backward"]} == {128, V - 256}  # vocab blocks of 128, 128, 44

    def recomputed_rows() -> int:
        return sum(rows for rows, cols in seen["backward"] if cols == V - 256)  # of the last vocab block

    assert recomputed_rows() == in_loss  # at beta > 0 the KL term gives every row a gradient
    # At beta 0 the zero-advantage sequence (and clipped tokens) have none: not recomputed.
    seen["backward"].clear()
    loss, _ = fused_grpo_loss(**case, **dict(ALL_OPTIONS, beta=0.0), chunk_size=chunk_size, backend="torch")
    loss.backward()
    zero = int((case["loss_mask"] & (case["advantages"] == 0)).sum())
    assert zero > 0 and recomputed_rows() <= in_loss - zero


def _largest_saved(fn, case: dict[str, Any], **extra: Any) -> int:
    """numel of the largest tensor the autograd graph of fn's loss saves for backward."""
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = fn(**case, **ALL_OPTIONS, **extra)
    loss.backward()
    return max(sizes)


def test_the_graph_saves_no_logits() -> None:
    case = make_case(seed=9)
    assert _largest_saved(fused_grpo_loss, case, chunk_size=None, backend="torch") < N * V
    assert _largest_saved(grpo_loss_reference, case) >= N * V  # the check sees logits where there are some


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(loss_type="ppo"), "unknown loss_type"),
        (dict(importance_level="segment"), "unknown importance_level"),
        (dict(beta=0.1, ref_logprobs=None), "beta > 0 needs ref_logprobs"),
        (dict(eps_low=1.0), "eps_low"),
        (dict(eps_high=-0.1), "eps_high"),
        (dict(dual_clip=1.0), "dual_clip must be > 1"),
        (dict(temperature=0.0), "temperature > 0"),
        (dict(tis_cap=0.0), "tis_cap > 0"),
        (dict(normalizer=0.0), "normalizer must be > 0"),
        (dict(max_response_length=0), "max_response_length"),
        (dict(chunk_size=0), "chunk_size must be >= 1"),
        (dict(backend="cuda"), "unknown backend"),
        (dict(advantages=torch.zeros(N - 1)), r"advantages must be \[37\]"),
        (dict(token_ids=torch.full((N,), V)), r"token_ids must lie in \[0, 300\)"),
        (dict(token_ids=torch.zeros(N)), "token_ids must be integers"),
        (dict(seq_ids=-torch.ones(N, dtype=torch.long)), "seq_ids must be >= 0"),
        (dict(hidden=torch.zeros(N, H + 1)), r"need hidden \[N, H\]"),
        (dict(hidden=torch.zeros(N, H, dtype=torch.float32)), "share a floating dtype"),
    ],
)
def test_bad_input_is_a_value_error(change: dict[str, Any], message: str) -> None:
    case = make_case(seed=10)
    kwargs = {**case, **ALL_OPTIONS, **change}
    with pytest.raises(ValueError, match=message):
        fused_grpo_loss(**kwargs)
    if "chunk_size" not in change and "backend" not in change:
        with pytest.raises(ValueError, match=message):
            grpo_loss_reference(**kwargs)
