"""Parquet export: exact round trips of realistic trajectories, plain pandas/pyarrow reads,
row-group streaming, and clear errors for files that are not trajectory files."""

from __future__ import annotations

import io
import json
import random
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data

from medvistagym.engine.export import SCHEMA, TrajectoryWriter, read_trajectories, write_parquet
from medvistagym.engine.trajectory import ImageRecord, ToolCallRecord, Trajectory, TurnRecord

IHC = torch.from_numpy(np.ascontiguousarray(data.immunohistochemistry())).permute(2, 0, 1).contiguous()
CAMERA = torch.from_numpy(data.camera())  # (512, 512) grayscale


def _sampled(trajectory: Trajectory, rng: random.Random, n: int, version: int) -> None:
    trajectory.append([rng.randrange(151_000) for _ in range(n)],
                      logprobs=[-rng.expovariate(3.0) for _ in range(n)], version=version)


def _observation(trajectory: Trajectory, rng: random.Random, n: int) -> None:
    trajectory.append([rng.randrange(151_000) for _ in range(n)])


def _base(episode: str, sample: int, status: str, answer: str | None) -> Trajectory:
    return Trajectory(episode_id=episode, group_id="g-ihc", sample=sample, task_id="ihc-mc", dataset="pathvqa",
                      question="Which stain is shown in <image 1>? Größe in µm → answer A–D.", gold="B",
                      answer=answer, status=status, started_s=1.7e9 + sample, ended_s=1.7e9 + sample + 12.25)


def zoom_episode(rng: random.Random) -> Trajectory:
    """Three turns: a zoom into the IHC slide, a rotate of a grayscale CT-like image, then the answer."""
    t = _base("ep-zoom", 0, "ok", "B")
    t.prompt_length = 300
    _observation(t, rng, 300)
    gray = CAMERA.unsqueeze(0).expand(3, -1, -1).contiguous()  # grayscale shown as RGB
    t.images = [
        ImageRecord(IHC[:, :224, :280].contiguous(), 0, "ihc.png", 0, (0.0, 0.0, 280.0, 224.0)),
        ImageRecord(IHC[:, 100:164, 200:296].contiguous(), 1, "ihc.png", 0, (200.0, 100.0, 296.0, 164.0), "zoom 1"),
        ImageRecord(gray[:, 50:150, 60:140].flip(1).contiguous(), 2, "camera.png", -1, (60.5, 50.25, 140.0, 150.0),
                    "rotated 180°"),
    ]
    calls = [
        [ToolCallRecord("zoom_in", {"bbox_2d": [200, 100, 296, 164], "label": "nuclei"}, True)],
        [ToolCallRecord("rotate", {"angle": 180}, True),
         ToolCallRecord("flip", {"direction": "diagonal"}, False, "direction must be one of up, left")],
        [],
    ]
    for k, turn_calls in enumerate(calls):
        start = len(t.token_ids)
        _sampled(t, rng, 40 + 10 * k, version=3 + k)
        t.turns.append(TurnRecord(f"<think>turn {k}</think>", "stop", 40 + 10 * k, start, 0.5 + k, 0.01 * k,
                                  turn_calls, observation="<tool_response>…</tool_response>" if turn_calls else "",
                                  retries=k % 2))
        if turn_calls:
            _observation(t, rng, 25)
    t.score, t.reward = 1.0, 1.35
    t.reward_parts = {"total": 1.35, "correct": 1.0, "format": 1.0, "tool": 0.5, "penalty": 0.15}
    return t


def failed_episode(rng: random.Random) -> Trajectory:
    t = _base("ep-error", 1, "error: policy failed", None)
    t.prompt_length = 120
    _observation(t, rng, 120)
    _sampled(t, rng, 7, version=2)
    t.images = [ImageRecord(IHC[:, :64, :64].contiguous(), 0, "ihc.png", 0, (0.0, 0.0, 64.0, 64.0))]
    t.turns = [TurnRecord("<tool_call>{\"name\": \"zoom", "abort", 7, 120, 30.0, retries=3)]
    return t


