"""PNG masks in every format: binary as they are, greyscale thresholded at ``mask_threshold``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samkd.data import DataError, SegmentationDataset, build_dataset, decode_mask
from samkd.data.masks import load_png_mask, mask_box
from samkd.settings import SettingsError, load_settings

from .conftest import IMAGE_SIZES, make_folder_dataset

HEIGHT, WIDTH = IMAGE_SIZES["a"]


def soft_disc(full_range: int) -> np.ndarray:
    """An anti-aliased disc on a faintly noisy background, as ``H x W`` levels of ``full_range``.

    Every background pixel is above 0, as in many real anti-aliased masks.
    """
    rows, columns = np.mgrid[:HEIGHT, :WIDTH]
    distance = np.hypot(rows - 20, columns - 30)
    # Full inside radius 8, fading to 0 over 4 pixels.
    level = np.clip((12 - distance) / 4, 0, 1)
    noise = np.random.default_rng(0).integers(1, 4, (HEIGHT, WIDTH)) / 255
    return np.round(np.maximum(level, noise) * full_range).astype(np.int64)


def soft_disc_truth(threshold: float = 0.5) -> np.ndarray:
    return soft_disc(255) >= threshold * 255


def binary_truth() -> np.ndarray:
    rows, columns = np.mgrid[:HEIGHT, :WIDTH]
    return (rows >= 5) & (rows < 25) & (columns >= 10) & (columns < 40)


def one_bit(path: Path) -> np.ndarray:
    Image.fromarray(binary_truth()).convert("1").save(path)
    return binary_truth()


def binary_255(path: Path) -> np.ndarray:
    Image.fromarray(binary_truth().astype(np.uint8) * 255).save(path)
    return binary_truth()


def binary_0_1(path: Path) -> np.ndarray:
    Image.fromarray(binary_truth().astype(np.uint8)).save(path)
    return binary_truth()


def binary_16_bit_0_1(path: Path) -> np.ndarray:
    Image.fromarray(binary_truth().astype(np.uint16)).save(path)
    return binary_truth()


def antialiased_8_bit(path: Path) -> np.ndarray:
    Image.fromarray(soft_disc(255).astype(np.uint8)).save(path)
    return soft_disc_truth()


def antialiased_16_bit(path: Path) -> np.ndarray:
    levels = soft_disc(65535)
    Image.fromarray(levels.astype(np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")
    return levels >= 32768


def palette_image(indices: np.ndarray) -> Image.Image:
    height, width = indices.shape
    return Image.frombytes("P", (width, height), np.ascontiguousarray(indices).tobytes())


def palette_label_map(path: Path) -> np.ndarray:
    """DAVIS style: index 0 black background, index 1 a dark red object."""
    image = palette_image(binary_truth().astype(np.uint8))
    image.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 254)
    image.save(path)
    return binary_truth()


def palette_greyscale(path: Path) -> np.ndarray:
    """An anti-aliased mask saved with a grey palette whose index order is not grey order."""
    levels = soft_disc(255)
    values = np.unique(levels)
    order = np.random.default_rng(1).permutation(len(values))
    indices = np.empty_like(levels)
    palette = [0, 0, 0] * 256
    for index, value in zip(order, values, strict=True):
        indices[levels == value] = index
        palette[3 * index : 3 * index + 3] = [int(value)] * 3
    image = palette_image(indices.astype(np.uint8))
    image.putpalette(palette)
    image.save(path)
    return soft_disc_truth()


def antialiased_rgb(path: Path) -> np.ndarray:
    grey = soft_disc(255).astype(np.uint8)
    # A coloured object: only the red channel carries the mask.
    Image.fromarray(np.stack([grey, grey // 4, np.zeros_like(grey)], axis=2)).save(path)
    return soft_disc_truth()


def antialiased_rgba(path: Path) -> np.ndarray:
    grey = soft_disc(255).astype(np.uint8)
    opaque = np.full_like(grey, 255)
    Image.fromarray(np.stack([grey, grey, grey, opaque], axis=2)).save(path)
    return soft_disc_truth()


def antialiased_la(path: Path) -> np.ndarray:
    grey = soft_disc(255).astype(np.uint8)
    Image.fromarray(np.stack([grey, np.full_like(grey, 255)], axis=2)).save(path)
    return soft_disc_truth()


FORMATS: list[Callable[[Path], np.ndarray]] = [
    one_bit,
    binary_255,
    binary_0_1,
    binary_16_bit_0_1,
    antialiased_8_bit,
    antialiased_16_bit,
    palette_label_map,
    palette_greyscale,
    antialiased_rgb,
    antialiased_rgba,
    antialiased_la,
]


@pytest.mark.parametrize("write", FORMATS, ids=[write.__name__ for write in FORMATS])
def test_each_png_format_is_read_as_it_means(tmp_path: Path, write) -> None:
    expected = write(tmp_path / "mask.png")
    mask = load_png_mask(tmp_path / "mask.png", (HEIGHT, WIDTH))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, expected)


def test_soft_mask_box_is_the_object_not_the_image(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path)
    antialiased_8_bit(tmp_path / "mask" / "a" / "obj_0.png")
    assert (soft_disc(255) > 0).all()
    sample = build_dataset(tmp_path, image_size=64)[0]
    assert sample.masks[0].float().mean() < 0.25
    np.testing.assert_array_equal(sample.boxes[0].numpy(), mask_box(soft_disc_truth()))
    assert sample.boxes[0].tolist() == [20.0, 10.0, 40.0, 30.0]


def test_threshold_is_a_fraction_of_the_full_range(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 127, 128, 200, 255]], np.uint8)).save(tmp_path / "8.png")
    Image.fromarray(np.array([[0, 32767, 32768, 65535]], np.uint16)).save(tmp_path / "16.png")
    assert load_png_mask(tmp_path / "8.png", (1, 5)).tolist() == [[0, 0, 1, 1, 1]]
    assert load_png_mask(tmp_path / "16.png", (1, 4)).tolist() == [[0, 0, 1, 1]]
    assert load_png_mask(tmp_path / "8.png", (1, 5), 0.75).tolist() == [[0, 0, 0, 1, 1]]
    assert load_png_mask(tmp_path / "8.png", (1, 5), 1.0).tolist() == [[0, 0, 0, 0, 1]]
    assert load_png_mask(tmp_path / "8.png", (1, 5), 0.001).tolist() == [[0, 1, 1, 1, 1]]


def test_mask_below_threshold_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "faint.png"
    Image.fromarray(np.array([[0, 60, 100]], np.uint8)).save(path)
    with pytest.raises(DataError) as info:
        load_png_mask(path, (1, 3))
    message = str(info.value)
    assert message.startswith(f"{path}: mask is empty at mask_threshold 0.5")
    assert "100 of 255" in message and "\n" not in message


def test_mask_of_an_unsupported_mode_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "float.png"
    # Pillow goes by the content, not the name: this is a 32-bit float TIFF.
    Image.fromarray(np.ones((HEIGHT, WIDTH), np.float32)).save(path, format="TIFF")
    with pytest.raises(DataError) as info:
        load_png_mask(path, (HEIGHT, WIDTH))
    assert str(info.value) == (
        f"{path}: mask image mode F is not supported (expected 1-bit, grey, palette or RGB)"
    )


def test_dataset_threshold_reaches_the_masks(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path)
    antialiased_8_bit(tmp_path / "mask" / "a" / "obj_0.png")
    strict = build_dataset(tmp_path, image_size=64, mask_threshold=0.9)
    assert strict.mask_threshold == 0.9
    np.testing.assert_array_equal(strict[0].masks[0].numpy(), soft_disc_truth(0.9))
    source = strict.records[0].mask_sources[0]
    decoded = decode_mask(source, (HEIGHT, WIDTH), 0.9)  # type: ignore[arg-type]
    np.testing.assert_array_equal(decoded, soft_disc_truth(0.9))


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_invalid_threshold_is_refused(tmp_path: Path, threshold: float) -> None:
    make_folder_dataset(tmp_path)
    with pytest.raises(ValueError, match="mask_threshold"):
        build_dataset(tmp_path, mask_threshold=threshold)
    with pytest.raises(ValueError, match="mask_threshold"):
        SegmentationDataset([], mask_threshold=threshold)


def test_settings_mask_threshold() -> None:
    assert load_settings(environ={}).data.mask_threshold == 0.5
    settings = load_settings(None, ["data.mask_threshold=0.25"], environ={})
    assert settings.data.mask_threshold == 0.25
    for bad in ("0", "1.5", ".nan", ".inf"):
        with pytest.raises(SettingsError, match="data.mask_threshold"):
            load_settings(None, [f"data.mask_threshold={bad}"], environ={})


def test_settings_threshold_reaches_train_and_eval_datasets(tmp_path: Path) -> None:
    from samkd.evaluate.spec import load_eval_dataset
    from samkd.train.setup import build_train_dataset

    make_folder_dataset(tmp_path)
    settings = load_settings(
        None, [f"data.train={tmp_path}", "data.mask_threshold=0.8"], environ={}
    )
    assert build_train_dataset(settings).mask_threshold == 0.8
    assert load_eval_dataset(settings, 64).mask_threshold == 0.8
