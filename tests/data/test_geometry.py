"""Geometric augmentation: image and masks turned and cropped alike, windows and zoom."""

import numpy as np

from samkd.data import Geometry


def test_image_and_masks_turn_and_crop_alike() -> None:
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    masks = np.stack([image[..., 0] > 128, image[..., 1] > 64])  # 2 x H x W, from the pixels
    for geometry in (
        Geometry(quarter_turns=1),
        Geometry(area=0.3, crop_at=(0.5, 1.0)),
        Geometry(quarter_turns=3, area=0.5, zoom=1.5, crop_at=(1.0, 0.0), zoom_at=(0.3, 0.7)),
    ):
        turned = geometry.image(image)
        assert turned.flags.c_contiguous
        expected = np.stack([turned[..., 0] > 128, turned[..., 1] > 64])
        assert np.array_equal(geometry.masks(masks), expected)
    assert Geometry(quarter_turns=1).image(image).shape == (128, 96, 3)
    assert np.array_equal(Geometry().image(image), image)


def test_windows_and_zoom() -> None:
    # A quarter of the area at the bottom-right corner.
    assert Geometry(area=0.25, crop_at=(1.0, 1.0)).window((96, 128)) == (
        slice(48, 96),
        slice(64, 128),
    )
    # Zoomed in 1.25 times the long side spans 160 px: 128 of them fit, every row does.
    assert Geometry(zoom=1.25).window((96, 128)) == (slice(0, 96), slice(0, 102))
    assert Geometry(zoom=1.25, quarter_turns=1).window((96, 128)) == (slice(0, 102), slice(0, 96))
    # Zoomed out, nothing is cut: the image is smaller in SAM's input.
    assert Geometry(zoom=0.5).window((96, 128)) == (slice(0, 96), slice(0, 128))
    assert Geometry(zoom=0.5).long_side(1024) == 512
    assert Geometry(zoom=1.5).long_side(1024) == 1024