def timeout_episode(rng: random.Random) -> Trajectory:
    """A single-channel image (a raw scan slice) and a timeout mid-episode."""
    t = _base("ep-timeout", 2, "timeout", "")
    t.prompt_length = 80
    _observation(t, rng, 80)
    _sampled(t, rng, 12, version=5)
    t.images = [ImageRecord(CAMERA[200:296, 100:228].unsqueeze(0).contiguous(), 0, "ct.dcm", 0,
                            (100.0, 200.0, 228.0, 296.0))]
    zoom = ToolCallRecord("zoom_in", {"bbox_2d": [1, 2, 3, 4]}, True)
    t.turns = [TurnRecord("zoom", "stop", 12, 80, 2.0, 60.0, [zoom])]
    t.reward_parts = {"total": 0.0}
    return t


def text_only_episode(rng: random.Random) -> Trajectory:
    t = _base("ep-text", 3, "truncated", None)
    t.prompt_length = 50
    _observation(t, rng, 50)
    _sampled(t, rng, 64, version=7)
    t.turns = [TurnRecord("a very long answer", "length", 64, 50, 1.5)]
    t.reward, t.reward_parts = -0.1, {"total": -0.1, "penalty": 0.1}
    return t


def tiny(i: int) -> Trajectory:
    t = Trajectory(f"ep-{i:04d}", f"g-{i // 8}", i % 8, "t", "d", "q", "a", answer="a", reward=i / 600)
    t.append([1, 2, 3])
    t.append([i], logprobs=[-0.5], version=i)
    return t


@pytest.fixture(scope="module")
def trajectories() -> list[Trajectory]:
    rng = random.Random(0)
    return [zoom_episode(rng), failed_episode(rng), timeout_episode(rng), text_only_episode(rng)]


@pytest.fixture(scope="module")
def path(trajectories: list[Trajectory], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "trajectories.parquet"
    assert write_parquet(trajectories, path) == len(trajectories)
    return path


def assert_same(got: Trajectory, want: Trajectory) -> None:
    for f in fields(Trajectory):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name == "sampled":  # compared flat: adjacent runs read back as one
            assert (got.loss_mask, got.versions) == (want.loss_mask, want.versions)
            # stored as float32: equal to the float32 rounding of the original
            assert got.logprobs == np.asarray(want.logprobs, dtype=np.float32).tolist()
        elif f.name == "images":
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert x.pixels.dtype == torch.uint8 and torch.equal(x.pixels, y.pixels)
                assert all(getattr(x, g.name) == getattr(y, g.name) for g in fields(ImageRecord) if g.name != "pixels")
                assert isinstance(x.box, tuple)
        else:
            assert a == b, f.name


def test_round_trip_is_exact(path: Path, trajectories: list[Trajectory]) -> None:
    got = list(read_trajectories(path))
    assert len(got) == len(trajectories)
    for a, b in zip(got, trajectories):
        assert_same(a, b)
    assert got[0].model_tokens == trajectories[0].model_tokens and got[2].failure == "timeout"


def test_images_keep_their_channel_count(path: Path) -> None:
    shapes = [[tuple(image.pixels.shape) for image in t.images] for t in read_trajectories(path)]
    assert shapes == [[(3, 224, 280), (3, 64, 96), (3, 100, 80)], [(3, 64, 64)], [(1, 96, 128)], []]


def test_pyarrow_reads_the_file_with_the_schema(path: Path) -> None:
    table = pq.read_table(path)
    assert table.schema.equals(SCHEMA)
    assert table.column("status").to_pylist() == ["ok", "error: policy failed", "timeout", "truncated"]
    assert table.column("num_images").to_pylist() == [3, 1, 1, 0]


def test_pandas_reads_the_file_without_custom_code(path: Path, trajectories: list[Trajectory]) -> None:
    df = pd.read_parquet(path)
    assert list(df.columns) == SCHEMA.names
    assert df["sample"].dtype == np.int32 and df["model_tokens"].dtype == np.int32
    assert df["reward"].dtype == np.float64 and pd.api.types.is_string_dtype(df["episode_id"])
    assert df["answer"].isna().tolist() == [False, True, False, True]
    assert df["token_ids"][0].dtype == np.int32 and df["token_ids"][0].tolist() == trajectories[0].token_ids
    assert df["loss_mask"][0].dtype == np.int8 and df["logprobs"][0].dtype == np.float32
    assert {p["name"]: p["value"] for p in df["reward_parts"][0]} == trajectories[0].reward_parts
    call = df["turns"][0][1]["tool_calls"][1]
    assert json.loads(call["arguments_json"]) == {"direction": "diagonal"} and not call["ok"]
    for row, t in ((0, trajectories[0]), (2, trajectories[2])):
        cell, want = df["images"][row][0], t.images[0].pixels
        pixels = np.asarray(Image.open(io.BytesIO(cell["png"])))
        assert (cell["height"], cell["width"]) == tuple(want.shape[1:])
        assert np.array_equal(pixels, want.permute(1, 2, 0).squeeze(2).numpy())


def test_row_groups_are_written_and_read_as_a_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "many.parquet"
    assert write_parquet((tiny(i) for i in range(600)), path, row_group_size=256) == 600
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [256, 256, 88]

    reads: list[int] = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **kw: reads.append(i) or original(self, i, **kw))
    stream = read_trajectories(path)
    assert next(stream).episode_id == "ep-0000" and reads == [0]
    rest = list(stream)
    assert reads == [0, 1, 2]
    assert [t.episode_id for t in rest] == [f"ep-{i:04d}" for i in range(1, 600)]
    assert rest[-1].versions == [-1, -1, -1, 599]


