"""Files named like images that are not images, and images of extreme aspect ratio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from segment_anything.modeling import Sam

from samkd.data import (
    DataError,
    PromptSampler,
    build_dataset,
    load_rgb_image,
    resize_boxes,
    resized_shape,
)
from samkd.data.masks import load_png_mask
from samkd.extract import load_extraction_dataset, plan_images
from samkd.features.images import describe_image_file, index_images
from samkd.models import build_prompt_decoder
from samkd.runtime import Distributed
from samkd.settings import load_settings

from .conftest import make_folder_dataset, write_image, write_mask_png

NOT_IMAGES = {"zero_bytes": b"", "text": b"this is a text file, not a JPEG\n"}


def assert_names_file(error: DataError, path: Path) -> None:
    message = str(error)
    assert message.startswith(f"{path}: cannot be read as an image (")
    assert "\n" not in message


@pytest.mark.parametrize("content", NOT_IMAGES.values(), ids=list(NOT_IMAGES))
def test_not_an_image_is_a_data_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_rgb_image(path)
    assert_names_file(info.value, path)
    with pytest.raises(DataError) as info:
        describe_image_file(path)
    assert_names_file(info.value, path)
    mask = tmp_path / "mask.png"
    mask.write_bytes(content)
    with pytest.raises(DataError, match="mask cannot be read as an image"):
        load_png_mask(mask, (4, 4))


@pytest.mark.parametrize("content", NOT_IMAGES.values(), ids=list(NOT_IMAGES))
def test_not_an_image_is_skipped_by_the_dataset(tmp_path: Path, content: bytes) -> None:
    make_folder_dataset(tmp_path)
    bad = tmp_path / "image" / "b.jpg"
    (tmp_path / "image" / "b.png").unlink()
    bad.write_bytes(content)
    dataset = build_dataset(tmp_path, image_size=32, on_error="skip")
    sample = dataset[1]
    assert sample.image_id == "c"
    assert len(sample.skipped) == 1
    assert sample.skipped[0].startswith(f"{bad}: cannot be read as an image (")


@pytest.mark.parametrize("content", NOT_IMAGES.values(), ids=list(NOT_IMAGES))
def test_extract_indexing_raises_data_error(tmp_path: Path, content: bytes) -> None:
    """Where extraction opens images first: hashing the index (`describe_image_file`)."""
    make_folder_dataset(tmp_path / "data")
    bad = tmp_path / "data" / "image" / "b.jpg"
    (tmp_path / "data" / "image" / "b.png").unlink()
    bad.write_bytes(content)
    settings = load_settings(
        None,
        [f"data.train={tmp_path / 'data'}", f"extract.output={tmp_path / 'f.h5'}"],
        environ={},
    )
    # (Under data.on_error=skip extraction records the image as skipped: tests/features.)
    dataset = load_extraction_dataset(settings, 64)
    with pytest.raises(DataError) as info:
        plan_images(settings, dataset, Distributed(), Console(quiet=True))
    assert_names_file(info.value, bad)
    paths = [record.image_path for record in dataset.records]
    with pytest.raises(DataError):
        index_images(paths, [path.stem for path in paths], {})


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(2, 10000, (1, 1024)), (10000, 2, (1024, 1)), (1, 1, (1024, 1024)), (3, 4000, (1, 1024))],
)
def test_short_side_is_at_least_one_pixel(height: int, width: int, expected) -> None:
    from samkd.data.images import ResizeLongestSide

    assert resized_shape(height, width, 1024) == expected
    assert ResizeLongestSide.get_preprocess_shape(height, width, 1024) == expected


def extreme_dataset(root: Path, height: int, width: int) -> np.ndarray:
    write_image(root / "image" / "strip.png", height, width)
    mask = np.zeros((height, width), bool)
    mask[: max(1, height // 2), : max(1, width // 2)] = True
    write_mask_png(root / "mask" / "strip" / "obj_0.png", mask)
    return mask


@pytest.mark.parametrize(("height", "width"), [(2, 10000), (10000, 2)])
def test_extreme_aspect_ratio_loads(tmp_path: Path, height: int, width: int) -> None:
    mask = extreme_dataset(tmp_path, height, width)
    dataset = build_dataset(tmp_path, prompts=PromptSampler(mode="box", box_jitter=0.0))
    sample = dataset[0]
    expected_input = resized_shape(height, width, 1024)
    assert min(expected_input) == 1
    assert sample.image.shape == (3, 1024, 1024)
    assert sample.input_size == expected_input
    assert sample.original_size == (height, width)
    assert torch.equal(sample.masks[0], torch.from_numpy(mask))
    assert sample.prompt_boxes is not None
    expected_box = resize_boxes(sample.boxes.numpy().astype(np.float64), (height, width), 1024)
    np.testing.assert_allclose(sample.prompt_boxes.numpy(), expected_box, rtol=1e-6)
    # Padding is SAM's: zeros beyond the resized image.
    rows, columns = expected_input
    assert sample.image[:, rows:, :].abs().sum() == 0
    assert sample.image[:, :, columns:].abs().sum() == 0


class NoEncoder(torch.nn.Module):
    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size


@pytest.mark.parametrize(("height", "width"), [(2, 10000), (10000, 2)])
def test_extreme_aspect_ratio_predicts_masks(height: int, width: int) -> None:
    from samkd.evaluate.predict import ObjectPrompts, predict_masks

    torch.manual_seed(0)
    prompt_encoder, mask_decoder = build_prompt_decoder(256)
    model = Sam(NoEncoder(256), prompt_encoder, mask_decoder).eval()  # type: ignore[arg-type]
    embedding = torch.randn(1, 256, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, width - 1.0, height - 1.0]])
    prediction = predict_masks(model, embedding, ObjectPrompts(boxes=boxes), (height, width), False)
    assert prediction.masks.shape == (1, 1, height, width)
