"""The docs site builds strictly (no warnings, no broken links)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="docs extra not installed: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # no -q: mkdocs then drops warnings before --strict counts them, and a broken site passes
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    warnings = [line for line in result.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert result.returncode == 0 and not warnings, "\n".join(warnings) or result.stderr[-3000:]
    assert (tmp_path / "index.html").is_file()


def test_cli_reference_lists_every_command_and_option():
    import importlib.util

    import typer.main

    from surgery.cli import app

    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "hooks" / "cli_reference.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = hook.render()

    def walk(command, path):
        yield command, path
        for name, sub in (getattr(command, "commands", None) or {}).items():
            yield from walk(sub, [*path, name])

    commands = list(walk(typer.main.get_command(app), ["surgery"]))
    assert len(commands) > 3
    for command, path in commands[1:]:
        assert f"`{' '.join(path)}`" in page, f"{' '.join(path)} missing from the CLI reference"
        for param in command.params:
            for name in getattr(param, "opts", []):
                if name.startswith("-"):
                    assert f"`{name}`" in page, f"{' '.join(path)} {name} missing from the CLI reference"


def test_nav_pages_exist():
    """Every page in the nav exists (the generated CLI page excepted): a missing one breaks --strict
    with a less precise message."""
    import re

    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1]
    for page in re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, flags=re.M):
        assert page == "reference/cli.md" or (ROOT / "docs" / page).is_file(), page


def test_every_page_is_in_the_nav():
    """A page missing from the nav builds but cannot be reached from the menu."""
    import re

    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1]
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, flags=re.M))
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")
             if "hooks" not in p.parts}
    assert not pages - listed, f"add these pages to the nav in mkdocs.yml: {sorted(pages - listed)}"
