"""Batched image decoding (+ antialiased cubic resize) with NVIDIA DALI, when it is installed.

`decode_batch` turns encoded JPEG/PNG bytes into (C, H, W) uint8 tensors: nvJPEG on a GPU
(`fn.decoders.image(device="mixed")`), DALI's libjpeg-turbo/libpng CPU decoder otherwise. On the CPU
the pixels equal Pillow's for PNG and for JPEG (both use libjpeg-turbo's default IDCT and fancy
chroma upsampling; measured 0 levels apart on skimage's photos).

Pipelines are built once per (device, resize?, channels) with `max_batch_size=MAX_BATCH` and fed
variable batches through `fn.external_source`, so any batch size reuses the same pipeline; longer
inputs run in chunks of MAX_BATCH. A DALI error leaves a pipeline unusable ("Current pipeline
object is no longer valid"), so a failing pipeline is dropped and rebuilt on next use. A forked
child builds its own: DALI's worker threads stay in the parent.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from typing import Any, Sequence

import numpy as np
import torch

MAX_BATCH = 64  # samples per pipeline run: bounds DALI's per-batch buffers
DEVICES = ("auto", "cpu", "gpu")

PipeKey = tuple[str, int | None, bool, int]  # (device, CUDA device index, resize?, channels)
_pipelines: dict[PipeKey, Any] = {}
_lock = threading.Lock()  # a DALI pipeline runs one batch at a time
_built = 0
# Pipelines inherited through fork(): using or destroying one in the child hangs on worker
# threads that exist only in the parent, so the child keeps them unused.
_inherited: list[Any] = []


def _after_fork_in_child() -> None:
    global _lock
    _inherited.extend(_pipelines.values())
    _pipelines.clear()
    _lock = threading.Lock()  # the parent may have held it while forking


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class DecodeBatchError(ValueError):
    """Some images of a batch could not be decoded; the others are still decoded.

    `failed` maps each failing index to DALI's reason; `images` holds the decoded tensors
    in input order, with None at the failing indexes, so a caller can name the files.
    """

    def __init__(self, failed: dict[int, str], images: list[torch.Tensor | None]):
        self.failed, self.images = failed, images
        reasons = "; ".join(f"#{i}: {why}" for i, why in sorted(failed.items()))
        super().__init__(f"could not decode {len(failed)} of {len(images)} images ({reasons})")


@functools.cache
def available() -> bool:
    """Whether NVIDIA DALI can be imported here."""
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):  # OSError: the package is there but a shared library is not
        return False
    return True


def pipelines_built() -> int:
    """How many pipelines this process has built (each costs far more than a run)."""
    return _built


def decode_batch(
    encoded: Sequence[bytes],
    *,
    device: str = "auto",
    sizes: Sequence[tuple[int, int]] | None = None,
    channels: int = 3,
) -> list[torch.Tensor]:
    """Decode JPEG/PNG bytes to (C, H, W) uint8 tensors, on CUDA for the GPU pipeline.

    `sizes` resizes image i to sizes[i] = (h, w) with DALI's antialiased cubic filter.
    `channels` 1 decodes to grayscale, 3 to RGB. `device` "auto" takes the GPU when torch
    sees one. Raises DecodeBatchError (a ValueError) when some images fail; the others
    are decoded and attached to it.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels!r}")
    if sizes is not None and len(sizes) != len(encoded):
        raise ValueError(f"{len(sizes)} sizes for {len(encoded)} images")
    target = _resolve_device(device)
    if not encoded:
        return []
    key = (target, torch.cuda.current_device() if target == "gpu" else None, sizes is not None, channels)
    images: list[torch.Tensor | None] = []
    failed: dict[int, str] = {}
    for start in range(0, len(encoded), MAX_BATCH):
        chunk = list(encoded[start : start + MAX_BATCH])
        chunk_sizes = None if sizes is None else list(sizes[start : start + MAX_BATCH])
        try:
            images += _run(key, chunk, chunk_sizes)
        except RuntimeError:  # one bad image fails the whole run: retry one by one to find it
            for i, data in enumerate(chunk, start):
                try:
                    images += _run(key, [data], None if sizes is None else [sizes[i]])
                except RuntimeError as err:
                    failed[i] = _reason(err)
                    images.append(None)
    if failed:
        raise DecodeBatchError(failed, images)
    return images  # type: ignore[return-value]  # no None without failures


