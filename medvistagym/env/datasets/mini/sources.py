"""The real images medvista-mini is made from, and the facts its global questions ask.

Every source ships inside a pip package (pydicom-data, pydicom, scikit-image).
Modality, body part and projection come from the DICOM header where it has them;
`*_from` records where each answer came from ("header:<Keyword>" or "curated",
the latter for facts the header lacks, taken from the file's documentation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pydicom

from ...images import SourceImage, decode_image
from ...task import ImageRef

# DICOM Modality codes to the answer words used in questions.
MODALITY_NAMES = {"CR": "X-ray", "DX": "X-ray", "MR": "MRI", "CT": "CT", "US": "ultrasound", "NM": "nuclear medicine"}
MODALITY_ALIASES = {
    "X-ray": ["xray", "x ray", "radiograph", "radiography", "plain film", "CR"],
    "MRI": ["MR", "magnetic resonance", "magnetic resonance imaging"],
    "CT": ["computed tomography", "CT scan"],
    "ultrasound": ["US", "sonography", "ultrasonography"],
    "nuclear medicine": ["scintigraphy", "bone scan", "NM"],
    "pathology": ["histopathology", "histology", "microscopy"],
    "fundus photography": ["fundus", "fundus photograph", "retinal photography"],
}
MODALITY_PHRASES = {
    "X-ray": "an X-ray",
    "MRI": "an MRI scan",
    "CT": "a CT scan",
    "ultrasound": "an ultrasound image",
    "nuclear medicine": "a nuclear medicine scan",
    "pathology": "a pathology slide",
    "fundus photography": "a fundus photograph",
}
# Header body-part words to answer words.
BODY_PART_NAMES = {"CHEST": "chest", "THORAX": "chest", "ABDOMEN": "abdomen", "PANCREAS": "abdomen",
                   "SHOULDER": "shoulder", "WHOLE BODY": "whole body"}
BODY_PARTS = ("chest", "abdomen", "shoulder", "head", "lower leg", "whole body", "eye", "colon")


@dataclass(frozen=True)
class SourceSpec:
    name: str
    file: str  # pydicom test file name, or "skimage:<file>"
    curated: dict[str, str]  # facts the header lacks: modality / body_part / window
    note: str = ""


SOURCES: tuple[SourceSpec, ...] = (
    SourceSpec("chest-radiograph", "RG1_UNCR.dcm", {}),
    SourceSpec("leg-radiograph", "RG3_UNCR.dcm", {"body_part": "lower leg"},
               "header BodyPartExamined is EXTREMITY; StudyDescription names the distal tibia"),
    SourceSpec("shoulder-mr", "MR2_UNCR.dcm", {}),
    SourceSpec("abdomen-mr", "MR-SIEMENS-DICOM-WithOverlays.dcm", {}),
    SourceSpec("head-ct", "693_UNCR.dcm", {"body_part": "head"}, "axial head CT; the header has no body part"),
    SourceSpec("abdomen-ct", "explicit_VR-UN.dcm", {"window": "40,400"},
               "the header has no window; a standard abdominal soft-tissue window is used"),
    SourceSpec("lymph-node-us", "US1_UNCR.dcm", {}, "Doppler ultrasound of a lymph node; no body part in the header"),
    SourceSpec("bone-scan", "JPEG2000.dcm", {}),
    SourceSpec("fundus", "skimage:retina.jpg", {"modality": "fundus photography", "body_part": "eye"},
               "scikit-image's retina fundus photograph"),
    SourceSpec("colon-ihc", "skimage:ihc.png", {"modality": "pathology", "body_part": "colon"},
               "scikit-image's immunohistochemistry image of colonic glands (FHL2, DAB)"),
)


def source_path(spec: SourceSpec) -> str:
    if spec.file.startswith("skimage:"):
        import skimage.data

        return os.path.join(os.path.dirname(skimage.data.__file__), spec.file.split(":", 1)[1])
    from pydicom.data import get_testdata_file

    path = get_testdata_file(spec.file)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {spec.file} not found: is pydicom-data installed?")
    return str(path)


@dataclass(frozen=True)
class SourceFacts:
    """The answers of the global questions for one source, each with its origin."""

    modality: str
    modality_from: str
    body_part: str | None
    body_part_from: str | None
    view: str | None  # radiograph projection (PA / AP)


def _header_body_part(meta: dict) -> tuple[str | None, str | None]:
    for key in ("BodyPartExamined", "StudyDescription"):
        word = BODY_PART_NAMES.get(str(meta.get(key, "")).split("^")[0].upper())
        if word:
            return word, f"header:{key}"
    return None, None


def source_facts(spec: SourceSpec, image: SourceImage) -> SourceFacts:
    meta = dict(image.meta)
    if "modality" in spec.curated:
        modality, modality_from = spec.curated["modality"], "curated"
    else:
        modality, modality_from = MODALITY_NAMES[meta["Modality"]], "header:Modality"
    if "body_part" in spec.curated:
        body_part, body_part_from = spec.curated["body_part"], "curated"
    else:
        body_part, body_part_from = _header_body_part(meta)
    view = meta.get("ViewPosition") if modality == "X-ray" else None
    return SourceFacts(modality, modality_from, body_part, body_part_from, view)


def load_source(spec: SourceSpec) -> tuple[SourceImage, pydicom.Dataset | None]:
    """The decoded source and, for DICOM, its header (pixel data left out)."""
    path = source_path(spec)
    image = decode_image(ImageRef(path=path))
    header = None
    if not spec.file.startswith("skimage:"):
        header = pydicom.dcmread(path, stop_before_pixels=True)
    return image, header
