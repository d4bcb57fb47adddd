"""Every python/bash code block of the tutorials and how-tos runs, at toy scale, so the docs can't rot.

Blocks of one page run in order, in one temporary working directory: python blocks share one
namespace, ``surgery ...`` lines run in-process through typer's CliRunner, other shell lines
(``python``, ``torchrun``) run as subprocesses. HTML comments right before a block (invisible on
the site) adapt it to the test:

    <!-- docs-test: skip (reason) -->              the next block is not run (a reason is required)
    <!-- docs-test: expect-output -->              the next (text) block must equal what the block
                                                   before it printed (trailing spaces ignored)
    <!-- docs-test: replace 'OLD' 'NEW' -->        text substitution in the next block only
    <!-- docs-test-page: replace 'OLD' 'NEW' -->   substitution in every block of the page
    <!-- docs-test-page: slow -->                  mark the page's test slow (subprocess-heavy pages)
    <!-- docs-test-setup                           hidden python run before the next block
    ...code...
    -->

A python block titled like a file (```` ```python title="my_model.py" ````) is written to that file
in the working directory instead of being run, so later blocks and ``py:my_model:build`` import it.

Substitutions must match (an unused one fails the test), so they cannot silently go stale.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TESTED = ["get-started.md", "tutorials", "how-to"]
RUNNABLE = {"python", "py", "bash", "sh", "shell"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)(.*)$")
DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test(-page)?:\s*([\w-]+)\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    language: str
    code: str
    line: int
    title: str = ""
    replacements: list[tuple[str, str]] = field(default_factory=list)
    setup: str = ""
    skip: str | None = None


@dataclass
class Page:
    path: Path
    blocks: list[Block]
    page_replacements: list[tuple[str, str]]


def pages_to_test() -> list[Path]:
    pages = []
    for entry in TESTED:
        path = DOCS / entry
        pages += sorted(path.rglob("*.md")) if path.is_dir() else ([path] if path.exists() else [])
    return pages


def parse(path: Path) -> Page:
    """Fenced blocks of a page, with the directives that precede them."""
    lines = path.read_text().splitlines()
    blocks, page_replacements = [], []
    pending: dict = {"replacements": [], "setup": "", "skip": None}
    expect_next = False
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = DIRECTIVE.match(line)
        if directive:
            page_level, verb, rest = directive.groups()
            if verb == "replace":
                pair = shlex.split(rest)
                assert len(pair) == 2, f"{path.name}:{i + 1}: replace needs 'OLD' 'NEW', got {rest!r}"
                (page_replacements if page_level else pending["replacements"]).append(tuple(pair))
            elif verb == "skip" and not page_level:
                assert rest, f"{path.name}:{i + 1}: docs-test: skip needs a reason"
                pending["skip"] = rest
            elif verb == "slow" and page_level:
                pass  # read by pages_to_test: the page's test is marked slow
            elif verb == "expect-output" and not page_level:
                expect_next = True
            else:
                raise AssertionError(f"{path.name}:{i + 1}: unknown directive {line.strip()!r}")
            i += 1
            continue
        if line.strip() == "<!-- docs-test-setup":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->")
            pending["setup"] += "\n".join(lines[i + 1:end]) + "\n"
            i = end + 1
            continue
        fence = FENCE.match(line)
        if fence:
            indent, marker, language, attributes = fence.groups()
            title = re.search(r'title="([^"]+)"', attributes)
            end = next(j for j in range(i + 1, len(lines))
                       if lines[j].strip().startswith(marker) and not lines[j].strip()[len(marker):].strip())
            body = textwrap.dedent("\n".join(l[len(indent):] if l.startswith(indent) else l
                                             for l in lines[i + 1:end]))
            if expect_next:
                assert blocks and language.lower() not in RUNNABLE, (
                    f"{path.name}:{i + 1}: expect-output must precede a text block after a code block")
                blocks.append(Block("expect", body + "\n", i + 1))
                expect_next = False
            elif language.lower() in RUNNABLE:
                blocks.append(Block(language.lower(), body + "\n", i + 1,
                                    title.group(1) if title else "", **pending))
            else:
                assert not (pending["replacements"] or pending["setup"] or pending["skip"]), (
                    f"{path.name}:{i + 1}: a docs-test directive precedes a {language or 'plain'} block")
            pending = {"replacements": [], "setup": "", "skip": None}
            i = end + 1
            continue
        i += 1
    return Page(path, blocks, page_replacements)


def shell_commands(code: str) -> list[list[str]]:
    """Shell lines as argument lists: continuations joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1:]
    return commands