def _resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    if not available():
        raise ImportError("decode_batch needs NVIDIA DALI (the nvidia-dali-cuda12x package)")
    has_gpu = torch.cuda.is_available()
    if device == "gpu" and not has_gpu:
        raise RuntimeError("decode_batch(device='gpu') needs a CUDA GPU and torch sees none; use 'cpu' or 'auto'")
    return "gpu" if device == "gpu" or (device == "auto" and has_gpu) else "cpu"


def _run(key: PipeKey, encoded: list[bytes], sizes: list[tuple[int, int]] | None) -> list[torch.Tensor]:
    inputs = {"encoded": [np.frombuffer(data, dtype=np.uint8) for data in encoded]}
    if sizes is not None:
        inputs["sizes"] = [np.asarray(size, dtype=np.float32) for size in sizes]
    with _lock:
        pipe = _pipelines[key] if key in _pipelines else _build(key)
        try:
            (batch,) = pipe.run(**inputs)
            return _to_torch(batch, key[1])  # copy out before the next run reuses DALI's buffers
        except RuntimeError:
            del _pipelines[key]  # DALI invalidates a pipeline that raised
            raise


def _build(key: PipeKey) -> Any:
    from nvidia.dali import fn, pipeline_def, types

    global _built
    device, device_id, resize, channels = key
    gpu = device == "gpu"

    # run(**inputs) feeds external sources directly; it needs a prefetch queue of one batch.
    @pipeline_def(batch_size=MAX_BATCH, num_threads=_threads(), prefetch_queue_depth=1, device_id=device_id)
    def graph() -> Any:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        output = types.GRAY if channels == 1 else types.RGB
        # Fancy upsampling makes nvJPEG upsample chroma as libjpeg-turbo (and so Pillow) does.
        extra = {"jpeg_fancy_upsampling": True} if gpu else {}
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=output, **extra)
        if resize:
            sizes = fn.external_source(name="sizes", dtype=types.FLOAT, ndim=1)
            images = fn.resize(images, size=sizes, interp_type=types.INTERP_CUBIC, antialias=True)
        return images

    pipe = graph()
    pipe.build()
    _pipelines[key] = pipe
    _built += 1
    return pipe


def _threads() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, 16))


def _to_torch(batch: Any, device_id: int | None) -> list[torch.Tensor]:
    """DALI's HWC samples as contiguous (C, H, W) torch tensors that own their memory."""
    if device_id is None:
        # numpy, not torch, transposes on the CPU: torch's OpenMP workers spin after a parallel
        # copy and took the cores from DALI's next run (64 JPEGs: 830 vs 510 ms here). np.array
        # always copies, also with one channel, where the transposed view aliases DALI's buffer.
        chw = (np.asarray(batch[i]).transpose(2, 0, 1) for i in range(len(batch)))
        return [torch.from_numpy(np.array(sample, order="C")) for sample in chw]
    from nvidia.dali.plugin.pytorch import feed_ndarray

    stream = torch.cuda.current_stream(device_id)
    out = []
    for i in range(len(batch)):
        sample = batch[i]
        hwc = torch.empty(sample.shape(), dtype=torch.uint8, device=torch.device("cuda", device_id))
        feed_ndarray(sample, hwc, cuda_stream=stream)  # on torch's stream, as DALI's torch iterator copies
        out.append(hwc.permute(2, 0, 1).contiguous())  # hwc is ours, so a view is fine with one channel
    return out


def _reason(err: Exception) -> str:
    """The informative line of a DALI error, which also carries the pipeline's definition site.

    The decoder's own detail goes to stderr through nvImageCodec's logger, not into the error.
    """
    _, _, tail = str(err).rpartition("encountered:")
    lines = [line.strip() for line in tail.splitlines() if line.strip() and "no longer valid" not in line]
    # "Failed to decode sample #0 :" numbers the sample of the one-image retry, not of the caller's batch.
    return re.sub(r"\s*sample #\d+\s*:?$", "", lines[0]) if lines else type(err).__name__
