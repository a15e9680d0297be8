"""Build medvista-mini: cases cut from real images, a faint finding, questions.

Deterministic: every random choice comes from a generator seeded by (seed,
split, case), and files are written without timestamps, so two builds give
identical bytes. DICOM sources stay DICOM (their header, full depth, deflated);
photographs become PNG.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pydicom
import torch
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from ....kernels import crop_resize
from ...images import SourceImage, Window
from . import findings
from .questions import case_questions
from .sources import SOURCES, SourceFacts, SourceSpec, load_source, source_facts

VERSION = 1
SPLIT_CASES = {"train": 110, "test": 22}  # five questions a case: 550 / 110 tasks
CASE_AREA = 500_000  # ~10x the area shown by default (64*28*28): a ~3.2x linear reduction
FINDING_CONTRAST = 0.3  # finding ink per lit pixel, as a fraction of the display window
_SPLIT_CODES = {"train": 0, "test": 1}


@dataclass
class Case:
    values: torch.Tensor  # (C, H, W) float32, the source's units (uint8 scale for photographs)
    window: Window | None
    region: tuple[float, float, float, float]
    finding: dict[str, Any]
    pixel_scale: float  # source pixels per case pixel


def _display(values: torch.Tensor, window: Window | None, invert: bool) -> torch.Tensor:
    """(H, W) display intensity in [0, 1]."""
    if window is None:
        return values.mean(0) / 255.0
    center, width = window
    shown = ((values[0] - (center - width / 2)) / width).clamp(0, 1)
    return 1 - shown if invert else shown


def _case_window(spec: SourceSpec, image: SourceImage) -> Window | None:
    if "window" in spec.curated:
        center, width = (float(v) for v in spec.curated["window"].split(","))
        return center, width
    return image.window


def make_case(spec: SourceSpec, image: SourceImage, rng: np.random.Generator) -> Case:
    """Crop a random field of view, resample it to CASE_AREA, add a finding and its marker."""
    frac = rng.uniform(0.75, 1.0)
    cw, ch = image.width * frac, image.height * frac
    x0, y0 = rng.uniform(0, image.width - cw), rng.uniform(0, image.height - ch)
    scale = math.sqrt(CASE_AREA / (cw * ch))
    size = (round(ch * scale), round(cw * scale))
    # The torch reference: the data set must not depend on which back end a machine can build.
    values = crop_resize([image.pixels], [(x0, y0, x0 + cw, y0 + ch)], [size], mode="bicubic",
                         out_dtype=torch.float32, backend="torch")[0]
    window = _case_window(spec, image) if image.channels == 1 else None
    display = _display(values, window, image.invert)

    radius = findings.MARKER_RADIUS
    margin = int(math.ceil(radius * 4 / 3 + findings.MARKER_WIDTH + 2))
    cx, cy = findings.pick_location(display, rng, margin)
    if rng.random() < 0.5:
        finding = {"kind": "shape", "shape": findings.SHAPES[int(rng.integers(len(findings.SHAPES)))]}
        mask = findings.shape_mask(finding["shape"])
    else:
        finding = {"kind": "count", "count": int(findings.COUNTS[int(rng.integers(len(findings.COUNTS)))])}
        mask = findings.dots_mask(finding["count"], float(rng.uniform(0, 2 * math.pi)))
    if window is None:
        delta, marker = torch.full((3,), FINDING_CONTRAST * 255.0), torch.tensor([0.0, 255.0, 0.0])
    else:
        sign = -1.0 if image.invert else 1.0
        delta = torch.tensor([sign * FINDING_CONTRAST * window[1]])
        marker = torch.tensor([window[0] + sign * window[1] / 2])
    findings.paste(values, mask, (cx, cy), delta)

    angle, offset = rng.uniform(0, 2 * math.pi), rng.uniform(0, radius / 3)
    mx, my = cx + offset * math.cos(angle), cy + offset * math.sin(angle)
    findings.blend(values, findings.ring_mask(radius, findings.MARKER_WIDTH), (mx, my), marker)
    half = radius + findings.MARKER_WIDTH / 2 + 1
    h, w = values.shape[-2:]
    region = (max(mx - half, 0.0), max(my - half, 0.0), min(mx + half, float(w)), min(my + half, float(h)))
    finding.update(center=[round(cx, 1), round(cy, 1)], contrast=FINDING_CONTRAST)
    return Case(values, window, tuple(round(v, 2) for v in region), finding, 1 / scale)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- writing


def _stored_range(header: pydicom.Dataset) -> tuple[int, int, np.dtype]:
    bits = int(header.get("BitsStored", 16))
    if int(header.get("PixelRepresentation", 0)):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1, np.dtype("<i2")
    return 0, (1 << bits) - 1, np.dtype("<u2")


def _clean_header(header: pydicom.Dataset, uid_parts: list[str]) -> pydicom.Dataset:
    ds = copy.deepcopy(header)
    for tag in [t for t in ds.keys() if 0x6000 <= t.group <= 0x60FF]:  # overlays would not match the crop
        del ds[tag]
    for keyword in ("IconImageSequence", "NumberOfFrames", "FrameIncrementPointer", "PixelData", "WindowCenterWidthExplanation"):
        if keyword in ds:
            delattr(ds, keyword)
    uid = generate_uid(entropy_srcs=["medvista-mini", str(VERSION), *uid_parts])
    ds.SOPInstanceUID = uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["medvista-mini-series", str(VERSION), *uid_parts])
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = "medvista-mini: cropped and resampled; a synthetic faint finding and a circle marker added"
    ds.BurnedInAnnotation = "YES"
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds


def write_dicom(path: Path, header: pydicom.Dataset, case: Case, uid_parts: list[str]) -> None:
    ds = _clean_header(header, uid_parts)
    h, w = case.values.shape[-2:]
    ds.Rows, ds.Columns = h, w
    if "PixelSpacing" in ds:
        ds.PixelSpacing = [round(float(v) * case.pixel_scale, 6) for v in ds.PixelSpacing]
    if case.window is None:  # colour (ultrasound screenshot)
        pixels = case.values.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.add_new(0x7FE00010, "OB", pixels.tobytes())
    else:
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        low, high, dtype = _stored_range(ds)
        stored = ((case.values[0].double() - intercept) / slope).round().clamp(low, high).numpy().astype(dtype)
        ds.SamplesPerPixel, ds.BitsAllocated, ds.HighBit = 1, 16, int(ds.get("BitsStored", 16)) - 1
        ds.WindowCenter, ds.WindowWidth = round(case.window[0], 3), round(case.window[1], 3)
        ds.add_new(0x7FE00010, "OW", stored.tobytes())
    ds.save_as(path, enforce_file_format=True)


def write_png(path: Path, case: Case) -> None:
    from PIL import Image

    pixels = case.values.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(pixels).save(path, format="PNG", optimize=False)


# --------------------------------------------------------------------------- tasks


def _task_rows(split: str, case_index: int, file: str, spec: SourceSpec, facts: SourceFacts, case: Case,
               rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for q, item in enumerate(case_questions(rng, facts, case.finding)):
        needs_zoom = item["needs_zoom"]
        yield {
            "id": f"mini-{split}-{case_index:04d}-{q}",
            "image": file,
            "question": item["question"],
            "answer": item["answer"],
            "answer_type": item["form"],
            "choices": item["choices"],
            "region": list(case.region) if needs_zoom else None,
            "metadata": {
                "question_kind": item["kind"],
                "needs_zoom": needs_zoom,
                "answer_aliases": item["aliases"],
                "modality": facts.modality,
                "modality_from": facts.modality_from,
                "organ": facts.body_part,
                "organ_from": facts.body_part_from,
                "view": facts.view,
                "source": spec.name,
                "source_file": spec.file,
                "case": f"{split}-{case_index:04d}",
                "finding": case.finding if needs_zoom else None,
            },
        }


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def build(root: Path, seed: int = 0, progress: bool = True) -> Path:
    """Write medvista-mini to `root` (replaced if present); returns `root`."""
    from tqdm import tqdm

    tmp = root.with_name(root.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    loaded = [(spec, *load_source(spec)) for spec in SOURCES]
    counts: dict[str, int] = {}
    total = sum(SPLIT_CASES.values())
    with tqdm(total=total, desc="building medvista-mini", unit="case", disable=not progress) as bar:
        for split, n_cases in SPLIT_CASES.items():
            rows = []
            for case_index in range(n_cases):
                spec, image, header = loaded[case_index % len(loaded)]
                rng = np.random.default_rng([seed, _SPLIT_CODES[split], case_index])
                case = make_case(spec, image, rng)
                name = f"images/{split}-{case_index:04d}.{'dcm' if header is not None else 'png'}"
                if header is not None:
                    write_dicom(tmp / name, header, case, [str(seed), split, str(case_index)])
                else:
                    write_png(tmp / name, case)
                rows.extend(_task_rows(split, case_index, name, spec, source_facts(spec, image), case, rng))
                bar.update()
            with open(tmp / f"tasks-{split}.jsonl", "w", encoding="utf-8") as out:
                out.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
            counts[split] = len(rows)
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "name": "medvista-mini",
        "version": VERSION,
        "seed": seed,
        "tasks": counts,
        "sources": [{"name": s.name, "file": s.file, "note": s.note} for s in SOURCES],
        "files": {f: _sha1(tmp / f) for f in files},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root
