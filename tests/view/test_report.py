"""The trajectory report without a browser: boxes mapped to shown pixels, derived fields, the
summary numbers, images embedded exactly and once, the HTML safe and self-contained, reading
(limit, sample, bad files) and the `view` command."""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data

from medvistagym.engine.export import write_parquet
from medvistagym.engine.trajectory import ImageRecord, ToolCallRecord, Trajectory, TurnRecord
from medvistagym.view import build_report, summarize
from medvistagym.view.cli import add_arguments, run
from medvistagym.view.report import (
    ImageTable, episode, failure_reason, panels, question_type, read_rows, render_html, shown_box,
)

CAMERA = data.camera()[:384]  # a 512x384 grayscale source
ASTRONAUT = data.astronaut()  # a 512x512 RGB source
OUTSIDE = "zoom_in: box [600, 1, 700, 90] is outside image 0"
MALFORMED = "tool call 1: not valid JSON (Expecting ',' delimiter at line 1 column 65)"
HOSTILE = "Is it </script><script>window.pwned = 1</script> {{images}} <!-- ?"


def shown(source: np.ndarray, size: tuple[int, int], box: tuple[float, ...] | None = None) -> torch.Tensor:
    """`box` of `source` (all of it by default) resized to `size` (w, h), as (C, h, w) uint8."""
    image = Image.fromarray(source).resize(size, Image.Resampling.BICUBIC, box=box)
    pixels = torch.from_numpy(np.array(image))
    return pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1).contiguous()


def zoom(source: np.ndarray, box: tuple[float, float, float, float], turn: int, task_image: int = 0) -> ImageRecord:
    return ImageRecord(shown(source, (112, 84), box), turn, "camera.png", task_image, box)


def question(source: np.ndarray, size: tuple[int, int], task_image: int = 0, name: str = "camera.png") -> ImageRecord:
    h, w = source.shape[:2]
    return ImageRecord(shown(source, size), 0, name, task_image, (0.0, 0.0, float(w), float(h)))


def call_turn(text: str, calls: list[ToolCallRecord], first_image: int = 0, images: int = 0) -> TurnRecord:
    observation = "\n".join(f"Image {first_image + i}: zoom of image 0 at [1.0, 2.0, 3.0, 4.0], 112x84 pixels.\n<image>"
                            for i in range(images))
    return TurnRecord(text, "stop", 30, 400, 0.4, 0.01, calls, observation=observation)


def zooming(episode_id: str, sample: int, answer: str, score: float) -> Trajectory:
    """Camera shown at 224x168 (0.4375 of the source), zooms in turns 1 and 2, a rotate in turn 3."""
    t = Trajectory(episode_id, "g-cam", sample, "cam", "slake", "Is there a lesion?", "yes", answer=answer,
                   score=score, reward=score + 1.0, reward_parts={"correct": score, "format": 1.0},
                   started_s=10.0, ended_s=12.5)
    t.images = [
        question(CAMERA, (224, 168)),
        zoom(CAMERA, (64.0, 32.0, 320.0, 224.0), 1),
        zoom(CAMERA, (0.0, 0.0, 128.0, 96.0), 2),
        zoom(CAMERA, (256.0, 192.0, 512.0, 384.0), 2),
        ImageRecord(shown(CAMERA, (224, 168)).flip(-1).contiguous(), 3, "camera.png", 0, (0.0, 0.0, 512.0, 384.0)),
    ]
    t.turns = [
        call_turn("<think>look</think><tool_call>…</tool_call>",
                  [ToolCallRecord("zoom_in", {"bbox_2d": [28, 14, 140, 98]}, True)], 1, 1),
        call_turn("<tool_call>…</tool_call>", [ToolCallRecord("zoom_in_multi", {"bboxes": []}, True),
                                                ToolCallRecord("zoom_in", {"bbox_2d": [600, 1, 700, 90]}, False,
                                                               OUTSIDE)], 2, 2),
        call_turn("<tool_call>…</tool_call>", [ToolCallRecord("flip", {"direction": "horizontal"}, True)]),
        TurnRecord(f"<answer>{answer}</answer>", "stop", 8, 900, 0.1),
    ]
    t.turns[1].observation += f"\nerror: {OUTSIDE}"  # the refused call: it has its record
    t.turns[2].observation = "Image 4: image 0 flipped horizontally, 224x168 pixels.\n<image>"
    return t


