"""Batched sampling: frequencies follow the (truncated) distribution, seeds reproduce,
log-probs are log_softmax(logits / temperature)."""

import torch

from medvistagym.policy import SamplingParams
from medvistagym.policy.sampling import sample

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def frequencies(params: SamplingParams, n: int = 40000) -> torch.Tensor:
    logits = LOGITS.expand(n, -1)
    tokens, _ = sample(logits, [params] * n, [None] * n, torch.Generator().manual_seed(0))
    return torch.bincount(tokens, minlength=len(LOGITS)).float() / n


def test_frequencies_follow_the_tempered_distribution():
    for t in (1.0, 0.5, 2.0):
        expected = torch.softmax(LOGITS / t, dim=0)
        assert (frequencies(SamplingParams(temperature=t)) - expected).abs().max() < 0.01


def test_top_k_and_top_p_truncate():
    probs = torch.softmax(LOGITS, dim=0)
    top2 = frequencies(SamplingParams(top_k=2))
    assert top2[2:].sum() == 0 and abs(top2[0] - probs[0] / probs[:2].sum()) < 0.01
    # Nucleus 0.8: the first three tokens hold 0.85 of the mass, the first two 0.72 (< 0.8).
    nucleus = frequencies(SamplingParams(top_p=0.8))
    assert nucleus[3:].sum() == 0 and abs(nucleus[2] - probs[2] / probs[:3].sum()) < 0.01


def test_logprobs_greedy_and_seeds():
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=3), SamplingParams(seed=3)]
    logits = torch.randn(3, 1000)

    def draw():
        return sample(logits, params, [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params])

    tokens, logprobs = draw()
    assert tokens[0] == logits[0].argmax()
    temps = torch.tensor([1.0, 0.7, 1.0]).unsqueeze(1)
    expected = torch.log_softmax(logits / temps, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    assert torch.allclose(logprobs, expected, atol=1e-5)
    assert torch.equal(draw()[0], tokens)  # seeded rows reproduce
