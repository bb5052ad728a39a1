"""The `samkd` command: parses options, resolves settings, and calls the job functions."""

from __future__ import annotations

import errno
import shutil
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from loguru import logger

from samkd import __version__
from samkd.files import existing_folder, format_bytes
from samkd.settings import Settings, SettingsError, load_settings

TAP_HELP = (
    "Feature taps: encoder.embed (neck output, B x 256 x H/16 x W/16), encoder.block.<i> "
    "(block or stage i), encoder.qk.<i> (attention block i, stored as a coarse attention map). "
    "Decoder taps (decoder.upscaled, decoder.mask_logits, decoder.iou) depend on the prompts, "
    "so extract refuses them: training computes the ones it needs from the stored "
    "encoder.embed, with each teacher's prompt encoder and mask decoder stored in the file."
)

app = typer.Typer(
    name="samkd",
    help=(
        "Distil Segment Anything teachers into MobileSAM and fine-tune it on your own data.\n\n"
        "Every subcommand reads one settings tree: defaults < --config FILE < SAMKD_* "
        "environment variables < --set key=value < the subcommand's own flags. "
        "Add --print-config to any subcommand to see the resolved settings as YAML."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings file.", show_default=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override one setting, e.g. --set train.lr=3e-4 (repeatable).",
        show_default=False,
    ),
]
PrintConfigOption = Annotated[
    bool, typer.Option("--print-config", help="Print the resolved settings as YAML and exit.")
]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"samkd {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_version_callback),
    ] = False,
) -> None:
    """Distil Segment Anything teachers into MobileSAM."""


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@contextmanager
def one_line_errors(debug: bool = False) -> Iterator[None]:
    """End every error as one line on stderr and a non-zero exit. `debug` (logging level
    DEBUG) prints the traceback first."""
    try:
        yield
    except SettingsError as error:
        raise _fail(str(error)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", code=130) from None
    except Exception as error:
        if debug:
            traceback.print_exc()
        raise _fail(describe_error(error), code=1) from None


def describe_error(error: Exception) -> str:
    """One line for an error: the message of samkd's own errors (raised on purpose, naming
    what to fix) and of the system's (a file, the disk); type and message of anything else."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}{_free_space(error)}"
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    lines = str(message).strip().splitlines() or [""]
    if type(error).__module__.split(".")[0] == "samkd" or isinstance(error, OSError):
        return lines[0]
    return (
        f"{type(error).__name__}: {lines[0]} (unexpected; run with "
        "--set logging.level=DEBUG for the traceback)"
    )


def _free_space(error: OSError) -> str:
    """`(N free)` for a full disk, said where it is full."""
    if error.errno != errno.ENOSPC:
        return ""
    free = shutil.disk_usage(existing_folder(Path(error.filename).parent)).free
    return f" ({format_bytes(free)} free)"


def resolve_settings(
    config: Path | None,
    assignments: list[str] | None,
    flags: Mapping[str, Any],
    print_config: bool,
) -> Settings:
    """Load the settings; with --print-config, print them and stop."""
    with one_line_errors():
        settings = load_settings(config, assignments or (), flags)
    if print_config:
        sys.stdout.write(settings.to_yaml())
        raise typer.Exit()
    logger.remove()
    logger.add(sys.stderr, level=settings.logging.level)
    return settings


def _teacher_flags(model_type: str | None, checkpoint: Path | None) -> list[dict[str, Any]] | None:
    if model_type is None:
        if checkpoint is not None:
            raise _fail("--checkpoint needs --teacher MODEL_TYPE")
        return None
    entry: dict[str, Any] = {"name": model_type, "model_type": model_type}
    if checkpoint is not None:
        entry["checkpoint"] = str(checkpoint)
    return [entry]


@app.command(epilog=TAP_HELP)
def extract(
    config: ConfigOption = None,
    assignments: SetOption = None,
    teacher: Annotated[
        str | None,
        typer.Option(help="Teacher model type (vit_b, vit_l, vit_h, vit_t, vit_mini, vit_t_mini)."),
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Teacher weights (with --teacher).", show_default=False)
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Dataset folder to read.", show_default=False)
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="HDF5 file to write.", show_default=False)
    ] = None,
    tap: Annotated[
        list[str] | None, typer.Option(help="Feature tap to store (repeatable).")
    ] = None,
    pseudo_masks: Annotated[
        bool,
        typer.Option(
            "--pseudo-masks",
            help="Also store a teacher's automatic masks of each image "
            "(extract.pseudo_masks.enabled; options under extract.pseudo_masks).",
        ),
    ] = False,
    print_config: PrintConfigOption = False,
) -> None:
    """Run teachers over a dataset and store their features in one HDF5 file."""
    flags = {
        "teachers": _teacher_flags(teacher, checkpoint),
        "data.train": str(data) if data else None,
        "extract.output": str(output) if output else None,
        "extract.taps": tap or None,
        "extract.pseudo_masks.enabled": True if pseudo_masks else None,
    }
    settings = resolve_settings(config, assignments, flags, print_config)
    from samkd.extract import run_extract

    with one_line_errors(settings.logging.level == "DEBUG"):
        run_extract(settings)


@app.command()
def train(
    config: ConfigOption = None,
    assignments: SetOption = None,
    features: Annotated[
        Path | None, typer.Option(help="HDF5 feature file from `samkd extract`.")
    ] = None,
    online: Annotated[
        bool | None,
        typer.Option("--online/--precomputed", help="Run the teachers during training."),
    ] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Run folder.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run in this folder.", show_default=False)
    ] = None,
    print_config: PrintConfigOption = False,
) -> None:
    """Distil the student from stored or online teacher features."""
    flags = {
        "distillation.features": str(features) if features else None,
        "distillation.use_precomputed_features": None if online is None else not online,
        "train.output_dir": str(output_dir) if output_dir else None,
        "train.steps": steps,
    }
    settings = resolve_settings(config, assignments, flags, print_config)
    from samkd.train import run_train

    with one_line_errors(settings.logging.level == "DEBUG"):
        run_train(settings, resume=resume)


@app.command("eval")
def evaluate(
    config: ConfigOption = None,
    assignments: SetOption = None,
    model_type: Annotated[
        str | None, typer.Option(help="Model type to evaluate (default: student.model_type).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Weights to evaluate.", show_default=False)
    ] = None,
    onnx: Annotated[
        Path | None,
        typer.Option(
            help="Evaluate an exported pair instead of weights: a `samkd export` folder, or "
            "one of its image_encoder*.onnx files (the decoder*.onnx of the same name beside).",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Dataset folder with masks.", show_default=False)
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write every number to this JSON file.")
    ] = None,
    overlays: Annotated[
        Path | None,
        typer.Option(
            help="Draw the first eval.overlay_images images in this folder, one PNG each: "
            "ground truth, predicted masks, prompts and IoUs."
        ),
    ] = None,
    amg: Annotated[
        bool,
        typer.Option(
            "--amg",
            help="Also score automatic mask generation against every object: recall, best "
            "IoU, masks and time per image (eval.amg.enabled; options under eval.amg).",
        ),
    ] = False,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="Also evaluate this teacher (a name from `teachers` or a model type) and "
            "the agreement of the student's masks with its masks."
        ),
    ] = None,
    features: Annotated[
        Path | None,
        typer.Option(
            help="Compare with the teacher stored in this feature file (its embeddings and "
            "decoder; --teacher picks one of several)."
        ),
    ] = None,
    print_config: PrintConfigOption = False,
) -> None:
    """Measure mask quality (mIoU, Dice and boundary IoU with box and point prompts),
    teacher agreement and speed."""
    if onnx is not None and (checkpoint is not None or model_type is not None):
        raise _fail("--onnx evaluates exported files; leave out --checkpoint and --model-type")
    flags = {
        "student.model_type": model_type,
        "student.checkpoint": str(checkpoint) if checkpoint else None,
        "data.val": str(data) if data else None,
        "eval.amg.enabled": True if amg else None,
    }
    settings = resolve_settings(config, assignments, flags, print_config)
    from samkd.evaluate import run_eval

    with one_line_errors(settings.logging.level == "DEBUG"):
        run_eval(
            settings,
            json_path=json_path,
            overlays_dir=overlays,
            teacher=teacher,
            features=features,
            onnx=onnx,
        )


@app.command()
def inspect(
    path: Annotated[
        Path,
        typer.Argument(help="A feature file (.h5), run folder, checkpoint or dataset folder."),
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="YAML settings file; only its logging options (e.g. logging.level) and, for a "
            "dataset folder, data.layout, data.annotation_file and data.mask_threshold apply.",
            show_default=False,
        ),
    ] = None,
    assignments: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Override one setting (repeatable); only logging options and, for a dataset "
            "folder, data.layout, data.annotation_file and data.mask_threshold apply, "
            "e.g. --set data.layout=dsb.",
            show_default=False,
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of tables.")
    ] = False,
    check: Annotated[bool, typer.Option(help="Read everything and verify it.")] = False,
    overlay: Annotated[
        Path | None,
        typer.Option(
            help="Write a PNG of the pseudo-masks of a few images (a feature file made "
            "with `samkd extract --pseudo-masks`).",
            show_default=False,
        ),
    ] = None,
    image: Annotated[
        list[str] | None,
        typer.Option(
            help="Image id to draw with --overlay (repeatable; default: the first few with "
            "pseudo-masks).",
            show_default=False,
        ),
    ] = None,
    print_config: PrintConfigOption = False,
) -> None:
    """Explain a feature file, a training run, a checkpoint or a dataset folder.

    For a dataset folder: its layout, images, objects by size, images without objects and
    problems found (exit status 1 when there are any)."""
    settings = resolve_settings(config, assignments, {}, print_config)
    from samkd.inspect import run_inspect

    with one_line_errors(settings.logging.level == "DEBUG"):
        code = run_inspect(
            path,
            as_json=json_output,
            check=check,
            overlay=overlay,
            images=image or (),
            data=settings.data,
        )
    raise typer.Exit(code)


@app.command()
def export(
    source: Annotated[
        Path | None,
        typer.Argument(
            help="A training run folder (its student.pt) or a checkpoint (default: --checkpoint "
            "/ student.checkpoint); a run's student.pt and checkpoints/*.pt are exported with "
            "the run's model type and image size.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOption = None,
    assignments: SetOption = None,
    model_type: Annotated[
        str | None,
        typer.Option(
            help="Model type of a checkpoint that no training run wrote (default: "
            "student.model_type)."
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Weights to export (instead of SOURCE).", show_default=False)
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Dataset folder with masks for the parity check (default: generated shapes).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Folder to write (export.output).", show_default=False),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(help="int8: also write int8-weight copies and report their parity."),
    ] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (17 or later).")] = None,
    print_config: PrintConfigOption = False,
) -> None:
    """Write the model as ONNX (image encoder and segment-anything's decoder) and check the
    files against PyTorch."""
    if source is not None and checkpoint is not None:
        raise _fail("pass SOURCE or --checkpoint, not both")
    flags = {
        "student.model_type": model_type,
        "student.checkpoint": str(checkpoint) if checkpoint else None,
        "data.val": str(data) if data else None,
        "export.output": str(output) if output else None,
        "export.quantize": quantize,
        "export.opset": opset,
    }
    settings = resolve_settings(config, assignments, flags, print_config)
    from samkd.export import run_export

    with one_line_errors(settings.logging.level == "DEBUG"):
        run_export(settings, source)


@app.command()
def view(
    sources: Annotated[
        list[Path] | None,
        typer.Argument(
            help="One or two models: a training run folder (its student.pt, else its latest "
            "checkpoint, model type and image size), a checkpoint (of --model-type) or a "
            "samkd export folder (or its image_encoder*.onnx file).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOption = None,
    assignments: SetOption = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="Also show this teacher: a name from a run folder's (or --config's) "
            "teachers, or a model type (weights: --teacher-checkpoint).",
            show_default=False,
        ),
    ] = None,
    teacher_checkpoint: Annotated[
        Path | None,
        typer.Option(help="Weights of the --teacher model type.", show_default=False),
    ] = None,
    model_type: Annotated[
        str | None,
        typer.Option(help="Model type of a checkpoint SOURCE (default: student.model_type)."),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            help="Input size of a checkpoint SOURCE and of a --teacher model type "
            "(data.image_size; default: the type's own size).",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Dataset folder to pick images from (any layout; ground truth gives IoUs).",
            show_default=False,
        ),
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option(
            help="Training run folder of the run tab (default: the first run folder SOURCE).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to serve on (0.0.0.0: every network interface).")
    ] = "127.0.0.1",
    port: Annotated[
        int | None,
        typer.Option(help="Port (default: the first free one from 7860).", show_default=False),
    ] = None,
    share: Annotated[
        bool, typer.Option("--share", help="Also make a public link through Gradio's servers.")
    ] = False,
    print_config: PrintConfigOption = False,
) -> None:
    """Serve a local web page to click on images and compare the masks of a student and its
    teacher, and to follow a training run's curves (needs pip install 'samkd[view]')."""
    flags = {
        "student.model_type": model_type,
        "data.image_size": image_size,
    }
    settings = resolve_settings(config, assignments, flags, print_config)
    from samkd.view import run_view

    with one_line_errors(settings.logging.level == "DEBUG"):
        run_view(
            settings,
            sources or [],
            teacher=teacher,
            teacher_checkpoint=teacher_checkpoint,
            data=data,
            run=run,
            host=host,
            port=port,
            share=share,
        )
