"""Real-size models through extraction and training: shapes, and a student that still loads
into upstream MobileSAM. Minutes on a 2-core CPU: `nox -s slow` runs them."""

from pathlib import Path

import mobile_sam
import pytest
import torch

from benchmarks.real_size import measure_in_subprocess


@pytest.mark.slow
def test_vit_h_features_train_the_real_vit_t(tmp_path: Path) -> None:
    extract = measure_in_subprocess("extract", tmp_path, quick=False)
    assert extract["embedding_shape"] == [256, 64, 64]
    train = measure_in_subprocess("train", tmp_path, quick=False)
    assert train["steps"] == 3
    student = torch.load(tmp_path / "run" / "student.pt", map_location="cpu", weights_only=True)
    upstream = mobile_sam.sam_model_registry["vit_t"]()
    upstream.load_state_dict(student, strict=True)
    assert all(torch.isfinite(tensor).all() for tensor in student.values())
