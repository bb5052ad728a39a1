"""Frames: SAM 2's square input, and mapping prompts and maps to and from the student's frame,
checked on non-square images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sam2")

from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402
from sam2.utils.transforms import SAM2Transforms  # noqa: E402

from samkd.data import build_dataset, load_rgb_image, preprocess_square, resize_boxes  # noqa: E402
from samkd.data.masks import masks_to_boxes  # noqa: E402
from samkd.demo.shapes import write_shapes_dataset  # noqa: E402
from samkd.models import build_sam  # noqa: E402
from samkd.models.frames import FrameMap  # noqa: E402
from samkd.train.batches import low_res_targets  # noqa: E402
from samkd.train.forward import PromptGroup, encoder_forward, high_res_of  # noqa: E402
from samkd.train.frames import decode_in_frame  # noqa: E402

from .sam2_helpers import non_square_image, perturbed  # noqa: E402

SIZE = 128
# A 96 x 160 image: 77 x 128 in the student's frame, 128 x 128 in SAM 2's.
HEIGHT, WIDTH = 96, 160
INPUT_SIZE = (77, 128)


def object_masks() -> torch.Tensor:
    """Two objects of the non-square image: a rectangle and a disc."""
    rows, columns = np.mgrid[:HEIGHT, :WIDTH]
    rectangle = (rows >= 19) & (rows < 48) & (columns >= 26) & (columns < 80)
    disc = (rows - 66) ** 2 + (columns - 118) ** 2 < 18**2
    return torch.from_numpy(np.stack([rectangle, disc]))


def square_low_res(masks: torch.Tensor) -> torch.Tensor:
    """Masks pushed through SAM 2's frame: resized to S x S, then to the S/4 logit grid."""
    resized = F.interpolate(masks[:, None].float(), size=(SIZE, SIZE), mode="bilinear")
    return F.interpolate(resized, size=(SIZE // 4, SIZE // 4), mode="area")


def test_square_input_is_sam2_transforms() -> None:
    image = non_square_image(HEIGHT, WIDTH)
    assert torch.equal(preprocess_square(image, SIZE), SAM2Transforms(SIZE, 0.0)(image))


def test_dataset_gives_the_square_input(tmp_path: Path) -> None:
    data = write_shapes_dataset(tmp_path / "shapes", 1, (HEIGHT, WIDTH), seed=0)
    dataset = build_dataset(data, image_size=SIZE)
    assert dataset[0].square_image is None
    dataset.square_inputs = True
    sample = dataset[0]
    image = load_rgb_image(dataset.records[0].image_path)
    assert sample.square_image is not None
    assert torch.equal(sample.square_image, preprocess_square(image, SIZE))
    assert sample.input_size == INPUT_SIZE


def test_mask_cells_land_on_the_same_cells_after_mapping() -> None:
    """An object's mask through the student's frame (resize the longest side, pad) and through
    SAM 2's (resize to a square, then mapped): the same low-resolution cells, up to one cell
    of its boundary; the padding cells are invalid."""
    masks = object_masks()
    student = low_res_targets(masks, INPUT_SIZE, SIZE)
    mapped, valid = FrameMap(INPUT_SIZE, SIZE).to_pipeline(square_low_res(masks))
    teacher = mapped[:, 0] > 0.5
    grid = SIZE // 4
    assert valid.shape == (len(masks), 1, grid, grid)
    valid = valid[0, 0]
    assert valid[:19].all() and not valid[20:].any()  # 77 / 4 = 19.25 rows of image
    assert not student[:, 20:].any()
    # Cells farther than one cell from the object's boundary agree exactly.
    dilated = F.max_pool2d(student[:, None], 3, 1, 1)[:, 0]
    eroded = -F.max_pool2d(-student[:, None], 3, 1, 1)[:, 0]
    interior = (dilated == eroded) & valid
    assert torch.equal(teacher[interior], student.bool()[interior])
    for one, other in zip(teacher, student.bool(), strict=True):
        assert (one & other).sum() / (one | other).sum() > 0.9


def test_maps_round_trip_through_the_square_frame() -> None:
    """Pipeline -> square -> pipeline of a smooth map keeps it on the image's cells."""
    rows, columns = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    smooth = torch.sin(rows / 5) + torch.cos(columns / 7)
    frame = FrameMap(INPUT_SIZE, SIZE)
    back, valid = frame.to_pipeline(frame.to_model(smooth[None, None]))
    valid = valid[0, 0]
    torch.testing.assert_close(back[0, 0][valid][:-32], smooth[valid][:-32], atol=0.05, rtol=0)


def test_box_prompt_lands_on_the_same_object_in_both_frames() -> None:
    """Each object's box, as the dataset gives it to the student (its frame), mapped into SAM
    2's frame, is the box SAM2ImagePredictor makes of the original box; and the SAM 2 decoder
    given the student's box decodes exactly what the predictor decodes for that object."""
    masks = object_masks()
    original = masks_to_boxes(masks.numpy())
    student_boxes = torch.tensor(resize_boxes(original, (HEIGHT, WIDTH), SIZE)).float()
    frame = FrameMap(INPUT_SIZE, SIZE)
    transforms = SAM2Transforms(SIZE, 0.0)
    predictor_boxes = transforms.transform_boxes(
        torch.tensor(original).float(), normalize=True, orig_hw=(HEIGHT, WIDTH)
    ).reshape(-1, 4)
    torch.testing.assert_close(frame.boxes_to_model(student_boxes), predictor_boxes)
    # The mapped box lies around the object's mask in the square frame.
    square_masks = square_low_res(masks)[:, 0] > 0.5
    for box, mask in zip(frame.boxes_to_model(student_boxes), square_masks, strict=True):
        rows, columns = torch.nonzero(mask, as_tuple=True)
        assert box[1] / 4 <= rows.min() + 1 and rows.max() <= box[3] / 4 + 1
        assert box[0] / 4 <= columns.min() + 1 and columns.max() <= box[2] / 4 + 1

    model = perturbed(build_sam("hiera_mini", image_size=SIZE), seed=5)
    pixels = preprocess_square(non_square_image(HEIGHT, WIDTH), SIZE)
    predictor = SAM2ImagePredictor(model)
    with torch.no_grad():
        embedding, features = encoder_forward(model, pixels[None], [])
        high_res = high_res_of(features)
        assert high_res is not None
        predictor._features = {"image_embed": embedding, "high_res_feats": list(high_res)}
        predictor._orig_hw, predictor._is_image_set = [(HEIGHT, WIDTH)], True
        group = PromptGroup(
            torch.zeros(2, dtype=torch.long),
            torch.arange(2),
            boxes=student_boxes,
            input_sizes=torch.tensor([INPUT_SIZE, INPUT_SIZE]),
        )
        outputs = decode_in_frame(
            model.prompt_encoder, model.mask_decoder, embedding, [group], False, high_res, "square"
        )
    for index, box in enumerate(original):
        _, iou, low_res = predictor.predict(box=box, multimask_output=True)
        torch.testing.assert_close(outputs.iou[index, 1:], torch.from_numpy(iou))
        expected, _ = frame.to_pipeline(torch.from_numpy(low_res)[None], -32.0)
        torch.testing.assert_close(outputs.mask_logits[index, 1:].clamp(-32, 32), expected[0])


def test_a_group_of_images_of_different_sizes_decodes_as_each_alone() -> None:
    """One prompt group holding objects of two images with different aspect ratios maps each
    object through its own image's frame: the same logits, IoUs and valid cells as decoding
    each image's object alone."""
    model = perturbed(build_sam("hiera_mini", image_size=SIZE), seed=3)
    pixels = torch.stack(
        [
            preprocess_square(non_square_image(HEIGHT, WIDTH), SIZE),
            preprocess_square(non_square_image(WIDTH, HEIGHT // 2), SIZE),
        ]
    )
    sizes = torch.tensor([INPUT_SIZE, (SIZE, HEIGHT // 2 * SIZE // WIDTH)])
    boxes = torch.tensor([[10.0, 8.0, 60.0, 50.0], [4.0, 20.0, 30.0, 90.0]])
    with torch.no_grad():
        embedding, features = encoder_forward(model, pixels, [])
        high_res = high_res_of(features)

        def decode(images: list[int]) -> object:
            group = PromptGroup(
                torch.tensor(images),
                torch.arange(len(images)),
                boxes=boxes[images],
                input_sizes=sizes[images],
            )
            return decode_in_frame(
                model.prompt_encoder,
                model.mask_decoder,
                embedding,
                [group],
                False,
                high_res,
                "square",
            )

        together = decode([0, 1])
        alone = [decode([0]), decode([1])]
    for index, one in enumerate(alone):
        torch.testing.assert_close(together.mask_logits[index], one.mask_logits[0])
        torch.testing.assert_close(together.iou[index], one.iou[0])
        assert torch.equal(together.valid[index], one.valid[0])
    assert not torch.equal(together.valid[0], together.valid[1])
