"""The KV cache of a continuously changing batch: rows join and leave between decode steps.

Rows are left-padded to one cache length, with zeros in the padded key/value slots (never
NaN, so masked slots contribute exactly nothing) and 0 in the attention mask. Joining rows
pads the shorter side; leaving rows are dropped and columns that became padding for every
row are trimmed, so a long-finished request does not keep the cache long.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _build(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dim -2 (keys/values) or -1 (mask) on the left to `length`."""
    missing = length - (t.shape[-1] if t.ndim == 2 else t.shape[-2])
    if missing == 0:
        return t
    return F.pad(t, (missing, 0)) if t.ndim == 2 else F.pad(t, (0, 0, missing, 0))


class PaddedKV:
    def __init__(self) -> None:
        self._cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) 1 = real token

    def cache(self) -> DynamicCache:
        if self._cache is None:
            raise RuntimeError("empty batch")
        return self._cache

    def extend_mask(self) -> torch.Tensor:
        """The mask for a decode step: every row gains one real token."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self.mask

    def store(self, cache: DynamicCache) -> None:
        self._cache = cache

    def append(self, cache: DynamicCache, length: int) -> None:
        """Join the rows of `cache` (prefilled without padding, `length` tokens each)."""
        keys = cache.layers[0].keys
        mask = torch.ones(keys.shape[0], length, dtype=torch.long, device=keys.device)
        if self._cache is None:
            self._cache, self.mask = cache, mask
            return
        total = max(self.mask.shape[1], length)
        merged = [
            (torch.cat([_left_pad(k0, total), _left_pad(k1, total)]), torch.cat([_left_pad(v0, total), _left_pad(v1, total)]))
            for (k0, v0), (k1, v1) in zip(_layers(self._cache), _layers(cache))
        ]
        self._cache = _build(merged)
        self.mask = torch.cat([_left_pad(self.mask, total), _left_pad(mask, total)])

    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index`, then trim columns that are padding in every kept row."""
        if index.numel() == 0:
            self._cache, self.mask = None, None
            return
        self.mask = self.mask[index]
        start = int(self.mask.any(dim=0).nonzero()[0])
        self.mask = self.mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
