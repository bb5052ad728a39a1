"""SAM 2's mask decoder as samkd decodes: all four outputs of a group of prompts.

SAM's `MaskDecoder.predict_masks` returns the single-mask output (0) and the three multimask
ones (1-3); training keeps all four and picks per object. SAM 2's does the same and also takes
the two high-resolution maps. What SAM 2 answers when one mask is asked for is not always
output 0: `dynamic_multimask_via_stability` (set by `build_sam2` for inference, and by
samkd's builder) swaps in the best multimask output when output 0 is unstable, in eval mode.
`predict_all_masks` applies it to output 0, so that "the teacher's single mask" is SAM 2's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def predict_all_masks(
    mask_decoder: Any,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    high_res: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits `n x 4 x 4h x 4w` and predicted IoUs `n x 4` of `n` prompts.

    image_embeddings: `n x 256 x h x w`, each prompt's image's; sparse: `n x T x 256`; dense:
    `n x 256 x h x w`; high_res: those images' `n x 32 x 4h x 4w` and `n x 64 x 2h x 2w`
    maps. Output 0 is SAM 2's single-mask answer (see the module docstring); the object score
    is not applied, as `SAM2ImagePredictor` does not apply it.
    """
    logits, scores, _, _ = mask_decoder.predict_masks(
        image_embeddings=image_embeddings,
        image_pe=image_pe,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        repeat_image=False,
        high_res_features=list(high_res),
    )
    if mask_decoder.dynamic_multimask_via_stability and not mask_decoder.training:
        single, single_score = mask_decoder._dynamic_multimask_via_stability(logits, scores)
        logits = torch.cat([single, logits[:, 1:]], dim=1)
        scores = torch.cat([single_score, scores[:, 1:]], dim=1)
    return logits, scores


@dataclass(frozen=True)
class Sam2Features:
    """What a SAM 2 decoder takes of B images: `image_embed` `B x 256 x h x w` and the
    high-resolution maps `(B x 32 x 4h x 4w, B x 64 x 2h x 2w)`. Indexing selects images
    (`features[i]` keeps the batch axis, as `features[i : i + 1]`)."""

    image_embed: torch.Tensor
    high_res: tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return self.image_embed.shape[0]

    def __iter__(self) -> Iterator[Sam2Features]:
        """Each image's features, batch axis kept."""
        return (self[index] for index in range(len(self)))

    def __getitem__(self, index: int | slice) -> Sam2Features:
        chosen = slice(index, index + 1) if isinstance(index, int) else index
        return Sam2Features(
            self.image_embed[chosen], tuple(level[chosen] for level in self.high_res)
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Sam2Features:
        return Sam2Features(
            self.image_embed.to(device, dtype),
            tuple(level.to(device, dtype) for level in self.high_res),
        )
