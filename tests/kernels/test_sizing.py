import pytest

from medvistagym.kernels.sizing import smart_resize


@pytest.mark.parametrize("size,limits,expected", [
    ((1955, 1841), (3136, 50176), (224, 196)),  # downscaled to the pixel budget, floor to 28
    ((512, 512), (3136, 50176), (224, 224)),
    ((100, 50), (3136, 50176), (112, 56)),  # rounded to 28 (half to even)
    ((20, 20), (3136, 50176), (56, 56)),  # raised to the minimum
    ((1024, 256), (3136, 50176), (448, 112)),  # exactly on the budget
])
def test_like_the_qwen2_vl_processor(size, limits, expected):
    h, w = smart_resize(*size, 28, *limits)
    assert (h, w) == expected
    assert h % 28 == 0 and w % 28 == 0 and limits[0] <= h * w <= limits[1]


def test_rejects_degenerate_sizes():
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)


def test_agrees_with_transformers_on_many_sizes():
    # The PIL processor module: the torchvision one does not import without torchvision.
    transformers_resize = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl").smart_resize
    import random

    rng = random.Random(0)
    for _ in range(2000):
        h, w = rng.uniform(5, 3000), rng.uniform(5, 3000)
        if max(h, w) / min(h, w) > 200:
            continue
        factor = rng.choice([28, 32])
        limits = (rng.choice([3136, 65536]), rng.choice([50176, 12845056, 16777216]))
        assert smart_resize(h, w, factor, *limits) == transformers_resize(h, w, factor, *limits), (h, w, factor, limits)
