"""Old import names kept working from a source checkout: ``replacements`` and ``recipes`` are
installed as ``surgery.replacements`` and ``surgery.recipes`` (so they never clash with another
project's top-level module); importing them by the old name gives the very same module objects."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, real: ModuleType) -> None:
        self.real = real
        self.spec = real.__spec__

    def create_module(self, spec):  # the real module, not a second copy of it
        return self.real

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.spec  # the import system set the alias spec on it


class _AliasFinder(importlib.abc.MetaPathFinder):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.old + "."):
            return None
        real = importlib.import_module(self.new + fullname[len(self.old):])
        return importlib.util.spec_from_loader(fullname, _AliasLoader(real))


def alias_package(old: str, new: str) -> ModuleType:
    """Make ``import old`` and ``import old.X`` return the modules ``new`` and ``new.X``."""
    package = importlib.import_module(new)
    sys.modules[old] = package
    if not any(isinstance(f, _AliasFinder) and f.old == old for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder(old, new))
    for name, module in list(sys.modules.items()):
        if name.startswith(new + "."):
            sys.modules.setdefault(old + name[len(new):], module)
    return package