def run_shell(code: str, where: str, cwd: Path) -> str:
    """Run a shell block; returns what its commands printed on stdout."""
    from typer.testing import CliRunner

    from surgery.cli import app

    printed = []
    for words in shell_commands(code):
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        if words[0] == "surgery":
            # in-process: sys.path already holds the working directory (PYTHONPATH=. for users)
            result = CliRunner().invoke(app, words[1:], env=env)
            assert result.exit_code == 0, (
                f"{where}: `{shlex.join(words)}` exited {result.exit_code}:\n{result.output[-3000:]}"
                + (f"\n{result.exception!r}" if result.exception else ""))
            printed.append(result.stdout)
        elif words[0] in ("python", "python3", "torchrun"):
            program = ([sys.executable] if words[0] != "torchrun"
                       else [sys.executable, "-m", "torch.distributed.run"])
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{cwd}", **env}
            result = subprocess.run(program + words[1:], cwd=cwd, env=env, capture_output=True,
                                    text=True, timeout=300)
            assert result.returncode == 0, f"{where}: `{shlex.join(words)}` failed:\n{result.stderr[-3000:]}"
            printed.append(result.stdout)
        else:
            raise AssertionError(f"{where}: the doc tests cannot run `{words[0]}`; mark the block "
                                 "<!-- docs-test: skip (reason) --> or use surgery/python")
    return "".join(printed)


def normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def apply(code: str, replacements: list[tuple[str, str]], where: str) -> str:
    for old, new in replacements:
        assert old in code, f"{where}: docs-test replacement {old!r} no longer matches the block"
        code = code.replace(old, new)
    return code


PAGES = pages_to_test()
SLOW = "<!-- docs-test-page: slow -->"
PARAMS = [pytest.param(p, id=str(p.relative_to(DOCS)),
                       marks=[pytest.mark.slow] if SLOW in p.read_text() else [])
          for p in PAGES]


def test_tested_pages_exist():
    assert PAGES, "no tutorial or how-to pages found"


@pytest.mark.parametrize("path", PARAMS)
def test_page_examples_run(path, tmp_path, monkeypatch):
    page = parse(path)
    runnable = [b for b in page.blocks if b.skip is None and b.language != "expect"]
    assert runnable, f"{path.name} has no runnable block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # modules a page writes (my_model.py) import
    from surgery import registry

    # replacements a page registers (window_mean) must not leak into later tests
    registry._load_builtins()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    torch.manual_seed(0)
    # a real module, so dataclasses and pickling can find the classes a page defines
    module = types.ModuleType("docs_page_" + re.sub(r"\W", "_", path.stem))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    unused_page = set(page.page_replacements)
    printed: str | None = None  # what the last block printed; None after a skipped block
    for block in page.blocks:
        where = f"{path.relative_to(ROOT)}:{block.line}"
        if block.skip is not None:
            printed = None
            continue
        if block.language == "expect":
            if printed is not None:
                assert normalise(printed) == normalise(block.code), (
                    f"{where}: the block above printed\n{printed}\ninstead of\n{block.code}")
            continue
        code = block.code
        for old, new in page.page_replacements:
            if old in code:
                code = code.replace(old, new)
                unused_page.discard((old, new))
        code = apply(code, block.replacements, where)
        if block.setup:
            exec(compile(block.setup, f"{where} (setup)", "exec"), namespace)
        if block.title.endswith(".py"):
            (tmp_path / block.title).write_text(code)  # a file the page's later blocks import
            printed = ""
        elif block.language in ("python", "py"):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                exec(compile(code, where, "exec"), namespace)
            printed = out.getvalue()
            sys.stdout.write(printed)
        else:
            printed = run_shell(code, where, tmp_path)
    assert not unused_page, f"{path.name}: page replacements never used: {sorted(unused_page)}"


def test_parser_reads_directives(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(textwrap.dedent("""\
        <!-- docs-test-page: replace 'big' 'small' -->
        <!-- docs-test: skip (needs a GPU) -->
        ```bash
        surgery distill --gpu
        ```
        <!-- docs-test: replace '1000' '2' -->
        <!-- docs-test-setup
        x = 1
        -->
        ```python
        steps = 1000
        ```
        <!-- docs-test: expect-output -->
        ```text
        output, compared
        ```
        ```text
        not run
        ```
        """))
    parsed = parse(page)
    assert parsed.page_replacements == [("big", "small")]
    skipped, python, expected = parsed.blocks
    assert expected.language == "expect" and expected.code == "output, compared\n"
    assert skipped.skip == "(needs a GPU)" and skipped.language == "bash"
    assert python.replacements == [("1000", "2")] and python.setup == "x = 1\n"
    assert shell_commands("surgery a \\\n  --b c && surgery d  # note\n") == [
        ["surgery", "a", "--b", "c"], ["surgery", "d"]]
