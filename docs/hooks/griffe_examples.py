"""griffe extension: read a Google-style ``Example:`` section as ``Examples:``.

The project's docstrings end with ``Example:`` (see STYLE.md). griffe only parses the plural
``Examples:`` into doctest code blocks; the singular becomes a markdown admonition, where
``>>>`` lines render as nested quotes and ``[...]`` outputs as broken cross-references. Renaming
the heading before griffe parses the docstring renders the examples as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` headings to ``Examples:`` in every loaded docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
