"""Typed exceptions: every user-facing failure is one line naming the problem and the fix."""

from __future__ import annotations


class SurgeryError(Exception):
    """Base class for all errors raised by surgery; the CLI prints them as one line, exit code 2."""


class UnknownNameError(SurgeryError, KeyError):
    """A model, replacement or recipe name that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class NoAttentionFoundError(SurgeryError):
    """The model has no attention site the locator (or the user's targets) could find."""


class UnsupportedSiteError(SurgeryError):
    """A site the chosen replacement cannot serve (e.g. cross-attention, odd calling convention)."""


class WeightsUnavailableError(SurgeryError):
    """Pretrained weights are not available offline."""


class ManifestError(SurgeryError):
    """A saved model directory whose manifest or weights do not match, or are damaged."""


class DataError(SurgeryError):
    """Data that does not fit the model, or a dataset that is missing or malformed."""


class TrainingDivergedError(SurgeryError):
    """A loss became NaN or infinite during training."""


class PruningError(SurgeryError):
    """A pruning request that cannot be carried out (bad ratio, unprunable site, head floor)."""


class ExportError(SurgeryError):
    """A model that cannot be exported in the requested format."""


class StorageError(SurgeryError):
    """A file or directory that cannot be written (read-only, disk full, a file in the way)."""


class RunLockedError(SurgeryError):
    """A run directory that another process is writing (it holds the directory's lock)."""


class OutputExistsError(SurgeryError):
    """An output directory that holds other files or another run (the CLI's ``--overwrite`` confirms)."""


def close_matches(name: str, choices) -> str:
    """Return a ' Did you mean ...?' suffix for an unknown name, or ''."""
    import difflib

    found = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(f) for f in found)}?" if found else ""
