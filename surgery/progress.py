"""A tiny progress callback protocol: the core reports, front ends (the CLI's rich bar) display.

The core never imports rich or typer; it calls these methods on whatever object it is given.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    """What a long operation reports. Every method is optional to act on; ``NullProgress`` ignores all.

    Example:
        >>> class Printer(NullProgress):
        ...     def update(self, step, metrics):
        ...         print(step, round(metrics["loss"], 2))
        >>> Printer().update(3, {"loss": 0.123})
        3 0.12
    """

    def start(self, total: int, description: str, completed: int = 0) -> None:
        """A task of ``total`` steps begins (``completed`` already done, e.g. after a resume)."""

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """Step ``step`` (1-based count of finished steps) finished with these metrics."""

    def message(self, text: str) -> None:
        """A one-line note for the user (checkpoint saved, resumed, ...)."""

    def finish(self) -> None:
        """The task ended (successfully or not)."""


class NullProgress:
    """A progress sink that ignores everything (the default for library calls)."""

    def start(self, total: int, description: str, completed: int = 0) -> None:
        pass

    def update(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def finish(self) -> None:
        pass


class PrintProgress(NullProgress):
    """Plain text progress on a stream every ``every`` steps (for logs of background runs)."""

    def __init__(self, every: int = 50, stream=None) -> None:
        import sys

        self.every = every
        self.stream = stream or sys.stderr
        self.total = 0

    def start(self, total: int, description: str, completed: int = 0) -> None:
        self.total = total
        print(f"{description}: {total} steps (from {completed})", file=self.stream, flush=True)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.every == 0 or step == self.total:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
            print(f"step {step}/{self.total} {shown}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
