"""Single clicks, SAM's most common prompt, train the multimask outputs under mixed prompts
(boxes, single clicks, several points with a negative one)."""

from pathlib import Path

import torch

from samkd.train import setup
from samkd.train.batches import DistillationDataset, collate_training
from samkd.train.forward import group_targets, prompt_groups, run_decoder
from samkd.train.step import task_terms
from samkd.train.terms import TASK_TOTAL

from .conftest import make_settings

# The efficacy benchmark's prompts: boxes, or 1-3 positive points, several with a negative one.
MIXED_PROMPTS = [
    "data.prompts.mode=mixed",
    "data.prompts.max_points=3",
    "data.prompts.num_negative_points=1",
]


def test_single_clicks_give_the_multimask_outputs_a_gradient(shapes: Path) -> None:
    settings = make_settings(
        f"data.train={shapes}",
        "student.model_type=vit_t_mini",
        "data.image_size=64",
        *MIXED_PROMPTS,
    )
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    student = setup.build_student(settings, cpu)
    images = setup.build_train_dataset(settings)
    dataset = DistillationDataset(images, None, setup.Augmentation(), settings.train.seed)
    batch = collate_training([dataset[index] for index in range(len(dataset))])
    groups = prompt_groups(batch, cpu)
    ambiguous = torch.cat([group.ambiguous() for group in groups])
    assert ambiguous.any() and not ambiguous.all()
    embeddings = student.image_encoder(batch.images)
    decoded = run_decoder(student.prompt_encoder, student.mask_decoder, embeddings, groups, False)
    task_terms(decoded, group_targets(batch, groups), None)[TASK_TOTAL].backward()
    # Output 0 answers boxes and several points; single clicks train the best of outputs 1-3.
    gradients = [
        head.layers[-1].weight.grad.abs().sum()
        for head in student.mask_decoder.output_hypernetworks_mlps
    ]
    assert gradients[0] > 0 and sum(gradients[1:]) > 0
