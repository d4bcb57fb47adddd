"""Teacher activation cache: what the teacher computed for a batch (each site's input, padding mask
and target context), stored on disk in safetensors shards so later epochs skip the teacher forward.

Batches are recognised by a digest of their input tensors, so an epoch that repeats the same batches
in another order still hits; one whose samples were reshuffled into new batches does not (built-in
data keeps its batches fixed when a cache is used: ``Batches(shuffle="batches")``). Memory
stays bounded: records are buffered until ``shard_megabytes`` and then written as one shard
(atomically); reads open only the tensors of the batch asked for. Block-wise (teacher-forced)
distillation stores each site's input, mask and target, which is all it needs from the teacher;
end-to-end distillation stores each site's mask and target plus the teacher's main output (the
student feeds its own inputs), see ``surgery.distill.engine``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from surgery.checkpoint import atomic_write
from surgery.distill.capture import SiteRecord

INDEX = "index.json"


def batch_digest(args: tuple, kwargs: dict) -> str:
    """A digest of every tensor in a batch (shape, dtype and bytes)."""
    digest = hashlib.sha1()
    items = list(enumerate(args)) + sorted(kwargs.items())
    for key, value in items:
        digest.update(str(key).encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().contiguous().cpu()
            digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


class TeacherCache:
    """Teacher records on disk, in shards of about ``shard_megabytes``.

    Args:
        directory: where the shards and their index live (created).
        shard_megabytes: buffer size before a shard is written.
        dtype: storage dtype of the float tensors (float16 halves the disk use; float32 keeps them exact).

    Example:
        >>> import tempfile, torch
        >>> cache = TeacherCache(tempfile.mkdtemp())
        >>> record = SiteRecord(torch.ones(1, 2, 4), None, torch.zeros(1, 2, 4))
        >>> cache.put("abc", {"blocks.0.attn": record}); cache.flush()
        >>> cache.get("abc", torch.device("cpu"))["blocks.0.attn"].hidden.shape
        torch.Size([1, 2, 4])
    """

    def __init__(self, directory: str | os.PathLike, shard_megabytes: float = 256, dtype: torch.dtype = torch.float32,
                 writer: bool = True) -> None:
        self.directory = Path(directory)
        self.writer = writer
        if writer:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.limit = int(shard_megabytes * 2 ** 20)
        self.dtype = dtype
        self.index: dict[str, dict[str, Any]] = {}
        if (self.directory / INDEX).is_file():
            self.index = json.loads((self.directory / INDEX).read_text())
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_meta: dict[str, dict[str, Any]] = {}
        self.pending_bytes = 0
        self.hits = self.misses = 0

    def __contains__(self, key: str) -> bool:
        return key in self.index or key in self.pending_meta

    def put(self, key: str, records: dict[str, SiteRecord]) -> None:
        """Buffer one batch's records (written with the next full shard or ``flush``)."""
        if key in self or not self.writer:
            return
        sites = []
        for number, (name, record) in enumerate(records.items()):
            sites.append(name)
            for field in ("hidden", "mask", "target"):
                tensor = getattr(record, field)
                if tensor is None:
                    continue
                tensor = tensor.detach().to("cpu")
                if tensor.is_floating_point():
                    tensor = tensor.to(self.dtype)
                self.pending[f"{key}.{number}.{field}"] = tensor.contiguous()
                self.pending_bytes += tensor.numel() * tensor.element_size()
        self.pending_meta[key] = {"sites": sites}
        if self.pending_bytes >= self.limit:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records as one shard and update the index (both atomically)."""
        if not self.pending or not self.writer:
            return
        from safetensors.torch import save

        shard = f"shard_{len({m['shard'] for m in self.index.values()}):05d}.safetensors"
        tensors = self.pending
        atomic_write(self.directory / shard, lambda f: f.write(save(tensors)))
        for key, meta in self.pending_meta.items():
            self.index[key] = {**meta, "shard": shard}
        atomic_write(self.directory / INDEX, lambda f: f.write(json.dumps(self.index).encode()))
        self.pending, self.pending_meta, self.pending_bytes = {}, {}, 0

    def get(self, key: str, device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, SiteRecord] | None:
        """The records of batch ``key``, or None when not cached."""
        if key in self.pending_meta:
            meta, source = self.pending_meta[key], self.pending
            read = lambda name: source.get(name)  # noqa: E731
        elif key in self.index:
            from safetensors import safe_open

            meta = self.index[key]
            handle = safe_open(str(self.directory / meta["shard"]), framework="pt")
            names = set(handle.keys())
            read = lambda name: handle.get_tensor(name) if name in names else None  # noqa: E731
        else:
            self.misses += 1
            return None
        self.hits += 1
        records = {}
        for number, name in enumerate(meta["sites"]):
            values = {}
            for field in ("hidden", "mask", "target"):
                tensor = read(f"{key}.{number}.{field}")
                if tensor is not None:
                    tensor = tensor.to(device)
                    if tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                values[field] = tensor
            records[name] = SiteRecord(values["hidden"], values["mask"], values["target"])
        return records
