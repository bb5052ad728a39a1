"""Reading: DataLoader workers, pickling, ids, flip and mismatch checks."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import samkd.features.reader
import samkd.features.rows
from samkd.features import FeatureStore, FeatureStoreError, flip_tap

from .feature_helpers import PREPROCESSING, extract, make_plan


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = extract(tmp_path_factory.mktemp("store") / "features.h5", make_plan(num_images=6))
    assert output is not None
    return output


def test_dataloader_with_two_workers(feature_file: Path) -> None:
    store = FeatureStore(feature_file, teachers=["vit_h"], taps=["encoder.embed", "decoder.iou"])
    store[0]  # a handle opened in the parent must not leak into the workers
    loader = DataLoader(store, batch_size=4, num_workers=2)
    batches = list(loader)
    embeds = torch.cat([batch["vit_h"]["encoder.embed"] for batch in batches])
    assert embeds.shape == (6, 256, 16, 16)
    assert set(batches[0]) == {"vit_h"}
    assert set(batches[0]["vit_h"]) == {"encoder.embed", "decoder.iou"}
    for index in range(6):
        assert torch.equal(embeds[index], store[index]["vit_h"]["encoder.embed"])


def test_dtype_none_reads_as_stored_and_widens_exactly(feature_file: Path) -> None:
    stored = FeatureStore(feature_file, dtype=None)[1]["vit_h"]["encoder.embed"]
    widened = FeatureStore(feature_file)[1]["vit_h"]["encoder.embed"]
    assert stored.dtype == torch.float16 and widened.dtype == torch.float32
    assert torch.equal(stored.float(), widened)


def test_direct_reads_equal_reads_through_hdf5(
    feature_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = FeatureStore(feature_file)
    assert direct[0] and all(tap.rows.offsets[0] is not None for tap in direct._taps.values())
    monkeypatch.setattr(samkd.features.rows, "chunk_offsets", lambda dataset: None)
    through_hdf5 = FeatureStore(feature_file)
    for index in range(len(direct)):
        by_pread, by_hdf5 = direct[index], through_hdf5[index]
        for teacher, taps in by_pread.items():
            for tap, tensor in taps.items():
                assert torch.equal(tensor, by_hdf5[teacher][tap]), (index, teacher, tap)
    assert all(tap.rows.offsets[0] is None for tap in through_hdf5._taps.values())


def test_prefetch_asks_the_disk_for_each_row(
    feature_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    advised: list[tuple[int, int, int]] = []

    def advise(descriptor: int, offset: int, length: int, advice: int) -> None:
        advised.append((offset, length, advice))

    store = FeatureStore(feature_file, teachers=["vit_h"], taps=["encoder.embed"])
    monkeypatch.setattr(samkd.features.rows.os, "posix_fadvise", advise)
    store.prefetch([1, "img_0004.jpg"])
    offsets = store._taps["vit_h", "encoder.embed"].rows.offsets[0]
    assert offsets is not None
    size, soon = 256 * 16 * 16 * 2, os.POSIX_FADV_WILLNEED  # float16 rows
    assert advised == [(offsets[1], size, soon), (offsets[4], size, soon)]


def test_worker_outputs_are_in_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not samkd.features.reader.output_tensor((2, 3), torch.float16).is_shared()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    shared = samkd.features.reader.output_tensor((2, 3), torch.float16)
    assert shared.is_shared() and shared.shape == (2, 3) and shared.dtype == torch.float16
    shared.copy_(torch.arange(6.0).view(2, 3))
    assert torch.equal(shared.float(), torch.arange(6.0).view(2, 3))


def test_pickles_without_a_handle_and_reads_by_id(feature_file: Path) -> None:
    store = FeatureStore(feature_file, dtype=torch.float16)
    first = store[2]
    copy = pickle.loads(pickle.dumps(store))
    assert copy._handle is None
    by_id = copy["img_0002.jpg"]
    assert by_id["vit_b"]["encoder.attn.3"].dtype == torch.float16
    assert torch.equal(by_id["vit_b"]["encoder.attn.3"], first["vit_b"]["encoder.attn.3"])
    assert store.index_of("img_0005.jpg") == 5
    with pytest.raises(KeyError):
        store["nope.jpg"]
    with pytest.raises(IndexError):
        store[6]


def test_flip_mirrors_maps_and_attention_grids(feature_file: Path) -> None:
    store = FeatureStore(feature_file)
    plain, flipped = store.read(1), store.read(1, flip=True)
    for name in ("encoder.embed", "encoder.block.3"):
        assert torch.equal(flipped["vit_h"][name], plain["vit_h"][name].flip(-1))
    assert torch.equal(flipped["vit_h"]["decoder.iou"], plain["vit_h"]["decoder.iou"])
    attention = plain["vit_h"]["encoder.attn.3"]  # 16 x 16: a 4 x 4 grid of queries and keys
    mirrored = flipped["vit_h"]["encoder.attn.3"]
    assert torch.equal(flip_tap(mirrored, "attention"), attention)
    # query (row 0, col 0) -> key (row 1, col 2) becomes query (0, 3) -> key (1, 1)
    assert mirrored[0 * 4 + 3, 1 * 4 + 1] == attention[0 * 4 + 0, 1 * 4 + 2]


def test_selection_errors(feature_file: Path) -> None:
    with pytest.raises(FeatureStoreError, match="no teacher 'vit_l'"):
        FeatureStore(feature_file, teachers=["vit_l"])
    with pytest.raises(FeatureStoreError, match="teacher 'vit_h' has no tap 'encoder.block.9'"):
        FeatureStore(feature_file, taps=["encoder.block.9"])


def test_check_matches_names_the_difference(feature_file: Path) -> None:
    store = FeatureStore(feature_file)
    ids = list(store.image_ids)
    store.check_matches(ids, 1024, PREPROCESSING, ["vit_h"], ["encoder.embed"], store.image_hashes)
    cases = [
        ({"image_ids": ids[:5]}, "features.h5: holds 6 images, the dataset has 5"),
        ({"image_ids": [*ids[:3], "x.jpg", *ids[4:]]}, "image 3 is 'img_0003.jpg' in the file"),
        ({"image_size": 512}, "teacher 'vit_h' was extracted with image_size 1024, now 512"),
        ({"preprocessing": {**PREPROCESSING, "resize": "square"}}, "preprocessing resize was"),
        ({"teachers": ["vit_l"]}, "no teacher 'vit_l'"),
        ({"taps": ["encoder.neck"]}, "has no tap 'encoder.neck'"),
        ({"image_hashes": ["0" * 64] * 6}, "image 'img_0000.jpg' has changed since extraction"),
    ]
    for arguments, message in cases:
        with pytest.raises(FeatureStoreError, match=message.replace("(", r"\(")) as error:
            store.check_matches(**arguments)  # type: ignore[arg-type]
        assert "\n" not in str(error.value)