@pytest.fixture(scope="module")
def trajectories() -> list[Trajectory]:
    right = zooming("cam-0", 0, "yes", 1.0)
    wrong = zooming("cam-1", 1, "no", 0.0)
    failed = Trajectory("ast-0", "g-ast", 0, "ast", "pathvqa", "Which stain?", "B", status="error: policy: server down")
    failed.images = [question(ASTRONAUT, (224, 224), name="astronaut.png")]
    two = Trajectory("two-0", "g-two", 0, "two", "vqa-rad", HOSTILE, "left lung", status="truncated",
                     reward_parts={"correct": 0.0, "format": float("nan")})
    two.images = [question(CAMERA, (224, 168)), question(ASTRONAUT, (112, 112), 1, "astronaut.png"),
                  zoom(ASTRONAUT, (256.0, 0.0, 512.0, 256.0), 1, task_image=1),
                  zoom(ASTRONAUT, (0.0, 0.0, 32.0, 32.0), 1, task_image=-1)]
    two.turns = [call_turn("<tool_call>…</tool_call>", [ToolCallRecord("zoom_in", {}, True),
                                                        ToolCallRecord("zoom_in", {}, True)], 2, 2),
                 call_turn("<tool_call>{\"name\": \"zoom_in\"</tool_call>", [])]
    two.turns[1].observation = f"Your last turn could not be used:\n- {MALFORMED}"  # no tool-call record
    return [right, wrong, failed, two]


