"""Teachers are built one way everywhere: without a checkpoint, the same seeded weights."""

import torch

from samkd.models import build_teacher, save_state_dict


def test_random_teachers_are_the_same_whatever_the_random_state() -> None:
    torch.manual_seed(123)
    first = build_teacher("vit_mini", 128, None, torch.device("cpu"))
    state = torch.get_rng_state()
    second = build_teacher("vit_mini", 128, None, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    second_state = second.state_dict()
    for name, value in first.state_dict().items():
        assert torch.equal(value, second_state[name]), name
    assert not any(p.requires_grad for p in first.parameters()) and not first.training


def test_a_checkpoint_gives_its_weights(tmp_path) -> None:
    source = build_teacher("vit_mini", 128, None, torch.device("cpu"))
    weights = {k: v + 1 if v.is_floating_point() else v for k, v in source.state_dict().items()}
    source.load_state_dict(weights)
    save_state_dict(source, tmp_path / "teacher.pt")
    loaded = build_teacher("vit_mini", 128, tmp_path / "teacher.pt", torch.device("cpu"))
    assert torch.equal(
        loaded.state_dict()["mask_decoder.iou_token.weight"],
        weights["mask_decoder.iou_token.weight"],
    )
