"""Shared fixtures: small tasks over real images that ship in packages."""

import os

import pytest
import skimage.data
from pydicom.data import get_testdata_file

from medvistagym.env.images import ImageStore
from medvistagym.env.task import AnswerType, ImageRef, Region, Task

CT = get_testdata_file("693_UNCR.dcm")  # 512x512 head CT
IHC = os.path.join(os.path.dirname(skimage.data.__file__), "ihc.png")  # 512x512 pathology


def make_tasks() -> list[Task]:
    ct, ihc = ImageRef(path=CT), ImageRef(path=IHC)
    lesion = Region((200.0, 220.0, 260.0, 280.0), 0, "lesion")
    return [
        Task("ct-closed", "test", "test", (ct,), "Is there a lesion?", "yes", AnswerType.CLOSED, regions=(lesion,)),
        Task("ct-open", "test", "test", (ct,), "Which organ?", "brain", AnswerType.OPEN),
        Task("ihc-mc", "test", "test", (ihc,), "Which stain?", "B", AnswerType.MULTIPLE_CHOICE,
             choices=("H&E", "IHC", "PAS", "Gram")),
        Task("two-images", "test", "test", (ct, ihc), "Compare <image 1> and <image 2>.", "no", AnswerType.CLOSED),
    ]


@pytest.fixture(scope="session")
def tasks() -> list[Task]:
    return make_tasks()


@pytest.fixture(scope="session")
def store() -> ImageStore:
    return ImageStore()
