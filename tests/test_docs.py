"""The generated reference pages in docs/ match the code they are generated from."""

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from samkd.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_docs", module)
    spec.loader.exec_module(module)
    return module


gen_docs = load_generator()


@pytest.mark.parametrize("name", sorted(gen_docs.PAGES))
def test_generated_page_is_current(name: str) -> None:
    committed = (DOCS / name).read_text() if (DOCS / name).is_file() else ""
    assert committed == gen_docs.PAGES[name](), (
        f"docs/{name} is out of date; run: {gen_docs.COMMAND}"
    )


def dotted_keys(model: type, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            keys += dotted_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_settings_page_lists_every_key() -> None:
    text = (DOCS / "settings.md").read_text()
    for key in dotted_keys(Settings):
        assert f"| `{key}` |" in text, key
        env = "SAMKD_" + key.upper().replace(".", "__")
        assert f"`{env}`" in text, env


def test_cli_page_lists_every_command() -> None:
    text = (DOCS / "cli.md").read_text()
    for command in ("extract", "train", "eval", "inspect"):
        assert f"## samkd {command}" in text


def test_losses_page_names_real_settings() -> None:
    """Every `distillation.*` / `teachers[i].*` / `train.*` key in losses.md exists."""
    keys = set(dotted_keys(Settings))
    text = (DOCS / "losses.md").read_text()
    named = set(re.findall(r"`((?:distillation|train|data)\.[a-z_.]+)`", text))
    assert named
    sections = {key.rsplit(".", 1)[0] for key in keys}
    unknown = sorted(name for name in named if name not in keys and name not in sections)
    assert not unknown, unknown


def test_check_mode_reports_stale_pages(tmp_path: Path) -> None:
    (tmp_path / "cli.md").write_text("stale\n")
    assert "cli.md" in gen_docs.stale_pages(tmp_path)
