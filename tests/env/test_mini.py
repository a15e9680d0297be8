"""medvista-mini: deterministic build, sizes, real headers, and findings that need a zoom."""

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import torch

from medvistagym.env import EnvConfig, Episode, load_tasks
from medvistagym.env.datasets import DatasetError
from medvistagym.env.datasets.mini import build, ensure_built, findings
from medvistagym.env.datasets.mini.sources import MODALITY_NAMES
from medvistagym.env.evaluation import evaluate, summarize
from medvistagym.env.experts import OracleExpert, build_expert
from medvistagym.env.views import render_views
from medvistagym.kernels import crop_resize


@pytest.fixture(scope="module")
def root() -> Path:
    return ensure_built(progress=False)


@pytest.fixture(scope="module")
def train():
    return load_tasks("medvista-mini", "train")


@pytest.fixture(scope="module")
def test_split():
    return load_tasks("medvista-mini", "test")


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_builds_give_identical_files(root, tmp_path):
    again = build(tmp_path / "again", progress=False)
    assert _digests(again) == _digests(root)
    manifest = json.loads((root / "manifest.json").read_text())
    assert {f: d for f, d in _digests(root).items() if f != "manifest.json"} == manifest["files"]


def test_sizes_sources_and_modalities(train, test_split):
    assert len(train) >= 500 and len(test_split) >= 100
    for split in (train, test_split):
        assert len({t.metadata["source"] for t in split}) >= 8
        assert {t.metadata["modality"] for t in split} >= {
            "CT", "MRI", "X-ray", "ultrasound", "nuclear medicine", "pathology", "fundus photography"}
        assert set(Counter(t.answer_type.value for t in split)) == {"closed", "open", "multiple_choice"}
    assert not {t.id for t in train} & {t.id for t in test_split}
    assert not {t.images[0].path for t in train} & {t.images[0].path for t in test_split}


def test_answers_are_balanced(train):
    closed = Counter(t.answer for t in train if t.answer_type.value == "closed")
    assert 0.35 < closed["yes"] / sum(closed.values()) < 0.65
    letters = Counter(t.answer for t in train if t.answer_type.value == "multiple_choice")
    assert len(letters) == 4 and min(letters.values()) > 0.12 * sum(letters.values())


def test_local_questions_carry_their_region_and_global_ones_none(train, store):
    for task in train:
        if task.metadata["needs_zoom"]:
            (region,) = task.regions
            image = store.get(task.images[0])
            x1, y1, x2, y2 = region.box
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
            cx, cy = task.metadata["finding"]["center"]
            assert x1 < cx < x2 and y1 < cy < y2
        else:
            assert not task.regions


def test_global_answers_come_from_the_dicom_headers(train):
    checked = 0
    for task in train:
        meta = task.metadata
        if meta["question_kind"] != "modality" or meta["modality_from"] != "header:Modality":
            continue
        ds = pydicom.dcmread(task.images[0].path, stop_before_pixels=True)
        assert MODALITY_NAMES[ds.Modality] == meta["modality"]
        assert "DERIVED" in ds.ImageType and ds.BurnedInAnnotation == "YES"
        if meta["organ_from"] == "header:BodyPartExamined":
            assert meta["organ"] in ds.BodyPartExamined.lower().replace("pancreas", "abdomen")
        checked += 1
    assert checked > 50


def _template(shape: str, scale: float) -> torch.Tensor:
    """A finding as seen at `scale` shown pixels per case pixel, zero mean, unit norm."""
    mask = torch.from_numpy(findings.shape_mask(shape))[None]
    side = max(1, round(mask.shape[-1] * scale))
    t = crop_resize(mask, [(0, 0, mask.shape[-1], mask.shape[-1])], (side, side), mode="bicubic")[0][0]
    t = t - t.mean()
    return t / t.norm().clamp_min(1e-6)


def _read_shape(pixels: torch.Tensor, center: tuple[float, float], scale: float) -> str:
    """An ideal observer: the shape whose template correlates best near the known center."""
    gray = pixels.float().mean(0)
    best, best_shape = -2.0, ""
    for shape in findings.SHAPES:
        t = _template(shape, scale)
        side = t.shape[-1]
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                y0, x0 = round(center[1] - side / 2) + dy, round(center[0] - side / 2) + dx
                patch = gray[y0 : y0 + side, x0 : x0 + side]
                if patch.shape != t.shape:
                    continue
                patch = patch - patch.mean()
                ncc = float((patch * t).sum() / patch.norm().clamp_min(1e-6))
                if ncc > best:
                    best, best_shape = ncc, shape
    return best_shape


def test_findings_cannot_be_read_at_the_shown_size_but_can_after_the_oracle_zoom(train, store):
    config, oracle = EnvConfig(), OracleExpert()
    shapes = [t for t in train if t.metadata["question_kind"] == "finding_shape" and t.answer_type.value == "open"]
    assert len(shapes) >= 40
    shown_hits = zoom_hits = 0
    for task in shapes:
        episode = Episode(task, config, store)
        full = episode.start().views[0]
        zoom = episode.act(oracle.act(episode)).views[0]
        center = task.metadata["finding"]["center"]
        for view, hits in ((full, "shown"), (zoom, "zoom")):
            (pixels,) = render_views([view])
            x, y, _, _ = view.from_source((center[0] + 0.5, center[1] + 0.5, center[0] + 1, center[1] + 1))
            scale = view.grid[0] / (view.region[2] - view.region[0])
            correct = _read_shape(pixels, (x, y), scale) == task.answer
            shown_hits += correct and hits == "shown"
            zoom_hits += correct and hits == "zoom"
    n = len(shapes)
    assert zoom_hits / n >= 0.9, f"zoomed findings read correctly: {zoom_hits}/{n}"
    print(f"ideal observer: {shown_hits}/{n} read at the shown size, {zoom_hits}/{n} after the zoom")
    assert shown_hits / n <= 0.4, f"findings read at the shown size: {shown_hits}/{n} (chance 0.25)"


def test_oracle_scores_one_and_random_is_near_chance(test_split, store):
    oracle = evaluate(test_split, OracleExpert(), store=store, progress=False)
    assert all(r.score == 1.0 and r.status == "ok" for r in oracle)
    assert all(r.tool_calls == 1 for r in oracle if r.question_kind.startswith("finding"))
    random = evaluate(test_split, build_expert("random", test_split, seed=0), store=store, render=False, progress=False)
    rows = {row["group"]: row for row in summarize(random, "answer_type")}
    assert abs(rows["closed"]["score"] - 0.5) < 0.2
    assert abs(rows["multiple_choice"]["score"] - 0.25) < 0.15
    assert rows["open"]["score"] < 0.2


def test_missing_and_corrupt_files_are_named(root, tmp_path):
    copy = tmp_path / "mini"
    shutil.copytree(root, copy)
    (copy / "tasks-test.jsonl").write_text('{"id": "mini-test-0000-0"}\nnot json\n')
    with pytest.raises(DatasetError, match=r"tasks-test.jsonl: line 1: not a medvista-mini task"):
        load_tasks("medvista-mini", "test", copy)
    (copy / "tasks-test.jsonl").unlink()
    with pytest.raises(DatasetError, match="tasks-test.jsonl: file not found"):
        load_tasks("medvista-mini", "test", copy)
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        load_tasks("medvista-mini", "dev", copy)
