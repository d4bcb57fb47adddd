"""The run directory: config, metrics (JSON lines), atomic checkpoints, resume.

Layout of ``RUN/``:

- ``config.json``     the distillation settings of the current stage (and the data spec, for the CLI)
- ``metrics.jsonl``   one JSON object per logged step
- ``checkpoint.pt``   the latest checkpoint: trainable parameters, optimizer, scheduler, RNG, step,
                      data position (written to a temp file, fsynced, renamed: a crash or a full disk
                      leaves the previous checkpoint intact)
- ``manifest.json`` + ``model.safetensors``  the model (``surgery.save``) at the end of each stage
- ``fidelity.json``   the fidelity report of the last finished stage
- ``.surgery.lock``   while a process writes the directory (``surgery.checkpoint.lock_directory``)
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from surgery.checkpoint import atomic_write
from surgery.errors import StorageError, SurgeryError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
FIDELITY = "fidelity.json"


class RunDirectory:
    """Reads and writes one run directory (only the main process writes).

    Example:
        >>> import tempfile
        >>> run = RunDirectory(tempfile.mkdtemp())
        >>> run.write_config({"steps": 10}); run.read_config()["steps"]
        10
    """

    def __init__(self, path: str | os.PathLike, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        if writer:
            self.path.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, data: Any) -> None:
        if self.writer:
            atomic_write(self.path / name, lambda f: f.write(json.dumps(data, indent=2, default=str).encode()))

    def write_config(self, config: dict) -> None:
        self.write_json(CONFIG, config)

    def read_config(self) -> dict:
        path = self.path / CONFIG
        if not path.is_file():
            raise SurgeryError(f"{self.path} has no {CONFIG}: it is not a distillation run directory")
        return json.loads(path.read_text())

    def append_metrics(self, record: dict) -> None:
        if not self.writer:
            return
        with open(self.path / METRICS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def read_metrics(self) -> list[dict]:
        path = self.path / METRICS
        if not path.is_file():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: drop it
                continue
        return records

    def truncate_metrics(self, stage: str, step: int) -> None:
        """Drop metrics of ``stage`` logged after ``step`` (a killed run logged past its checkpoint)."""
        if not self.writer:
            return
        kept = [r for r in self.read_metrics() if r.get("stage") != stage or r.get("step", 0) <= step]
        atomic_write(self.path / METRICS, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    def save_checkpoint(self, state: dict) -> None:
        if not self.writer:
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        try:
            atomic_write(self.checkpoint_path, lambda f: f.write(buffer.getbuffer()))
        except StorageError as error:
            kept = "the previous checkpoint is kept" if self.checkpoint_path.is_file() else "no checkpoint was written"
            raise StorageError(f"{error}; {kept}") from None

    def load_checkpoint(self) -> dict | None:
        if not self.checkpoint_path.is_file():
            return None
        try:
            return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a damaged file shows up as many error types
            raise SurgeryError(f"{self.checkpoint_path} cannot be read ({type(error).__name__}); "
                               "delete it to start the stage again") from None


def settings_that_differ(recorded: dict, current: dict, stage_of: Callable[[dict], str]) -> list[str]:
    """``"lr 0.001 -> 0.002"`` for every setting whose change alone changes the stage key.

    Args:
        recorded: the settings in ``config.json`` (the stage the checkpoint belongs to).
        current: the settings of the run that wants to resume.
        stage_of: settings -> stage key (``DistillConfig.key`` of those settings).

    Example:
        >>> key = lambda values: str(values.get("lr"))
        >>> settings_that_differ({"lr": 0.001, "log_every": 5}, {"lr": 0.002, "log_every": 9}, key)
        ['lr 0.001 -> 0.002']
    """
    current = json.loads(json.dumps(current, default=str))  # as config.json stores them
    base = stage_of(current)
    found = []
    for name in sorted(set(recorded) & set(current)):
        if name != "stage" and recorded[name] != current[name] and stage_of({**current, name: recorded[name]}) != base:
            found.append(f"{name} {recorded[name]!r} -> {current[name]!r}")
    return found