@pytest.fixture(scope="module")
def path(trajectories: list[Trajectory], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("view") / "trajectories.parquet"
    write_parquet(trajectories, path)
    return path


@pytest.fixture(scope="module")
def episodes(path: Path) -> tuple[list[dict], ImageTable]:
    table = ImageTable()
    return [episode(row, table) for row in read_rows([path])], table


def test_boxes_go_from_source_pixels_to_the_shown_question_image() -> None:
    base = {"box": [0.0, 0.0, 512.0, 384.0], "width": 224, "height": 168}
    assert shown_box((64.0, 32.0, 320.0, 224.0), base) == [28.0, 14.0, 140.0, 98.0]
    assert shown_box((0.0, 0.0, 512.0, 384.0), base) is None  # the whole image: no zoom
    stretched = {"box": [0.0, 0.0, 640.0, 480.0], "width": 320, "height": 480}  # per-axis scales
    assert shown_box((64.0, 48.0, 128.0, 96.0), stretched) == [32.0, 48.0, 64.0, 96.0]


def test_every_image_keeps_its_number_turn_and_box(episodes: tuple[list[dict], ImageTable]) -> None:
    eps, _ = episodes
    right = eps[0]
    assert [(im["turn"], im["box"]) for im in right["images"]] == [
        (0, None), (1, [28.0, 14.0, 140.0, 98.0]), (2, [0.0, 0.0, 56.0, 42.0]), (2, [112.0, 84.0, 224.0, 168.0]),
        (3, None),
    ]
    assert right["images"][1]["caption"] == "zoom of image 0 at [1.0, 2.0, 3.0, 4.0]"
    assert right["images"][4]["caption"] == "image 0 flipped horizontally"
    two = eps[3]
    # Boxes land on the question image they were cut from, at that image's shown scale (112/512).
    assert two["images"][2]["task"] == 1 and two["images"][2]["box"] == [56.0, 0.0, 112.0, 56.0]
    assert two["images"][3]["box"] is None  # not cut from a task image: nowhere to draw it
    assert [t["malformed"] for t in two["turns"]] == [[], [MALFORMED]]
    assert [t["malformed"] for t in right["turns"]] == [[], [], [], []]


def test_derived_fields() -> None:
    assert [question_type(g) for g in ("yes", " No.", "B", "left lung", "b")] == [
        "closed", "closed", "multiple_choice", "open", "open"]
    row = {"score": 0.0, "status": "ok", "answer": "no"}
    assert failure_reason({**row, "score": 0.5}) is None
    assert failure_reason(row) == "wrong answer"
    assert failure_reason({**row, "answer": None}) == "no answer"
    assert failure_reason({**row, "answer": None, "status": "truncated"}) == "no answer (truncated)"
    assert failure_reason({**row, "status": "error: engine: ValueError: x"}) == "error: engine"
    assert failure_reason({**row, "status": "timeout", "score": 1.0}) is None  # the answer was scored right


def test_summary_numbers(episodes: tuple[list[dict], ImageTable]) -> None:
    s = summarize(episodes[0])
    assert (s["episodes"], s["correct"], s["accuracy"]) == (4, 1, 0.25)
    assert [(r["name"], r["episodes"], r["correct"]) for r in s["by_dataset"]] == [
        ("pathvqa", 1, 0), ("slake", 2, 1), ("vqa-rad", 1, 0)]
    assert {r["name"]: r["episodes"] for r in s["by_qtype"]} == {"closed": 2, "multiple_choice": 1, "open": 1}
    assert s["status"] == {"ok": 2, "error": 1, "truncated": 1}
    assert s["tool_calls"] == [("0", 1), ("1", 0), ("2", 1), ("3", 0), ("4", 2)]
    assert s["turns"] == [("0", 1), ("1", 0), ("2", 1), ("3", 0), ("4", 2)]
    assert s["tools"] == {"zoom_in": {"ok": 4, "failed": 2}, "zoom_in_multi": {"ok": 2}, "flip": {"ok": 2}}
    # Zoom boxes as a share of their image: 25%, 6.25%, 25% per camera episode, 25% on the astronaut.
    assert s["box_area"] == [("0–1%", 0), ("1–2%", 0), ("2–5%", 0), ("5–10%", 2), ("10–25%", 5), ("25–50%", 0),
                             ("50–100%", 0)]
    assert s["failures"] == {"wrong answer": 1, "error: policy": 1, "no answer (truncated)": 1}
    assert s["tool_errors"] == {"zoom_in: box [#, #, #, #] is outside image #": 2,
                                "tool call #: not valid JSON (Expecting ',' delimiter at line # column #)": 1}
    html = panels(s)
    assert html.count("<figure") == 8 and "vqa-rad" in html and "50.0% of 2" in html


def test_images_are_embedded_exactly_and_once(episodes: tuple[list[dict], ImageTable], path: Path) -> None:
    eps, table = episodes
    # Both camera episodes and the two-image one show the same question image: stored once.
    refs = [im["ref"] for ep in eps for im in ep["images"]]
    assert len(refs) == 15 and len(table.data) == 9 == len(set(refs))
    assert eps[0]["images"][0]["ref"] == eps[1]["images"][0]["ref"] == eps[3]["images"][0]["ref"]
    stored = pq.read_table(path, columns=["images"]).column("images").to_pylist()
    for ep, row in zip(eps, stored):
        for im, cell in zip(ep["images"], row):
            assert base64.b64decode(table.data[im["ref"]]) == cell["png"]  # the stored PNG, unchanged


def test_max_image_side_downscales_but_keeps_boxes(path: Path) -> None:
    table = ImageTable(max_side=100)
    eps = [episode(row, table) for row in read_rows([path])]
    sizes = {Image.open(io.BytesIO(base64.b64decode(b))).size for b in table.data}
    assert max(max(size) for size in sizes) == 100 and (100, 75) in sizes  # 224x168, aspect kept
    assert eps[0]["images"][1]["box"] == [28.0, 14.0, 140.0, 98.0] and eps[0]["images"][0]["w"] == 224


def scripts(text: str) -> list[str]:
    return re.findall(r"<script[^>]*>(.*?)</script>", text, re.DOTALL)


def test_html_is_self_contained_and_data_cannot_escape(episodes: tuple[list[dict], ImageTable]) -> None:
    eps, table = episodes
    text = render_html(eps, table.data, title="a <b> title")
    blocks = scripts(text)
    assert len(blocks) == 3  # episodes, images, the page's script: nothing injected
    assert json.loads(blocks[0]) == eps
    assert eps[3]["parts"] == [["correct", 0.0], ["format", None]]  # NaN is no JSON
    assert json.loads(blocks[0])[3]["question"] == HOSTILE  # placeholders in data stay data
    assert json.loads(blocks[1]) == table.data
    assert "<title>a &lt;b&gt; title</title>" in text
    # No network: the only URL is the SVG namespace, which names and fetches nothing.
    assert set(re.findall(r"https?://[^\s\"')]+", text)) == {"http://www.w3.org/2000/svg"}
    assert "<link" not in text and "@import" not in text
    assert re.findall(r"\{\{\w+\}\}", text) == ["{{images}}"]  # the one in the question


def test_limit_and_sample(tmp_path: Path) -> None:
    rows = [Trajectory(f"ep-{i:03d}", "g", i, "t", "d", "q", "yes") for i in range(300)]
    path = tmp_path / "many.parquet"
    write_parquet(rows, path, row_group_size=64)

    def ids(paths: int = 1, **kwargs: int) -> list[str]:
        return [row["episode_id"] for row in read_rows([path] * paths, **kwargs)]

    assert ids(2) == [f"ep-{i:03d}" for i in range(300)] * 2
    assert ids(limit=5) == [f"ep-{i:03d}" for i in range(5)]
    assert ids(2, limit=302)[-2:] == ["ep-000", "ep-001"]
    sample = ids(sample=20, seed=1)  # in file order
    assert len(set(sample)) == 20 and sample == sorted(sample) and sample != ids(limit=20)
    assert sample == ids(sample=20, seed=1) != ids(sample=20, seed=2)
    assert ids(limit=300, sample=400) == ids(limit=300)


def test_files_that_are_not_trajectories(tmp_path: Path) -> None:
    text = tmp_path / "notes.parquet"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.parquet: not a readable Parquet file"):
        list(read_rows([text]))
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1]}), other)
    with pytest.raises(ValueError, match="other.parquet: not a trajectory file, missing columns"):
        list(read_rows([other]))


def command(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_view_command(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report.html"
    assert run(command(str(path.parent / "*.parquet"), "-o", str(out), "--limit", "3")) == 0
    assert "3 episodes, 6 distinct images" in capsys.readouterr().out
    assert out.stat().st_size > 10_000 and "trajectories.parquet" in out.read_text()
    assert run(command(str(tmp_path / "nothing-*.parquet"), "-o", str(out))) == 2
    assert "no trajectory file at" in capsys.readouterr().err
    assert run(command(str(path), "--sample", "0")) == 2
    assert "--sample must be positive" in capsys.readouterr().err


def test_an_empty_file_gives_an_empty_report(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    write_parquet([], path)
    report = build_report([path], tmp_path / "empty.html")
    assert (report.episodes, report.images) == (0, 0)
    assert scripts((tmp_path / "empty.html").read_text())[:2] == ["[]", "[]"]
