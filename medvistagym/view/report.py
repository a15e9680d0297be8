"""The trajectory report: one self-contained HTML file to look at episodes.

Rows come from the Parquet files `engine.export` writes, read with pyarrow directly rather
than through `read_trajectories`: the report needs neither the per-token columns (most of a
file's bytes) nor decoded pixels, and passing each image's stored PNG through unchanged keeps
it exact and costs no decode / re-encode. Every distinct image is embedded once (the n members
of a GRPO group share their question images), base64 in a JSON array; the episodes are a
second JSON array, and the page's script renders one page of them at a time, so only the
images on screen are ever decoded. Summary charts are inline SVG, drawn here.

Derived fields:
- correct: `score >= 0.5` (score is the benchmark's own metric).
- question type: trajectories do not store the task's `AnswerType`, so it is read off the
  gold answer: yes / no -> closed, one capital letter -> multiple choice (the gold of a
  multiple-choice task is its letter), anything else -> open.
- zoom boxes: `ImageRecord.box` is the region in source pixels; the question image of the same
  `task_image` (turn 0) is the whole source (`box` = (0, 0, W, H)) shown at its own size, so
  a box maps to shown pixels by the ratio of the shown size to that region, per axis. Tool
  images covering the whole source (rotate, flip, re-window the question image) are no zoom
  and get no box.
- captions: the engine leaves `ImageRecord.caption` empty; the observation text names every
  new image ("Image 3: zoom of image 0 at [...], 280x140 pixels."), so captions come from there.
- malformed calls: a call that does not parse (or another format error) leaves no tool-call
  record, only the error the environment sent back ("- tool call 1: not valid JSON ..." after
  "Your last turn could not be used:", or "error: ..." beside good calls), so those lines are
  read from the observation. The tool-call counts are of recorded calls.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import html
import io
import itertools
import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..engine.export import SCHEMA
from ..engine.metrics import failure_kind
from ..env.task import AnswerType

PathLike = str | os.PathLike[str]

CORRECT = 0.5  # score at or above which an answer counts as correct
PER_TOKEN = ("token_ids", "loss_mask", "logprobs", "versions")
COLUMNS = [name for name in SCHEMA.names if name not in PER_TOKEN]
CAPTION = re.compile(r"^Image (\d+): (.+), \d+x\d+ pixels\.$", re.MULTILINE)
ERROR = re.compile(r"^(?:- |error: )(.+)$", re.MULTILINE)
# Box area as a share of its source image, in percent: zooms spread over orders of magnitude.
AREA_BINS = (1, 2, 5, 10, 25, 50, 100)
HIST_CAP = 10  # histograms of counts put this many and more in one last bin


# --------------------------------------------------------------------------- reading


def read_rows(paths: Sequence[PathLike], *, limit: int | None = None, sample: int | None = None,
              seed: int = 0) -> Iterator[dict]:
    """Episode rows (without per-token columns) of `paths` in order, streamed: the first `limit`,
    then a uniform random `sample` of those (kept in file order)."""
    rows = _rows(paths)
    if limit is not None:
        rows = itertools.islice(rows, limit)
    return rows if sample is None else iter(_sample(rows, sample, seed))


def _sample(rows: Iterable[dict], size: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    kept: list[tuple[int, dict]] = []
    for i, row in enumerate(rows):  # reservoir sampling: holds `size` rows, never the file
        if i < size:
            kept.append((i, row))
        elif (j := rng.randrange(i + 1)) < size:
            kept[j] = (i, row)
    return [row for _, row in sorted(kept, key=lambda pair: pair[0])]


def _rows(paths: Sequence[PathLike]) -> Iterator[dict]:
    for path in paths:
        try:
            file = pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as error:
            raise ValueError(f"{path}: not a readable Parquet file ({error})") from error
        with file:
            missing = [name for name in COLUMNS if name not in file.schema_arrow.names]
            if missing:
                raise ValueError(f"{path}: not a trajectory file, missing columns {missing}")
            for batch in file.iter_batches(batch_size=256, columns=COLUMNS):
                yield from batch.to_pylist()


# --------------------------------------------------------------------------- episodes


class ImageTable:
    """Distinct images as base64 PNG, each stored once; `max_side` downscales larger ones
    (boxes are drawn in the shown image's coordinates, so they stay exact)."""

    def __init__(self, max_side: int | None = None) -> None:
        self.max_side = max_side
        self.data: list[str] = []
        self._index: dict[bytes, int] = {}

    def add(self, png: bytes) -> int:
        key = hashlib.blake2b(png, digest_size=16).digest()
        if key not in self._index:
            self._index[key] = len(self.data)
            self.data.append(base64.b64encode(self._fit(png)).decode("ascii"))
        return self._index[key]

    def _fit(self, png: bytes) -> bytes:
        if self.max_side is None:
            return png
        with Image.open(io.BytesIO(png)) as image:
            if max(image.size) <= self.max_side:
                return png
            image.thumbnail((self.max_side, self.max_side), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            image.save(out, format="PNG")
        return out.getvalue()


def question_type(gold: str) -> str:
    text = gold.strip()
    if text.lower().rstrip(".") in ("yes", "no"):
        return AnswerType.CLOSED.value
    if len(text) == 1 and text.isupper():
        return AnswerType.MULTIPLE_CHOICE.value
    return AnswerType.OPEN.value


def failure_reason(row: dict) -> str | None:
    """Why an episode is not correct; None when it is."""
    if _number(row["score"]) is not None and row["score"] >= CORRECT:
        return None
    status = row["status"]
    if status not in ("ok", "truncated"):
        return failure_kind(status)
    if row["answer"] is None:
        return "no answer (truncated)" if status == "truncated" else "no answer"
    return "wrong answer"


def _number(value: float | None, digits: int = 4) -> float | None:
    """JSON-safe (no NaN / inf) and short."""
    return round(value, digits) if value is not None and math.isfinite(value) else None


def shown_box(box: Sequence[float], base: dict) -> list[float] | None:
    """`box` (source pixels) in the shown pixels of `base`, the question image it was cut from;
    None when it covers the whole source (not a zoom)."""
    bx1, by1, bx2, by2 = base["box"]
    if bx2 <= bx1 or by2 <= by1:
        return None
    sx, sy = base["width"] / (bx2 - bx1), base["height"] / (by2 - by1)
    mark = [(box[0] - bx1) * sx, (box[1] - by1) * sy, (box[2] - bx1) * sx, (box[3] - by1) * sy]
    whole = [0.0, 0.0, float(base["width"]), float(base["height"])]
    if all(abs(a - b) < 0.5 for a, b in zip(mark, whole)):
        return None
    return [round(v, 2) for v in mark]


def _images(row: dict, table: ImageTable) -> list[dict]:
    bases = {im["task_image"]: im for im in row["images"] if im["turn"] == 0 and im["task_image"] >= 0}
    captions = {int(n): text for turn in row["turns"] for n, text in CAPTION.findall(turn["observation"] or "")}
    out = []
    for number, im in enumerate(row["images"]):  # the list index is the model's image number
        base = bases.get(im["task_image"]) if im["turn"] > 0 else None
        out.append({
            "ref": table.add(im["png"]),
            "turn": im["turn"],
            "task": im["task_image"],
            "w": im["width"],
            "h": im["height"],
            "source": im["source"],
            "caption": im["caption"] or captions.get(number, ""),
            "box": shown_box(im["box"], base) if base is not None else None,
        })
    return out


def _malformed(turn: dict) -> list[str]:
    """Errors the observation reports for no recorded call ("zoom_in: ..." is the record's own):
    calls that did not parse, and other format errors."""
    recorded = tuple(f"{call['name']}:" for call in turn["tool_calls"])
    return [line for line in ERROR.findall(turn["observation"] or "") if not line.startswith(recorded)]


def _turn(turn: dict) -> dict:
    return {
        "text": turn["text"],
        "finish": turn["finish_reason"],
        "tokens": turn["new_tokens"],
        "generate_s": _number(turn["generate_s"], 3),
        "tool_s": _number(turn["tool_s"], 3),
        "retries": turn["retries"],
        "observation": turn["observation"],
        "calls": [{"name": c["name"], "args": c["arguments_json"], "ok": c["ok"], "error": c["error"]}
                  for c in turn["tool_calls"]],
        "malformed": _malformed(turn),
    }


def episode(row: dict, table: ImageTable) -> dict:
    """One row as the page's script reads it; its images go into `table`."""
    turns = [_turn(turn) for turn in row["turns"]]
    reason = failure_reason(row)
    return {
        "id": row["episode_id"],
        "group": row["group_id"],
        "sample": row["sample"],
        "task": row["task_id"],
        "dataset": row["dataset"],
        "question": row["question"],
        "gold": row["gold"],
        "answer": row["answer"],
        "qtype": question_type(row["gold"]),
        "score": _number(row["score"]),
        "reward": _number(row["reward"]),
        "correct": reason is None,
        "reason": reason,
        "status": row["status"],
        "state": row["status"].split(":", 1)[0],
        "parts": [[p["name"], _number(p["value"])] for p in row["reward_parts"]],
        "tool_calls": sum(len(t["calls"]) for t in turns),
        "seconds": _number(row["ended_s"] - row["started_s"], 2),
        "images": _images(row, table),
        "turns": turns,
    }


# --------------------------------------------------------------------------- summary


def _accuracy(episodes: Sequence[dict], key: str) -> list[dict]:
    groups: dict[str, list[bool]] = {}
    for ep in episodes:
        groups.setdefault(ep[key], []).append(ep["correct"])
    return [{"name": name, "episodes": len(hits), "correct": sum(hits), "accuracy": sum(hits) / len(hits)}
            for name, hits in sorted(groups.items())]


def _histogram(values: Iterable[int]) -> list[tuple[str, int]]:
    counts = Counter(min(v, HIST_CAP) for v in values)
    top = max(counts, default=0)
    return [(f"{k}+" if k == HIST_CAP else str(k), counts.get(k, 0)) for k in range(top + 1)]


def _area_bins(percents: Iterable[float]) -> list[tuple[str, int]]:
    counts = Counter(min(bisect.bisect_left(AREA_BINS, p), len(AREA_BINS) - 1) for p in percents)
    lows = (0,) + AREA_BINS[:-1]
    return [(f"{lo}–{hi}%", counts.get(i, 0)) for i, (lo, hi) in enumerate(zip(lows, AREA_BINS))]


def _box_percents(ep: dict) -> Iterator[float]:
    bases = {im["task"]: im for im in ep["images"] if im["turn"] == 0}
    for im in ep["images"]:
        base = bases.get(im["task"])
        if im["box"] is not None and base is not None:
            x1, y1, x2, y2 = im["box"]
            yield 100 * (x2 - x1) * (y2 - y1) / (base["w"] * base["h"])


def _tool_error(error: str) -> str:
    """Tool errors grouped by kind: numbers (boxes, indexes) blanked."""
    return re.sub(r"-?\d+(\.\d+)?", "#", error)[:90]


def summarize(episodes: Sequence[dict]) -> dict[str, Any]:
    """The numbers behind the summary panels."""
    n, per = len(episodes), max(len(episodes), 1)
    turns = [t for ep in episodes for t in ep["turns"]]
    calls = [c for t in turns for c in t["calls"]]
    errors = [c["error"] for c in calls if not c["ok"]] + [e for t in turns for e in t["malformed"]]
    tools: dict[str, Counter] = {}
    for c in calls:
        tools.setdefault(c["name"], Counter())["ok" if c["ok"] else "failed"] += 1
    return {
        "episodes": n,
        "correct": sum(ep["correct"] for ep in episodes),
        "accuracy": sum(ep["correct"] for ep in episodes) / per,
        "mean_reward": sum(ep["reward"] or 0.0 for ep in episodes) / per,
        "mean_tool_calls": len(calls) / per,
        "mean_turns": len(turns) / per,
        "by_dataset": _accuracy(episodes, "dataset"),
        "by_qtype": _accuracy(episodes, "qtype"),
        "status": dict(Counter(ep["state"] for ep in episodes).most_common()),
        "tool_calls": _histogram(ep["tool_calls"] for ep in episodes),
        "tools": {name: dict(c) for name, c in sorted(tools.items(), key=lambda kv: -sum(kv[1].values()))},
        "box_area": _area_bins(p for ep in episodes for p in _box_percents(ep)),
        "turns": _histogram(len(ep["turns"]) for ep in episodes),
        "failures": dict(Counter(ep["reason"] for ep in episodes if ep["reason"]).most_common()),
        "tool_errors": dict(Counter(_tool_error(e) for e in errors).most_common(8)),
    }


# --------------------------------------------------------------------------- charts

BAR_W, ROW_H, CHAR_W = 220, 22, 6.2  # CHAR_W: about one character of the charts' 11 px font


def _hbars(rows: Sequence[tuple[str, Sequence[tuple[float, str]], str]], scale: float | None = None,
           label_chars: int = 24) -> str:
    """Horizontal bars: (label, [(value, css class) segments], note) per row; labels longer than
    `label_chars` are cut (the whole label is the tooltip)."""
    if not rows:
        return '<p class="empty">none</p>'
    scale = scale or max(sum(v for v, _ in segments) for _, segments, _ in rows) or 1.0
    label_w = round(CHAR_W * label_chars) + 6
    width, parts = label_w + BAR_W + 90, []
    for i, (label, segments, note) in enumerate(rows):
        y, x = i * ROW_H, label_w
        parts.append(f'<text class="label" x="{label_w - 6}" y="{y + 15}">{html.escape(label[:label_chars])}'
                     f'<title>{html.escape(label)}</title></text>')
        for value, css in segments:
            w = BAR_W * value / scale
            parts.append(f'<rect class="{css}" x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="{ROW_H - 8}"/>')
            x += w
        parts.append(f'<text class="note" x="{x + 5:.1f}" y="{y + 15}">{html.escape(note)}</text>')
    return f'<svg class="chart" viewBox="0 0 {width} {len(rows) * ROW_H}" width="{width}">{"".join(parts)}</svg>'


def _columns(bins: Sequence[tuple[str, int]], unit: str) -> str:
    """A histogram: one column per (label, count)."""
    if not any(count for _, count in bins):
        return '<p class="empty">none</p>'
    top, height = max(count for _, count in bins), 120
    col = max(30, 7 * max(len(label) for label, _ in bins) + 8)  # labels must not run into each other
    parts = []
    for i, (label, count) in enumerate(bins):
        h, x = height * count / top, 10 + i * col
        parts.append(f'<rect class="bar" x="{x}" y="{height - h + 14:.1f}" width="{col - 6}" height="{h:.1f}">'
                     f'<title>{count} {unit}</title></rect>'
                     f'<text class="count" x="{x + (col - 6) / 2}" y="{height - h + 10:.1f}">{count}</text>'
                     f'<text class="tick" x="{x + (col - 6) / 2}" y="{height + 28}">{html.escape(label)}</text>')
    width = 20 + len(bins) * col
    return f'<svg class="chart" viewBox="0 0 {width} {height + 34}" width="{width}">{"".join(parts)}</svg>'


def _accuracy_bars(rows: Sequence[dict]) -> str:
    return _hbars([(r["name"], [(r["accuracy"], "bar")], f'{100 * r["accuracy"]:.1f}% of {r["episodes"]}')
                   for r in rows], scale=1.0)


def _count_bars(counts: dict[str, int], css: str = "bar", label_chars: int = 24) -> str:
    return _hbars([(name, [(count, css)], str(count)) for name, count in counts.items()], label_chars=label_chars)


def panels(summary: dict[str, Any]) -> str:
    """The summary panels as HTML with inline SVG charts."""
    tools = [(name, [(c.get("ok", 0), "bar"), (c.get("failed", 0), "bad")],
              f'{c.get("ok", 0)} ok, {c.get("failed", 0)} failed') for name, c in summary["tools"].items()]
    charts = [
        ("Accuracy by dataset", _accuracy_bars(summary["by_dataset"])),
        ("Accuracy by question type", _accuracy_bars(summary["by_qtype"])),
        ("Tool calls per episode", _columns(summary["tool_calls"], "episodes")),
        ("Tool calls by tool", _hbars(tools)),
        ("Zoom box size (share of image area)", _columns(summary["box_area"], "boxes")),
        ("Turns per episode", _columns(summary["turns"], "episodes")),
        ("Why episodes are not correct", _count_bars(summary["failures"], "bad")),
        ("Tool-call and format errors", _count_bars(summary["tool_errors"], "bad", label_chars=60)),
    ]
    return "".join(f'<figure class="panel"><figcaption>{title}</figcaption>{svg}</figure>' for title, svg in charts)


def headline(summary: dict[str, Any]) -> str:
    stats = [
        ("episodes", str(summary["episodes"])),
        ("accuracy", f'{100 * summary["accuracy"]:.1f}%'),
        ("mean reward", f'{summary["mean_reward"]:.3f}'),
        ("tool calls / episode", f'{summary["mean_tool_calls"]:.2f}'),
        ("turns / episode", f'{summary["mean_turns"]:.2f}'),
    ] + [(f"status {name}", str(count)) for name, count in summary["status"].items()]
    return "".join(f'<div class="stat"><b>{html.escape(value)}</b><span>{html.escape(name)}</span></div>'
                   for name, value in stats)


# --------------------------------------------------------------------------- the file


def _json(value: Any) -> str:
    """JSON safe inside <script>: every "<" escaped, so no text can close the element."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def render_html(episodes: Sequence[dict], images: Sequence[str], *, title: str) -> str:
    summary = summarize(episodes)
    parts = {
        "title": html.escape(title),
        "headline": headline(summary),
        "panels": panels(summary),
        "episodes": _json(list(episodes)),
        "images": _json(list(images)),
    }
    template = resources.files(__package__).joinpath("template.html").read_text(encoding="utf-8")
    # One pass, so placeholder-like text inside the data is never substituted.
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], template)


@dataclass
class Report:
    path: str
    episodes: int
    images: int
    bytes: int


def build_report(paths: Sequence[PathLike], output: PathLike, *, limit: int | None = None,
                 sample: int | None = None, seed: int = 0, max_image_side: int | None = None,
                 title: str | None = None) -> Report:
    """Read the trajectories in `paths` and write the report to `output`."""
    table = ImageTable(max_image_side)
    episodes = [episode(row, table) for row in read_rows(paths, limit=limit, sample=sample, seed=seed)]
    title = title or "Trajectories: " + ", ".join(os.path.basename(os.fspath(p)) for p in paths)
    with open(output, "w", encoding="utf-8") as out:
        out.write(render_html(episodes, table.data, title=title))
    return Report(os.fspath(output), len(episodes), len(table.data), os.path.getsize(output))
