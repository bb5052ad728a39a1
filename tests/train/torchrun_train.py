"""`samkd train` (under torchrun) that records, per rank, the images whose teacher masks it
generates and the teacher masks it trains on.

usage: python -m torch.distributed.run ... torchrun_train.py FOLDER train ARGS...

Rank r writes FOLDER/generated-r.txt (one image id per line, as each image is read for its
masks) and FOLDER/masks-r.json (every training image's masks, as its `LabelFree` looks them
up); ARGS are those of `samkd train`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import samkd.train.loop
import samkd.train.teacher_masks


def main() -> None:
    folder = Path(sys.argv[1])
    rank = os.environ.get("RANK", "0")
    read_image = samkd.train.teacher_masks.load_record_image
    label_free_of = samkd.train.loop.label_free_of

    def recording_read(record: Any, **options: Any) -> Any:
        with open(folder / f"generated-{rank}.txt", "a") as log:
            log.write(f"{record.image_id}\n")
        return read_image(record, **options)

    def recording_label_free(settings: Any, dataset: Any, *args: Any) -> Any:
        label_free = label_free_of(settings, dataset, *args)
        masks = {r.image_id: label_free.pseudo_masks(r.image_id) for r in dataset.records}
        (folder / f"masks-{rank}.json").write_text(json.dumps(masks))
        return label_free

    samkd.train.teacher_masks.load_record_image = recording_read  # type: ignore[assignment]
    samkd.train.loop.label_free_of = recording_label_free  # type: ignore[assignment]
    from samkd.cli import app

    app(sys.argv[2:], prog_name="samkd")


if __name__ == "__main__":
    main()
