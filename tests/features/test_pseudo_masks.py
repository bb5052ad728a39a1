"""Teacher pseudo-masks: generation on an embedding, RLE rows, the writer, the join, the reader,
inspect, and `samkd extract --pseudo-masks` end to end."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from rich.console import Console
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from typer.testing import CliRunner

from samkd.cli import app
from samkd.demo.shapes import write_shapes_dataset
from samkd.evaluate.run import stored_teacher
from samkd.features import (
    ExtractionPlan,
    FeatureChecksumError,
    FeatureStore,
    FeatureStoreError,
    inspect_feature_file,
    open_for_extraction,
    planned_bytes,
    render_report,
    space_needed,
)
from samkd.features.layout import open_read_only, read_index_file
from samkd.features.pseudo_masks import (
    decode_pseudo_masks,
    decode_rows,
    encode_rows,
    generate_pseudo_masks,
)
from samkd.features.schema import (
    PSEUDO_MASKS_SCHEMA_VERSION,
    describe_difference,
    parts_dir,
    pseudo_mask_bytes,
)
from samkd.inspect import plot_pseudo_masks
from samkd.models import build_sam
from samkd.settings import PseudoMaskSettings, SettingsError, load_settings

from .feature_helpers import (
    PSEUDO_MASKS,
    extract,
    features_for,
    make_plan,
    make_teacher,
    pseudo_masks_for,
    write_all,
)

# Every mask passes: a random teacher predicts low IoUs, and similar masks everywhere.
ALL_MASKS = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}


@pytest.fixture(scope="module")
def teacher() -> Sam:
    torch.manual_seed(5)
    return build_sam("vit_mini", image_size=128)


# --------------------------------------------------------------------------- generation


def test_generation_is_what_segment_anythings_generator_gives_on_the_image(
    teacher: Sam,
) -> None:
    """On a 96 x 128 image (no resize at 128 px) the embedding path gives the masks that
    `SamAutomaticMaskGenerator` gives running the encoder itself."""
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    options = PseudoMaskSettings(points_per_side=2, **ALL_MASKS)
    generator = SamAutomaticMaskGenerator(
        teacher, points_per_side=2, output_mode="coco_rle", **ALL_MASKS
    )
    expected = generator.generate(image)
    generator.predictor.set_image(image)
    embedding = generator.predictor.features
    masks = generate_pseudo_masks(teacher, embedding, (96, 128), options)
    assert len(masks) == len(expected) == 12
    key = lambda mask: (-mask["predicted_iou"], mask["counts"])  # noqa: E731
    ours = sorted(masks, key=key)
    theirs = sorted(
        (
            dict(record["segmentation"], predicted_iou=record["predicted_iou"])
            for record in expected
        ),
        key=key,
    )
    assert [m["counts"] for m in ours] == [m["counts"] for m in theirs]
    assert [m["predicted_iou"] for m in ours] == pytest.approx([m["predicted_iou"] for m in theirs])


def test_generation_is_sorted_capped_deterministic_and_at_the_original_size(
    teacher: Sam,
) -> None:
    embedding = torch.randn(256, 8, 8, generator=torch.Generator().manual_seed(1))
    every = generate_pseudo_masks(
        teacher, embedding, (60, 90), PseudoMaskSettings(points_per_side=2, **ALL_MASKS)
    )
    options = PseudoMaskSettings(points_per_side=2, max_masks=5, **ALL_MASKS)
    masks = generate_pseudo_masks(teacher, embedding[None], (60, 90), options)
    assert len(every) == 12 and masks == every[:5]  # the 5 of highest predicted IoU
    ious = [mask["predicted_iou"] for mask in every]
    assert ious == sorted(ious, reverse=True)
    assert all(
        set(mask) == {"size", "counts", "predicted_iou", "stability_score"} for mask in masks
    )
    assert all(mask["size"] == [60, 90] and isinstance(mask["counts"], str) for mask in masks)
    decoded = decode_pseudo_masks(masks)
    assert decoded.shape == (5, 60, 90) and decoded.dtype == bool
    assert generate_pseudo_masks(teacher, embedding, (60, 90), options) == masks
    with pytest.raises(ValueError, match=r"embedding is \(256, 4, 4\), the teacher takes"):
        generate_pseudo_masks(teacher, embedding[:, :4, :4], (60, 90), options)


def test_rle_decoding_and_rows_round_trip() -> None:
    rng = np.random.default_rng(2)
    expected = rng.random((3, 7, 5)) > 0.5
    masks = []
    for index, mask in enumerate(expected):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        masks.append(
            {"size": [7, 5], "counts": rle["counts"].decode(), "predicted_iou": 0.1 * index,
             "stability_score": 1 / 3}
        )  # fmt: skip
    assert np.array_equal(decode_pseudo_masks(masks, (7, 5)), expected)
    texts = encode_rows([masks, []])
    assert decode_rows(texts) == [masks, []] and texts[1] == "[]"
    assert decode_rows([text.encode() for text in texts]) == [masks, []]
    assert decode_pseudo_masks([], (7, 5)).shape == (0, 7, 5)
    with pytest.raises(ValueError, match="size of the masks is unknown"):
        decode_pseudo_masks([])
    with pytest.raises(ValueError, match=r"masks of different sizes: \[\(7, 5\), \(8, 5\)\]"):
        decode_pseudo_masks(masks, (8, 5))
    with pytest.raises(ValueError, match="pseudo-masks of row 0: not RLE masks"):
        encode_rows([[{"size": [7, 5]}]])
    with pytest.raises(ValueError, match="pseudo-masks of row 1: expected a list of"):
        decode_rows(["[]", '[{"size": [1, 1]}]'])


# --------------------------------------------------------------------------- storage


@pytest.mark.parametrize("layout", ["copy", "virtual"])
def test_written_masks_read_back_in_both_layouts(tmp_path: Path, layout: str) -> None:
    plan = make_plan(num_images=6, pseudo_masks=PSEUDO_MASKS)
    output = extract(tmp_path / "features.h5", plan, layout=layout)
    assert output is not None
    store = FeatureStore(output, teachers=["vit_b"])  # the masks are vit_h's, read anyway
    assert store.pseudo_mask_teacher == "vit_h"
    expected = pseudo_masks_for(plan, range(6))
    assert [store.pseudo_masks(i) for i in range(6)] == expected
    assert [len(masks) for masks in expected] == [0, 1, 2, 3, 0, 1]
    assert store.pseudo_masks("img_0003.jpg") == expected[3]
    worker = pickle.loads(pickle.dumps(store))  # as a DataLoader worker gets it
    assert worker.pseudo_masks(-1) == expected[5]
    # The stores hold the file open without HDF5's lock: a second open in this process
    # must say the same (HDF5 refuses other locking flags).
    with open_read_only(output) as handle:
        assert handle.attrs["schema_version"] == PSEUDO_MASKS_SCHEMA_VERSION
        group = handle["teachers/vit_h"]
        assert not group["pseudo_masks"].is_virtual
        assert list(group["pseudo_mask_counts"][()]) == [0, 1, 2, 3, 0, 1]
        assert "pseudo_masks" not in handle["teachers/vit_b"]


def test_the_space_estimates_cover_what_the_masks_add(tmp_path: Path) -> None:
    plain, masks = make_plan(num_images=8), make_plan(num_images=8, pseudo_masks=PSEUDO_MASKS)
    pending = {teacher: list(range(8)) for teacher in plain.teacher_names}
    sizes = []
    for plan in (plain, masks):
        output = tmp_path / f"{len(sizes)}.h5"
        needed = space_needed(output, plan, pending)
        extract(output, plan, layout="virtual")  # keeps the shards
        shards = sum(path.stat().st_size for path in parts_dir(output).rglob("part-*.h5"))
        sizes.append((needed, shards, output.stat().st_size))
    (plain_needed, plain_shards, plain_file), (needed, shards, file) = sizes
    assert 0 < shards - plain_shards < needed.shards - plain_needed.shards
    assert 0 < file - plain_file < needed.joined - plain_needed.joined
    assert planned_bytes(masks) - planned_bytes(plain) > file - plain_file


def test_a_damaged_row_fails_its_checksum(tmp_path: Path) -> None:
    output = extract(tmp_path / "features.h5", make_plan(num_images=4, pseudo_masks=PSEUDO_MASKS))
    assert output is not None
    with h5py.File(output, "r+") as handle:
        handle["teachers/vit_h/pseudo_masks_crc32"][2] ^= 1
    with pytest.raises(FeatureChecksumError) as error:
        FeatureStore(output).pseudo_masks(2)
    assert str(error.value).startswith(
        "features.h5: teacher 'vit_h' pseudo-masks of image 'img_0002.jpg': checksum mismatch"
    )
    lenient = FeatureStore(output, on_error="skip")
    assert lenient.pseudo_masks(2) == [] and list(lenient.skipped_rows) == ["img_0002.jpg"]
    assert lenient.read(2) == {} and lenient.pseudo_masks(1) != []
    assert FeatureStore(output, verify=False).pseudo_masks(2) != []
    report = inspect_feature_file(output, check=True)
    assert report.status == "corrupt"
    assert report.problems == [
        "teacher 'vit_h' pseudo-masks: 1 images fail their crc32 or mask count"
    ]


def test_a_file_without_masks_says_how_to_make_them(tmp_path: Path) -> None:
    output = extract(tmp_path / "features.h5", make_plan(num_images=2))
    assert output is not None
    store = FeatureStore(output)
    assert store.pseudo_mask_teacher is None
    with pytest.raises(FeatureStoreError) as error:
        store.pseudo_masks(0)
    assert str(error.value) == (
        f"{output}: holds no pseudo-masks; make them with `samkd extract --pseudo-masks` "
        "(into a new output, or delete this one)"
    )
    with pytest.raises(FeatureStoreError, match="holds no pseudo-masks"):
        plot_pseudo_masks(output, tmp_path / "overlay.png")
    assert not (tmp_path / "overlay.png").exists()


def test_the_writer_refuses_masks_that_do_not_fit_the_plan(tmp_path: Path) -> None:
    plan = make_plan(num_images=4, pseudo_masks=PSEUDO_MASKS)
    features = {teacher: features_for(plan, teacher, [0, 1]) for teacher in ("vit_h", "vit_b")}
    masks = pseudo_masks_for(plan, [3, 3])  # 3 masks at image 3's size
    with open_for_extraction(tmp_path / "features.h5", plan) as writer:
        for teacher, given, message in [
            ("vit_b", masks, "teacher 'vit_b': the plan stores no pseudo-masks of this teacher"),
            ("vit_h", None, r"teacher 'vit_h': expected one list of pseudo-masks per image \(2\)"),
            ("vit_h", masks, r"image 'img_0000.jpg': pseudo-mask of size \[483, 640\], the image"),
            ("vit_h", [masks[0] + masks[0][:1], []], "4 pseudo-masks, more than max_masks 3"),
        ]:
            with pytest.raises(FeatureStoreError, match=message):
                writer.write_batch(teacher, [0, 1], features[teacher], pseudo_masks=given)
        assert writer.todo("vit_h") == [0, 1, 2, 3]  # nothing was taken


def test_inspect_counts_the_masks_and_draws_them(tmp_path: Path) -> None:
    plan = make_plan(num_images=7, pseudo_masks=PSEUDO_MASKS)
    output = tmp_path / "features.h5"
    with open_for_extraction(output, plan) as writer:
        writer.write_skipped("vit_h", [6], ["not an image"])
        writer.write_skipped("vit_b", [6], ["not an image"])
        write_all(writer)
        writer.finish()
    assert FeatureStore(output).pseudo_masks(6) == []
    report = inspect_feature_file(output, check=True)
    masks = report.pseudo_masks
    assert report.status == "complete" and masks is not None
    # images 0-5 hold 0, 1, 2, 3, 0, 1 masks; image 6 was skipped
    assert (masks.teacher, masks.images, masks.images_with_masks) == ("vit_h", 6, 4)
    assert (masks.images_without_masks, masks.total, masks.checksum_errors) == (2, 7, 0)
    assert (masks.min, masks.mean, masks.max) == (0, 7 / 6, 3)
    assert masks.options["max_masks"] == 3 and "teacher" not in masks.options
    console = Console(file=io.StringIO(), width=300)
    render_report(report, console)
    assert (
        "pseudo-masks of teacher vit_h: 4 of 6 images have some, 7 masks in all (per image min "
        "0, mean 1.17, max 3); 2 images have none; at most 3 per image"
    ) in console.file.getvalue()  # type: ignore[attr-defined]
    overlay = plot_pseudo_masks(output, tmp_path / "overlay.png", count=2)
    assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unfinished_extraction_shows_its_masks(tmp_path: Path) -> None:
    plan = make_plan(num_images=10, shard_size=4, pseudo_masks=PSEUDO_MASKS)
    with open_for_extraction(tmp_path / "features.h5", plan) as writer:
        write_all(writer, limit=9)
        writer.drain()
        report = inspect_feature_file(parts_dir(tmp_path / "features.h5"), check=True)
    assert report.status == "incomplete" and report.pseudo_masks is not None
    assert (report.pseudo_masks.images, report.pseudo_masks.total) == (
        8,
        0 + 1 + 2 + 3 + 0 + 1 + 2 + 3,
    )


def test_other_generator_options_are_a_different_plan() -> None:
    plain = make_plan().identity()
    masks = make_plan(pseudo_masks=PSEUDO_MASKS).identity()
    other = make_plan(pseudo_masks={**PSEUDO_MASKS, "points_per_side": 8}).identity()
    assert masks["schema_version"] == 3 and plain["schema_version"] == 1
    assert describe_difference(masks, other) == (
        "was extracted with extract.pseudo_masks.points_per_side 4, now 8"
    )
    assert describe_difference(plain, masks) == (
        "was extracted without pseudo-masks, now with (extract.pseudo_masks.enabled)"
    )
    assert describe_difference(masks, make_plan(pseudo_masks=PSEUDO_MASKS).identity()) is None
    with pytest.raises(ValueError, match="pseudo_masks teacher must be one of"):
        make_plan(pseudo_masks={**PSEUDO_MASKS, "teacher": "vit_l"})


@pytest.mark.parametrize(
    ("assignments", "message"),
    [
        (
            ["extract.pseudo_masks.teacher=b"],
            "extract.pseudo_masks.teacher 'b' names no teacher; expected one of: a",
        ),
        (
            ["extract.pseudo_masks.enabled=true", "extract.taps=[encoder.block.1]"],
            "extract.pseudo_masks.enabled needs teacher 'a' to store encoder.embed",
        ),
    ],
    ids=["unknown teacher", "no embedding"],
)
def test_settings_name_a_teacher_that_stores_embeddings(
    assignments: list[str], message: str
) -> None:
    teachers = "teachers=[{name: a, model_type: vit_mini}]"
    with pytest.raises(SettingsError, match=message):
        load_settings(None, [teachers, *assignments], environ={})


# --------------------------------------------------------------------------- extraction


def test_extract_stores_the_masks_that_the_stored_embedding_and_decoder_give(
    tmp_path: Path,
) -> None:
    data = write_shapes_dataset(tmp_path / "shapes", 3, (72, 96))
    output = tmp_path / "f.h5"
    options = {"points_per_side": 2, "max_masks": 4, **ALL_MASKS}
    arguments = [
        "extract", "--teacher", "vit_mini", "--data", str(data), "--output", str(output),
        "--pseudo-masks", "--set", "student.model_type=vit_t_mini", "--set", "data.image_size=128",
        "--set", "data.num_workers=0", "--set", "extract.shard_size=2",
        *(f"--set=extract.pseudo_masks.{key}={value}" for key, value in options.items()),
    ]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    model, store, name, _ = stored_teacher(output, None, torch.device("cpu"))
    assert store.pseudo_mask_teacher == name == "vit_mini"
    settings = PseudoMaskSettings(**options)
    with h5py.File(output, "r") as handle:
        rows = handle["teachers/vit_mini/pseudo_masks"][()]
    masks = {**PSEUDO_MASKS, "teacher": "vit_mini", "max_masks": 4}
    plan = ExtractionPlan(read_index_file(output), (make_teacher("vit_mini"),), pseudo_masks=masks)
    for index in range(len(store)):
        stored = store.pseudo_masks(index)
        embedding = store.read(index)[name]["encoder.embed"]
        height, width = (int(side) for side in store.image_sizes[index])
        assert len(stored) == 4
        assert stored == generate_pseudo_masks(model, embedding, (height, width), settings)
        # the space estimate holds even for the ragged masks of a random teacher
        assert len(rows[index]) < pseudo_mask_bytes(plan, index)

    again = runner.invoke(app, [*arguments, "--set", "extract.pseudo_masks.points_per_side=3"])
    assert again.exit_code == 1
    assert again.stderr.strip().splitlines()[-1] == (
        "error: f.h5: was extracted with extract.pseudo_masks.points_per_side 2, now 3 (use "
        "another output, or delete it to start over)"
    )
    inspected = runner.invoke(app, ["inspect", str(output), "--overlay", str(tmp_path / "o.png")])
    assert inspected.exit_code == 0, inspected.output
    assert "pseudo-masks of teacher vit_mini: 3 of 3 images have some, 12 masks" in inspected.stdout
    assert (tmp_path / "o.png").is_file()
