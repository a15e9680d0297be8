"""When a stream ends: end-of-sequence / stop token ids, stop strings, the length budget.

Stop strings are found by decoding only a short tail of the output each step: a stop string
that completed earlier would have ended the stream then, so one found in the tail is new.
The token that completes a stop string is kept (its text may run past the string).
"""

from __future__ import annotations

from typing import Any, Sequence

from .base import SamplingParams


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> tuple[int, ...]:
    """The model's end-of-sequence ids: generation config first (Qwen lists <|im_end|> and
    <|endoftext|>), else the tokenizer's."""
    ids = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if ids is None:
        ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)


class StopChecker:
    def __init__(self, tokenizer: Any, sampling: SamplingParams, eos_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._max_new = sampling.max_new_tokens
        self._stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(eos_ids))
        self._stop = sampling.stop
        # Tokens of the tail to decode: a stop string of n characters spans at most n tokens,
        # plus a few for byte-level pieces of one multi-byte character.
        self._window = max((len(s) for s in self._stop), default=0) + 4

    def check(self, output: Sequence[int]) -> tuple[str, str | int | None] | None:
        """(finish_reason, stop_reason) once `output` (all tokens sampled so far) must end."""
        last = output[-1]
        if last in self._stop_ids:
            return "stop", last
        if self._stop:
            tail = self._tokenizer.decode(output[-self._window :], skip_special_tokens=False)
            for s in self._stop:
                if s in tail:
                    return "stop", s
        if len(output) >= self._max_new:
            return "length", None
        return None
