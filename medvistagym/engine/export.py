"""Trajectories on disk: one Parquet row per episode, written and read back as a stream.

`TrajectoryWriter` appends trajectories as they complete and writes a row group every
`row_group_size` rows, so a run's file never sits in memory as one table; `read_trajectories`
reads it back one row group at a time. The file needs no custom code to open:
`pandas.read_parquet(path)` and `pyarrow.parquet.read_table(path)` load it as is.

Schema (`SCHEMA`), every column one value per trajectory:

    episode_id, group_id, task_id, dataset, question, gold, status   string
    answer                                   string, null when the episode gave no answer
    sample, prompt_length                    int32
    num_turns, num_images, model_tokens      int32, derived (len(turns), len(images),
                                             sum(loss_mask)) for filtering without decoding
    score, reward, started_s, ended_s        float64
    token_ids                                list<int32>
    loss_mask                                list<int8>
    logprobs                                 list<float32>
    versions                                 list<int32>
    reward_parts                             list<struct<name: string, value: float64>>
    images  list<struct<png: binary, turn: int32, source: string, task_image: int32,
                        box: fixed_size_list<float64>[4], caption: string,
                        height: int32, width: int32>>
    turns   list<struct<text: string, finish_reason: string, new_tokens: int32,
                        prompt_tokens: int32, generate_s: float64, tool_s: float64,
                        observation: string, retries: int32,
                        tool_calls: list<struct<name: string, arguments_json: string,
                                                ok: bool, error: string>>>>

Choices:
- logprobs are float32: the real back ends compute them in float32 (vLLM; our sampler over
  float32 logits), so the stored value is the sampled one; a Python float carrying more bits
  (the simulated back end's) comes back rounded to float32, a relative error below 6e-8, far
  below what the importance ratio can notice, for half the bytes of float64.
- reward_parts is a list of name/value pairs, not a map or a struct: a struct needs the part
  names fixed before the first row (they depend on the reward config, and failed episodes have
  none); a map reads in pandas as a list of tuples and `datasets` refuses Arrow maps
  (huggingface/datasets#5612), while a list of structs reads everywhere as a list of
  {"name", "value"} dicts: `{p["name"]: p["value"] for p in cell}`.
- images are lossless PNG of the exact pixels, mode RGB for (3, h, w) and L for (1, h, w), so
  the channel count comes back from the PNG itself; zlib level 1 encodes about 3x faster than
  Pillow's default level 6 for about 2% more bytes on a pathology slide. A pandas cell decodes
  with `PIL.Image.open(io.BytesIO(cell["png"]))`; height and width are stored for filtering.
- tool-call arguments are JSON text: their keys differ per tool, which no fixed schema holds.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from .trajectory import ImageRecord, ToolCallRecord, Trajectory, TurnRecord, sampled_runs

PathLike = str | os.PathLike[str]

PNG_COMPRESS_LEVEL = 1

TOOL_CALL = pa.struct([
    ("name", pa.string()),
    ("arguments_json", pa.string()),
    ("ok", pa.bool_()),
    ("error", pa.string()),
])
TURN = pa.struct([
    ("text", pa.string()),
    ("finish_reason", pa.string()),
    ("new_tokens", pa.int32()),
    ("prompt_tokens", pa.int32()),
    ("generate_s", pa.float64()),
    ("tool_s", pa.float64()),
    ("observation", pa.string()),
    ("retries", pa.int32()),
    ("tool_calls", pa.list_(TOOL_CALL)),
])
IMAGE = pa.struct([
    ("png", pa.binary()),
    ("turn", pa.int32()),
    ("source", pa.string()),
    ("task_image", pa.int32()),
    ("box", pa.list_(pa.float64(), 4)),
    ("caption", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
])
REWARD_PART = pa.struct([("name", pa.string()), ("value", pa.float64())])

SCHEMA = pa.schema([
    ("episode_id", pa.string()),
    ("group_id", pa.string()),
    ("sample", pa.int32()),
    ("task_id", pa.string()),
    ("dataset", pa.string()),
    ("question", pa.string()),
    ("gold", pa.string()),
    ("answer", pa.string()),
    ("score", pa.float64()),
    ("reward", pa.float64()),
    ("status", pa.string()),
    ("prompt_length", pa.int32()),
    ("started_s", pa.float64()),
    ("ended_s", pa.float64()),
    ("num_turns", pa.int32()),
    ("num_images", pa.int32()),
    ("model_tokens", pa.int32()),
    ("token_ids", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.int8())),
    ("logprobs", pa.list_(pa.float32())),
    ("versions", pa.list_(pa.int32())),
    ("reward_parts", pa.list_(REWARD_PART)),
    ("images", pa.list_(IMAGE)),
    ("turns", pa.list_(TURN)),
])

# Trajectory fields stored in a column of the same name, unchanged.
_PLAIN = ("episode_id", "group_id", "sample", "task_id", "dataset", "question", "gold", "answer", "score",
          "reward", "status", "prompt_length", "started_s", "ended_s", "token_ids")


def _encode_png(pixels: torch.Tensor) -> bytes:
    if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[0] not in (1, 3):
        raise ValueError(f"images must be (1 or 3, h, w) uint8 tensors, got {tuple(pixels.shape)} {pixels.dtype}")
    hwc = pixels.detach().cpu().permute(1, 2, 0).contiguous().numpy()
    buffer = io.BytesIO()
    Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return buffer.getvalue()


def _decode_png(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "RGB"):
            raise ValueError(f"expected an L or RGB PNG, got mode {image.mode}")
        hwc = np.array(image)  # a writable copy, so torch may own it
    if hwc.ndim == 2:
        return torch.from_numpy(hwc).unsqueeze(0)
    return torch.from_numpy(hwc).permute(2, 0, 1).contiguous()


def _image_row(image: ImageRecord) -> dict:
    return {
        "png": _encode_png(image.pixels),
        "turn": image.turn,
        "source": image.source,
        "task_image": image.task_image,
        "box": list(image.box),
        "caption": image.caption,
        "height": image.pixels.shape[1],
        "width": image.pixels.shape[2],
    }


def _turn_row(turn: TurnRecord) -> dict:
    return {
        "text": turn.text,
        "finish_reason": turn.finish_reason,
        "new_tokens": turn.new_tokens,
        "prompt_tokens": turn.prompt_tokens,
        "generate_s": turn.generate_s,
        "tool_s": turn.tool_s,
        "observation": turn.observation,
        "retries": turn.retries,
        "tool_calls": [
            {"name": call.name, "arguments_json": json.dumps(call.arguments, ensure_ascii=False),
             "ok": call.ok, "error": call.error}
            for call in turn.tool_calls
        ],
    }


def _row(trajectory: Trajectory) -> dict:
    trajectory.check()  # misaligned runs would train on the wrong tokens: refuse them here, not in the trainer
    return {
        **{name: getattr(trajectory, name) for name in _PLAIN},
        "loss_mask": trajectory.loss_mask,
        "logprobs": trajectory.logprobs,
        "versions": trajectory.versions,
        "num_turns": len(trajectory.turns),
        "num_images": len(trajectory.images),
        "model_tokens": trajectory.model_tokens,
        "reward_parts": [{"name": k, "value": v} for k, v in trajectory.reward_parts.items()],
        "images": [_image_row(image) for image in trajectory.images],
        "turns": [_turn_row(turn) for turn in trajectory.turns],
    }


def _image(row: dict) -> ImageRecord:
    return ImageRecord(
        pixels=_decode_png(row["png"]),
        turn=row["turn"],
        source=row["source"],
        task_image=row["task_image"],
        box=tuple(row["box"]),
        caption=row["caption"],
    )


def _turn(row: dict) -> TurnRecord:
    calls = [ToolCallRecord(c["name"], json.loads(c["arguments_json"]), c["ok"], c["error"]) for c in row["tool_calls"]]
    return TurnRecord(**{k: v for k, v in row.items() if k != "tool_calls"}, tool_calls=calls)


def _trajectory(row: dict) -> Trajectory:
    return Trajectory(
        **{name: row[name] for name in _PLAIN},
        sampled=sampled_runs(row["loss_mask"], row["logprobs"], row["versions"]),
        reward_parts={p["name"]: p["value"] for p in row["reward_parts"]},
        images=[_image(image) for image in row["images"]],
        turns=[_turn(turn) for turn in row["turns"]],
    )


class TrajectoryWriter:
    """Appends trajectories to a Parquet file as they complete.

    Each `write` converts its trajectory to Arrow at once (PNG encoding included), so a bad
    trajectory fails at its own call without costing the buffered ones, and the buffer holds
    compact Arrow data rather than Python lists of tokens; every `row_group_size` rows become
    one row group. `close` (idempotent; the context manager calls it, on exceptions too) writes
    what is buffered and the footer: until then the file is not readable. Not thread-safe:
    write from one thread (PNG encoding takes milliseconds, so keep it off the event loop).
    """

    def __init__(self, path: PathLike, *, row_group_size: int = 256) -> None:
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be positive, got {row_group_size}")
        self.path = path
        self.row_group_size = row_group_size
        self.rows = 0  # trajectories accepted so far
        self._pending: list[pa.RecordBatch] = []
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(path, SCHEMA, compression="zstd")

    def write(self, trajectory: Trajectory) -> None:
        if self._writer is None:
            raise ValueError(f"{self.path}: the trajectory writer is closed")
        self._pending.append(pa.RecordBatch.from_pylist([_row(trajectory)], schema=SCHEMA))
        self.rows += 1
        if len(self._pending) >= self.row_group_size:
            self._flush()

    def write_many(self, trajectories: Iterable[Trajectory]) -> None:
        for trajectory in trajectories:
            self.write(trajectory)

    def close(self) -> None:
        if self._writer is None:
            return
        try:
            self._flush()
        finally:
            self._writer.close()
            self._writer = None

    def _flush(self) -> None:
        if self._pending:
            # One chunk per column writes several times faster than 256 one-row chunks.
            table = pa.Table.from_batches(self._pending, schema=SCHEMA).combine_chunks()
            self._writer.write_table(table, row_group_size=table.num_rows)
            self._pending = []

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def write_parquet(trajectories: Iterable[Trajectory], path: PathLike, *, row_group_size: int = 256) -> int:
    """Write `trajectories` to `path`, one row each, streaming; returns the number of rows."""
    with TrajectoryWriter(path, row_group_size=row_group_size) as writer:
        writer.write_many(trajectories)
    return writer.rows


def _open(path: PathLike) -> pq.ParquetFile:
    try:
        file = pq.ParquetFile(path)
    except pa.ArrowInvalid as error:  # pyarrow's message does not say which file
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from error
    missing = [name for name in SCHEMA.names if name not in file.schema_arrow.names]
    if missing:
        file.close()
        raise ValueError(f"{path}: not a trajectory file, missing columns {missing}")
    return file


def _stream(file: pq.ParquetFile, path: PathLike) -> Iterator[Trajectory]:
    with file:
        for group in range(file.num_row_groups):
            try:
                table = file.read_row_group(group, columns=SCHEMA.names)
            except pa.ArrowException as error:
                raise ValueError(f"{path}: row group {group} is unreadable ({error})") from error
            for row in table.to_pylist():
                yield _trajectory(row)


def read_trajectories(path: PathLike) -> Iterator[Trajectory]:
    """The trajectories in `path`, in order, read one row group at a time.

    The file is opened (and checked) at the call, so a missing or foreign file fails here
    rather than at the first `next`."""
    return _stream(_open(path), path)
