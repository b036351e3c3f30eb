import numpy as np
import pytest
from PIL import Image

from alnet.data.transforms import Preprocessing, load_image

CELL = "C-NMC_Leukemia/training_data/fold_0/all/UID_11_1_1_all.png"
PREPROCESSING = Preprocessing(size=136)


@pytest.fixture
def grey_cell(mini_root, tmp_path):
    """A real cell as 8-bit greyscale: its pixels and the PNG it was saved to."""
    with Image.open(mini_root / CELL) as image:
        grey = image.convert("L")
    grey.save(tmp_path / "cell-8.png")
    return np.asarray(grey), tmp_path / "cell-8.png"


@pytest.mark.parametrize("mode, dtype, suffix", [("I;16", "<u2", ".png"), ("I;16B", ">u2", ".tif"),
                                                 ("I", "<i4", ".tif")])
def test_a_16_bit_image_is_scaled_not_clipped(grey_cell, tmp_path, mode, dtype, suffix):
    pixels, png_8 = grey_cell
    wide = (pixels.astype(np.int64) * 257).astype(dtype)  # 8-bit → 16-bit over the full range
    path = tmp_path / f"cell-16{suffix}"
    Image.frombytes(mode, (pixels.shape[1], pixels.shape[0]), wide.tobytes()).save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode
    expected, _ = load_image(png_8, PREPROCESSING)
    loaded, notes = load_image(path, PREPROCESSING)
    np.testing.assert_array_equal(loaded, expected)
    assert "scaled from 16-bit to 8-bit" in notes and f"converted from {mode} to RGB" in notes


def test_a_32_bit_image_beyond_16_bits_is_scaled_by_its_own_maximum(grey_cell, tmp_path):
    pixels, _ = grey_cell
    Image.fromarray(pixels.astype(np.int32) * 100_000).save(tmp_path / "cell-32.tif")
    # Its brightest pixel becomes 255, the rest in proportion.
    stretched = np.rint(pixels * (255 / pixels.max())).astype(np.uint8)
    Image.fromarray(stretched).save(tmp_path / "stretched.png")
    loaded, notes = load_image(tmp_path / "cell-32.tif", PREPROCESSING)
    np.testing.assert_array_equal(loaded, load_image(tmp_path / "stretched.png", PREPROCESSING)[0])
    assert "scaled from 32-bit to 8-bit by its maximum" in notes


def test_an_8_bit_image_gets_no_scaling_note(grey_cell):
    _, png_8 = grey_cell
    assert load_image(png_8, PREPROCESSING)[1] == ["converted from L to RGB"]