def test_an_empty_iterable_writes_an_empty_file_with_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    assert write_parquet([], path) == 0
    assert pq.read_schema(path).equals(SCHEMA)
    assert list(read_trajectories(path)) == []
    df = pd.read_parquet(path)
    assert len(df) == 0 and list(df.columns) == SCHEMA.names


def test_writer_appends_and_closes_once(tmp_path: Path) -> None:
    path = tmp_path / "w.parquet"
    writer = TrajectoryWriter(path, row_group_size=2)
    writer.write(tiny(0))
    writer.write_many([tiny(1), tiny(2)])
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write(tiny(3))
    assert writer.rows == 3 and pq.ParquetFile(path).metadata.num_row_groups == 2
    assert [t.episode_id for t in read_trajectories(path)] == ["ep-0000", "ep-0001", "ep-0002"]


def test_writer_keeps_completed_rows_when_the_block_fails(tmp_path: Path) -> None:
    path = tmp_path / "w.parquet"
    bad = tiny(1)
    bad.images = [ImageRecord(torch.zeros(4, 8, 8, dtype=torch.uint8), 0, "x", 0, (0.0, 0.0, 8.0, 8.0))]
    with pytest.raises(ValueError, match=r"\(1 or 3, h, w\) uint8"), TrajectoryWriter(path) as writer:
        writer.write(tiny(0))
        writer.write(bad)
    assert [t.episode_id for t in read_trajectories(path)] == ["ep-0000"]


def test_misaligned_token_lists_are_refused(tmp_path: Path) -> None:
    t = tiny(0)
    t.sampled[-1][1].pop()  # a log-prob short of its run
    with pytest.raises(ValueError, match="ep-0000.*differ in length"):
        write_parquet([t], tmp_path / "x.parquet")


def test_missing_file_error_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.parquet"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        read_trajectories(path)


@pytest.mark.parametrize("content", [b"", b"definitely not parquet" * 10, "truncated"])
def test_corrupt_file_error_names_the_path(tmp_path: Path, path: Path, content: bytes | str) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(path.read_bytes()[:-100] if content == "truncated" else content)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        read_trajectories(bad)


def test_a_foreign_parquet_file_names_the_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "other.parquet"
    pd.DataFrame({"episode_id": ["x"], "score": [1.0]}).to_parquet(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*missing columns.*group_id"):
        read_trajectories(path)
