"""Trajectories -> packed micro-batches for the training forward.

Several sequences share one row with no padding. What keeps them apart:
- positions restart at 0 for each sequence; for Qwen-VL they are the 3-D multimodal rotary
  positions of that sequence alone (`get_rope_index` per sequence), with the text positions
  prepended as a fourth row: from those, transformers builds a block-diagonal causal mask
  (its packed-sequence path), so no token attends across sequences;
- each sequence's images (pixel values and grid sizes) are concatenated in sequence order,
  which is the order their placeholders appear in the packed row.

Row i of the forward's hidden states predicts token i+1 of the same sequence: `targets`,
`loss_mask`, `behaviour_logprobs` and `versions` are shifted by one inside each sequence and
the last position of every sequence never enters the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..engine.trajectory import Trajectory
from ..kernels import patchify

# (token ids (L,), image grids (n, 3) or None) -> (3, L) rotary positions
RopeIndex = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class Sample:
    """One trajectory, ready to pack: token tensors, its advantage, its images as patches."""

    token_ids: torch.Tensor  # (L,) int64
    loss_mask: torch.Tensor  # (L,) float32, of each token itself (1 = sampled by the model)
    logprobs: torch.Tensor  # (L,) float32, the sampler's
    versions: torch.Tensor  # (L,) int64, -1 where not sampled
    advantage: float
    pixel_values: torch.Tensor | None
    grid_thw: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.token_ids)


def to_sample(traj: Trajectory, advantage: float, vision: str | None) -> Sample:
    """The trajectory's tensors; its images (uint8, as shown) patchified for `vision`."""
    pixel_values = grid = None
    if traj.images:
        if vision is None:
            raise ValueError(f"{traj.episode_id} has images but the model is text only")
        pixels = [im.pixels.expand(3, -1, -1).contiguous() if im.pixels.shape[0] == 1 else im.pixels
                  for im in traj.images]
        patches = patchify(pixels, vision)
        pixel_values, grid = patches.pixel_values, patches.grid_thw
    return Sample(
        torch.tensor(traj.token_ids, dtype=torch.long),
        torch.tensor(traj.loss_mask, dtype=torch.float32),
        torch.tensor(traj.logprobs, dtype=torch.float32),
        torch.tensor(traj.versions, dtype=torch.long),
        float(advantage), pixel_values, grid,
    )


@dataclass
class Packed:
    """One micro-batch: a single row of packed sequences and their per-token training data."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (4, 1, T) for Qwen-VL (text row first), (1, T) for text models
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    targets: torch.Tensor  # (T,) token predicted at each position (0 where masked)
    loss_mask: torch.Tensor  # (T,) float
    advantages: torch.Tensor  # (T,)
    behaviour_logprobs: torch.Tensor  # (T,)
    versions: torch.Tensor  # (T,)
    seq_ids: torch.Tensor  # (T,) index of the sequence within this micro-batch
    num_sequences: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device) -> "Packed":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return Packed(**moved)

    def scored(self, device: torch.device) -> "Scored":
        """The positions that enter the loss, on `device`."""
        rows = self.loss_mask.nonzero().squeeze(1)
        pick = lambda t: t.index_select(0, rows).to(device)  # noqa: E731
        return Scored(rows.to(device), pick(self.targets), pick(self.advantages), pick(self.behaviour_logprobs),
                      pick(self.versions), pick(self.seq_ids))


@dataclass
class Scored:
    """The positions of a micro-batch whose next token was sampled by the model. Only these
    reach the LM head and the loss: the rest would add zeros, and for a small model with a
    151k vocabulary the LM head is most of the work (prompt and observation tokens are ~90%
    of a multi-turn VLM sequence)."""

    rows: torch.Tensor  # indexes into the packed row
    targets: torch.Tensor
    advantages: torch.Tensor
    behaviour_logprobs: torch.Tensor
    versions: torch.Tensor
    seq_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)


def plan_bins(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: indexes grouped so each group's lengths sum to <= max_tokens
    (a sequence longer than that gets a bin of its own). Bins keep the input order inside."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


def pack(samples: Sequence[Sample], max_tokens: int, rope_index: RopeIndex | None) -> list[Packed]:
    """Micro-batches of at most `max_tokens` tokens (bar single longer sequences).
    `rope_index` gives Qwen-VL's 3-D positions; None for text-only models."""
    return [_pack_one([samples[i] for i in b], rope_index)
            for b in plan_bins([len(s) for s in samples], max_tokens)]


def _shifted(values: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.cat([values[1:], values.new_full((1,), fill)])


def _pack_one(samples: Sequence[Sample], rope_index: RopeIndex | None) -> Packed:
    text_positions = [torch.arange(len(s)) for s in samples]
    if rope_index is not None:
        rope = torch.cat([rope_index(s.token_ids, s.grid_thw) for s in samples], dim=1)
        position_ids = torch.cat([torch.cat(text_positions)[None], rope]).unsqueeze(1)
    else:
        position_ids = torch.cat(text_positions)[None]
    images = [s for s in samples if s.pixel_values is not None]
    return Packed(
        input_ids=torch.cat([s.token_ids for s in samples])[None],
        position_ids=position_ids,
        pixel_values=torch.cat([s.pixel_values for s in images]) if images else None,
        image_grid_thw=torch.cat([s.grid_thw for s in images]) if images else None,
        targets=torch.cat([_shifted(s.token_ids, 0) for s in samples]),
        loss_mask=torch.cat([_shifted(s.loss_mask, 0.0) for s in samples]),
        advantages=torch.cat([torch.full((len(s),), s.advantage) for s in samples]),
        behaviour_logprobs=torch.cat([_shifted(s.logprobs, 0.0) for s in samples]),
        versions=torch.cat([_shifted(s.versions, -1) for s in samples]),
        seq_ids=torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(samples)]),
        num_sequences=len(samples),
    )
