"""Run the benchmarks and rewrite BENCHMARKS.md.

python -m benchmarks                          # everything (about 25 minutes on 2 cores)
python -m benchmarks --only train_step        # one section; the others are kept
python -m benchmarks --quick --output out.md  # tiny sizes, to check that all of it runs
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from benchmarks import (
    amg,
    efficacy,
    export_speed,
    extraction,
    feature_store,
    frames,
    lora,
    loss_cost,
    preset_speed,
    real_size,
    sam2_efficacy,
    scale,
    teacher_fast_path,
    train_step,
    view_speed,
)
from benchmarks.common import Section, section_markdown, this_machine

BENCHMARKS: dict[str, Callable[[bool], Section]] = {
    feature_store.NAME: feature_store.run,
    loss_cost.NAME: loss_cost.run,
    extraction.NAME: extraction.run,
    frames.NAME: frames.run,
    train_step.NAME: train_step.run,
    lora.NAME: lora.run,
    preset_speed.NAME: preset_speed.run,
    teacher_fast_path.NAME: teacher_fast_path.run,
    efficacy.NAME: efficacy.run,
    sam2_efficacy.NAME: sam2_efficacy.run,
    amg.NAME: amg.run,
    export_speed.NAME: export_speed.run,
    real_size.NAME: real_size.run,
    scale.NAME: scale.run,
    view_speed.NAME: view_speed.run,
}
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
SECTION_PATTERN = re.compile(r"<!-- benchmark:(\S+) -->\n(.*?)<!-- /benchmark:\1 -->", re.S)

HEADER = """# Benchmarks

Written by `python -m benchmarks` (or `nox -s bench`); each section names the command that
reproduces it and the machine it ran on. The CPU machines are shared and small, so absolute
numbers move with other people's load: read the ratios, whose baselines were measured in the
same run. `benchmarks/gpu_check.sh` measures the real-size models on a GPU; its
`gpu_check.md` can be pasted in here as is, and later runs keep it.
"""


def marked(name: str, body: str) -> str:
    return f"<!-- benchmark:{name} -->\n{body}<!-- /benchmark:{name} -->\n"


def existing_sections(path: Path) -> dict[str, str]:
    """Marked sections already in the file, by name, so a partial run keeps the others."""
    if not path.exists():
        return {}
    return {match[1]: match[2] for match in SECTION_PATTERN.finditer(path.read_text())}


def document(sections: dict[str, str], quick: bool) -> str:
    known = [name for name in BENCHMARKS if name in sections]
    others = [name for name in sections if name not in BENCHMARKS]
    header = HEADER
    if quick:
        header += "\n**Quick run: tiny sizes that only check the benchmarks work.**\n"
    return header + "".join("\n" + marked(name, sections[name]) for name in known + others)


def print_section(section: Section, console: Console) -> None:
    console.rule(section.title)
    for table in section.tables:
        console.print(table.rich())
    for note in section.notes:
        console.print(f"- {note}")


def command_of(name: str, quick: bool) -> str:
    return f"python -m benchmarks --only {name}" + (" --quick" if quick else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        action="append",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run this benchmark only (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to test the suite")
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="markdown file to update (default: BENCHMARKS.md)",
    )
    args = parser.parse_args()
    console = Console()
    if not console.is_terminal:
        console.width = 150  # logs and pipes: keep the tables readable
    machine = this_machine()
    sections = existing_sections(args.output)
    began = time.perf_counter()
    for name in args.only or list(BENCHMARKS):
        console.print(f"[bold]running {name}[/bold]")
        section_began = time.perf_counter()
        section = BENCHMARKS[name](args.quick)
        seconds = time.perf_counter() - section_began
        print_section(section, console)
        sections[name] = section_markdown(section, command_of(name, args.quick), machine, seconds)
        # Written after every section, so a failure later keeps what was measured.
        args.output.write_text(document(sections, args.quick))
    console.print(f"wrote {args.output} in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
