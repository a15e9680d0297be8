"""Fixtures shared by the kernel tests; plain helpers and tables are in pillow_cases.py."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from medvistagym.kernels import backend_available

# CPU back ends that crop_resize can be asked for by name; "cpu" is skipped where it cannot be built.
CPU_BACKENDS = ("torch", "cpu")


@pytest.fixture(scope="module")
def ihc() -> np.ndarray:
    return skimage.data.immunohistochemistry()  # (512, 512, 3) pathology, uint8


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return skimage.data.camera()  # (512, 512) grey, uint8


# Session scope: Hypothesis tests may not take function-scoped fixtures, and the name is all there is to set up.
@pytest.fixture(scope="session", params=CPU_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """A crop_resize back end to pass as `backend=`: the torch reference, then the compiled one."""
    name = request.param
    if not backend_available(name):
        from medvistagym.kernels.cpu_backend import unavailable_reason

        pytest.skip(f"compiled CPU back end unavailable: {unavailable_reason()}")
    return name
