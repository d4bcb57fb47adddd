"""Save and load replaced models: safetensors weights + a JSON manifest, written atomically.

Loading never unpickles and never imports code named by the files: the manifest's replacement
names resolve only through the replacement registry, and its model source only through
``surgery.models`` (timm / HuggingFace / bundled MiniLM; ``py:`` sources and HuggingFace
directories with custom code need ``allow_code=True``).

A save is one atomic step: the new weights go to a file named by their content hash, the manifest
rename that names it is the single commit point, and only then is it renamed to
``model.safetensors`` (a crash at any moment leaves a directory that loads, old or new). Writers
hold the directory's lock (``lock_directory``), so two processes never interleave their saves.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from surgery.errors import ManifestError, OutputExistsError, RunLockedError, StorageError, SurgeryError
from surgery.registry import get_replacement
from surgery.sites import AttentionSite
from surgery.sources import describe_source, rebuild_from_source
from surgery.swap import ReplacedAttention, finalize, replace_attention, replaced_sites

FORMAT = "surgery/1"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
SOURCE_ATTRIBUTE = "surgery_source"
LOCK = ".surgery.lock"
#: weights written by a save that has not finished renaming them to WEIGHTS: model.<sha256[:16]>.safetensors
STAGED = re.compile(r"model\.[0-9a-f]{16}\.safetensors")
#: files of a distillation run (besides the model), removed when --overwrite replaces another run
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "fidelity.json", "teacher_cache")
#: module attributes a manifest may set on load (structure a pruned model changed): plain numbers only
ALLOWED_ATTRIBUTES = frozenset({
    "num_heads", "num_attention_heads", "n_head", "n_heads", "heads", "nhead", "head_dim", "attn_dim",
    "embed_dim", "hidden_size", "attention_head_size", "all_head_size", "split_size", "scale", "scaling",
    "in_features", "out_features", "hidden_per_head", "dim",
})
_HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads", "nhead")


def _commit_point(name: str) -> None:
    """Called at each step of ``save`` (a no-op; tests replace it to kill the process right there)."""


def storage_error(error: OSError, path: str | os.PathLike) -> StorageError:
    """An OSError met while writing ``path`` as one line naming the cause and the fix."""
    reasons = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.ENOTDIR: "a part of the path is a file, not a directory",
               errno.EEXIST: "a file is in the way", errno.EISDIR: "it is a directory",
               getattr(errno, "EDQUOT", -1): "the disk quota is used up"}
    reason = reasons.get(error.errno, error.strerror or type(error).__name__)
    return StorageError(f"cannot write {path}: {reason}; free space, or choose a writable location")


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write a file through ``write(file_object)`` to a temp file, fsync, then rename over ``path``:
    a crash or a full disk leaves the previous file intact. The file gets the permissions the
    user's umask gives (as ``open`` does); an OSError becomes one ``StorageError`` line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise storage_error(error, path.parent) from None
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        # os.open applies the umask to 0o666; tempfile.mkstemp would make every file 0600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise storage_error(error, path) from None
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every platform opens directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path: str | os.PathLike) -> None:
    """Fail in one line, before any work, when the file ``path`` cannot be created (a read-only or full
    disk, a file where a folder should be): a probe file is created next to it and removed."""
    path = Path(path)
    if path.is_dir():
        raise StorageError(f"{path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.unlink(probe)
    except OSError as error:
        raise storage_error(error, path) from None


# ------------------------------------------------------------------------------------------ lock
_held: dict[str, int] = {}


@contextlib.contextmanager
def lock_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of ``directory`` (created if needed) while the block runs.

    The lock is ``directory/.surgery.lock``, holding the holder's pid, host, start time and command,
    and locked with ``flock``: a process that dies (even by SIGKILL) releases it, so a lock file left
    behind by a dead holder is stale and simply taken over. A second process gets one
    ``RunLockedError`` line naming the holder. Re-entrant within one process (``save`` inside a
    locked distillation run).

    Example:
        >>> import tempfile
        >>> with lock_directory(tempfile.mkdtemp()) as path:
        ...     (path / ".surgery.lock").is_file()
        True
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise StorageError(f"{directory} is a file, not a directory; give a directory path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise storage_error(error, directory) from None
    key = os.path.realpath(directory)
    if key in _held:
        _held[key] += 1
        try:
            yield directory
        finally:
            _held[key] -= 1
        return
    path = directory / LOCK
    fd = _acquire(path, directory)
    _held[key] = 1
    try:
        yield directory
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: a process that opened this file sees it replaced
        os.close(fd)


def _holder_record() -> bytes:
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}).encode()


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _locked_error(directory: Path, holder: dict) -> RunLockedError:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if holder.get("since"):
        who += f", since {holder['since']}"
    if holder.get("command"):
        who += f": {holder['command']}"
    return RunLockedError(f"{directory} is being written by another process ({who}); wait for it to "
                          "finish, or write to another directory")


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, owned by someone else
    return True


def _acquire(path: Path, directory: Path) -> int:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): an exclusive create, and a dead holder's pid is stale
        return _acquire_exclusive(path, directory)
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise storage_error(error, path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _locked_error(directory, _read_holder(path)) from None
        except OSError as error:  # e.g. ENOLCK: a network file system without flock
            os.close(fd)
            raise StorageError(f"cannot lock {path}: {error.strerror or error}; the file system does not support "
                               "file locks (flock): write the run to a local disk") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and our lock
            os.close(fd)
            continue
        # a record left by a holder that died is stale: the lock was free, we take it over
        os.ftruncate(fd, 0)
        os.write(fd, _holder_record())
        return fd
    raise RunLockedError(f"cannot take the lock of {directory}: other processes keep replacing {path}")


def _acquire_exclusive(path: Path, directory: Path) -> int:
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _read_holder(path)
            if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")):
                with contextlib.suppress(OSError):
                    os.unlink(path)  # stale: its holder died without removing it
                continue
            raise _locked_error(directory, holder) from None
        except OSError as error:
            raise storage_error(error, path) from None
        os.write(fd, _holder_record())
        return fd
    raise RunLockedError(f"cannot take the lock of {directory}: other processes keep replacing {path}")


# ------------------------------------------------------------------------------ output directory
def check_output_directory(directory: str | os.PathLike, *, same_run: Callable[[dict], bool] | None = None,
                           overwrite: bool = False, option: str = "--out") -> None:
    """Refuse to write into ``directory`` when it holds anything but an earlier run of the same thing.

    A missing or empty directory is fine, and so is a saved run for which ``same_run(manifest)`` is
    True (it is written again). Anything else raises ``OutputExistsError`` (one line; the CLI's
    ``--overwrite`` confirms): with ``overwrite`` the earlier run's files (manifest, weights, and a
    distillation's config, metrics, checkpoint, fidelity report, teacher cache) are removed first,
    so nothing of the other run is mixed with the new one; files surgery did not write stay.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise StorageError(f"{option} {directory} is a file, not a directory; give a directory path")
    if not directory.is_dir():
        return
    entries = sorted(e.name for e in directory.iterdir()
                     if e.name != LOCK and not (e.name.startswith(".") and e.name.endswith(".tmp")))
    if not entries:
        return
    manifest = None
    if (directory / MANIFEST).is_file():
        try:
            manifest = read_manifest(directory)
        except ManifestError:
            manifest = None
    if manifest is not None and same_run is not None and same_run(manifest):
        return
    if overwrite:
        import shutil

        for name in (MANIFEST, WEIGHTS, *RUN_FILES, *[e for e in entries if STAGED.fullmatch(e)]):
            target = directory / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists() or target.is_symlink():
                with contextlib.suppress(OSError):
                    target.unlink()
        return
    if manifest is not None:
        what = f"another saved run (source {_source_name(manifest)}, {len(manifest['sites'])} sites"
        replaced = sorted({e["replacement"] for e in manifest["sites"]})
        what += f" replaced by {', '.join(replaced)})" if replaced else ")"
    else:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        what = f"{len(entries)} file(s) surgery did not write ({shown})"
    raise OutputExistsError(f"{option} {directory} already holds {what}; choose another directory, or pass "
                            "--overwrite to replace it")


def same_run(manifest: dict, model: nn.Module, key: str, record: dict, *, require_record: bool = False) -> bool:
    """Whether ``manifest`` is an earlier save of ``model`` with the same settings: the same source and
    replaced sites (names, replacements, settings), and the same command record ``manifest["extra"][key]``
    where one was kept (``require_record``: it must be there)."""
    previous = (manifest.get("extra") or {}).get(key)
    if isinstance(previous, dict):
        if any(json.dumps(previous[k], sort_keys=True, default=str) != json.dumps(v, sort_keys=True, default=str)
               for k, v in record.items() if k in previous):
            return False
    elif require_record:
        return False
    sites = [[w.site.name, w.replacement, w.config.to_dict()] for w in replaced_sites(model)]
    saved = [[e["site"]["name"], e["replacement"], e["config"]] for e in manifest["sites"]]
    source = getattr(model, SOURCE_ATTRIBUTE, None)
    return json.dumps(sites, default=str) == json.dumps(saved, default=str) and (
        source is None or manifest.get("source") == source)


def _source_name(manifest: dict) -> str:
    source = manifest.get("source")
    if isinstance(source, dict):
        return str(source.get("kind") or source.get("class") or "description")
    return str(source)




def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second name of shared tensors (a reused out-projection is reachable
    both inside the kept original and on the wrapper)."""
    state, seen = {}, {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        ident = (tensor.data_ptr(), tensor.shape, tensor.dtype, tensor.stride()) if tensor.numel() else None
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen[ident] = key
        state[key] = tensor.detach().contiguous().cpu()
    return state


def save(model: nn.Module, directory: str | os.PathLike, *, source: str | None = None,
         extra: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (replaced, distilled or pruned) to ``directory``: weights + manifest.

    Args:
        model: the model to save.
        directory: created if needed; existing files are replaced atomically.
        source: model spec to rebuild the base model on load (defaults to the spec the model was
            loaded from by ``surgery.models.load_model``, if any).
        extra: JSON-serialisable metadata stored in the manifest.

    Example:
        >>> import timm, tempfile, surgery
        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> _ = surgery.replace_attention(model, "conv")
        >>> path = surgery.save(model, tempfile.mkdtemp(), source="deit_tiny_patch16_224")
        >>> sorted(p.name for p in path.iterdir())
        ['manifest.json', 'model.safetensors']
    """
    from safetensors.torch import save as serialise

    directory = Path(directory)
    state = _unique_state(model)
    data = serialise(state)
    digest = hashlib.sha256(data).hexdigest()
    manifest = {
        "format": FORMAT,
        # a model built in Python has no spec: record a checked description of its constructor
        "source": source or getattr(model, SOURCE_ATTRIBUTE, None) or describe_source(model),
        "model_class": type(model).__name__,
        "sites": [
            {"site": w.site.to_dict(), "replacement": w.replacement, "config": w.config.to_dict(),
             "finalized": w.finalized}
            for w in replaced_sites(model)
        ],
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "module_attributes": {},  # read on load (run directories of earlier versions); nothing sets it now
        "weights": {"file": WEIGHTS, "sha256": digest},
        "extra": extra or {},
    }
    staged = f"model.{digest[:16]}.safetensors"
    with lock_directory(directory):
        previous, committed = (directory / MANIFEST).is_file(), False
        try:
            atomic_write(directory / staged, lambda f: f.write(data))
            _commit_point("weights written")
            # the commit point: from this rename on, the directory holds the new model
            _write_manifest(directory, {**manifest, "weights": {"file": staged, "sha256": digest}})
            committed = True
            _commit_point("manifest committed")
            try:
                os.replace(directory / staged, directory / WEIGHTS)
            except OSError as error:
                raise storage_error(error, directory / WEIGHTS) from None
            _commit_point("weights renamed")
            _write_manifest(directory, manifest)
        except StorageError as error:
            kept = (f"the new model is saved all the same (its weights are in {staged})" if committed
                    else f"the previous save in {directory} is kept" if previous else "nothing was saved")
            raise StorageError(f"{error}; {kept}") from None
        _remove_leftovers(directory)
    return directory


def _write_manifest(directory: Path, manifest: dict) -> None:
    atomic_write(directory / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))


def _remove_leftovers(directory: Path) -> None:
    """Weights and temp files of saves that were killed before they finished (the lock is held)."""
    for entry in directory.iterdir():
        name = entry.name
        if STAGED.fullmatch(name) or (name.startswith((f".{MANIFEST}.", ".model.")) and name.endswith(".tmp")):
            with contextlib.suppress(OSError):
                entry.unlink()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a saved model directory (ManifestError when missing or damaged)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST}; is it a directory written by surgery.save?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); the file is damaged") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} holds a JSON {type(manifest).__name__}, not a manifest; the file is damaged")
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest: dict, path: Path) -> None:
    """Every field ``load`` reads, with the type it needs: one line naming the first that is wrong."""
    def bad(what: str) -> ManifestError:
        return ManifestError(f"{path} {what}; the file is damaged or was not written by surgery.save")

    weights = manifest.get("weights")
    if not isinstance(weights, dict) or not isinstance(weights.get("file"), str) \
            or not isinstance(weights.get("sha256"), str):
        raise bad("lacks 'weights' (a file name and its sha256)")
    name = weights["file"]
    # a bare file name inside the directory: no path separators, no "..", no hidden files
    if not name or name != os.path.basename(name) or name.startswith(".") or "\\" in name \
            or not name.endswith(".safetensors"):
        raise bad(f"names the weights file {name!r}; it must be a .safetensors file inside the directory")
    if not re.fullmatch(r"[0-9a-f]{64}", weights["sha256"]):
        raise bad("has a weights checksum that is not a sha256 hex digest")
    sites = manifest.get("sites")
    if not isinstance(sites, list):
        raise bad("lacks 'sites' (the list of replaced attention sites)")
    seen = set()
    for index, entry in enumerate(sites):
        if not isinstance(entry, dict) or not isinstance(entry.get("site"), dict) \
                or not isinstance(entry["site"].get("name"), str):
            raise bad(f"has a malformed site entry {index}")
        for key, kind in (("replacement", str), ("config", dict), ("finalized", bool)):
            if not isinstance(entry.get(key), kind):
                raise bad(f"lacks {key!r} ({kind.__name__}) in site {entry['site']['name']!r}")
        if entry["site"]["name"] in seen:
            raise bad(f"lists site {entry['site']['name']!r} twice")
        seen.add(entry["site"]["name"])
    shapes = manifest.get("shapes", {})
    if not isinstance(shapes, dict) or not all(
            isinstance(v, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v)
            for v in shapes.values()):
        raise bad("has malformed 'shapes' (tensor name -> list of sizes)")
    attributes = manifest.get("module_attributes", {})
    if not isinstance(attributes, dict) or not all(isinstance(v, dict) for v in attributes.values()):
        raise bad("has malformed 'module_attributes' (module name -> {attribute: value})")
    if not isinstance(manifest.get("extra", {}), dict):
        raise bad("has a malformed 'extra' (an object)")


def load(directory: str | os.PathLike, model: nn.Module | None = None, *, allow_code: bool = False,
         map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by ``save``: rebuild the structure, then load the weights strictly.

    Args:
        directory: a directory written by ``save``.
        model: the base (unreplaced) model to rebuild on; None rebuilds it from the manifest's source.
        allow_code: permit a ``py:<module>:<factory>`` source to be imported and called.
        map_location: device for the loaded weights.

    Example:
        >>> import timm, tempfile, torch, surgery
        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> _ = surgery.replace_attention(model, "conv")
        >>> path = surgery.save(model, tempfile.mkdtemp(), source="deit_tiny_patch16_224")
        >>> again = surgery.load(path)
        >>> x = torch.randn(1, 3, 224, 224)
        >>> bool(torch.equal(model.eval()(x), again(x)))
        True
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / manifest["weights"]["file"]
    if not weights.exists() and STAGED.fullmatch(weights.name) and (directory / WEIGHTS).is_file():
        weights = directory / WEIGHTS  # a save stopped after renaming its weights: the checksum decides
    if not weights.is_file():
        raise ManifestError(f"{weights} is missing; the saved model is incomplete")
    if weights.resolve().parent != directory.resolve():
        raise ManifestError(f"{weights} resolves to {weights.resolve()}, outside {directory}; refusing a "
                            "weights file elsewhere (a link): copy the run directory with its files")
    if _sha256(weights) != manifest["weights"]["sha256"]:
        raise ManifestError(f"{weights} does not match its checksum in the manifest: it was changed "
                            "or truncated; save the model again")
    if model is None:
        model = _build_source(manifest, allow_code)
    _rebuild(model, manifest)
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as error:
        raise ManifestError(f"cannot read {weights}: {error}") from None
    recorded = manifest.get("shapes")
    if recorded is not None:
        differ = sorted(set(recorded) ^ set(state)) or [k for k in state if list(state[k].shape) != recorded[k]]
        if differ:
            raise ManifestError(f"the manifest's recorded shapes disagree with {weights.name} (e.g. {differ[0]!r}); "
                                "the manifest was edited: save the model again")
    _fit_shapes(model, state)
    _set_module_attributes(model, manifest.get("module_attributes", {}))
    current = model.state_dict()
    missing = [k for k in current if k not in state and not _is_alias(model, k, state)]
    unexpected = [k for k in state if k not in current]
    if missing or unexpected:
        raise ManifestError(
            f"weights in {directory} do not match the model: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
            "was it saved from another model?"
        )
    mismatched = [k for k in state if tuple(state[k].shape) != tuple(current[k].shape)]
    if mismatched:
        raise ManifestError(f"weights in {directory} have other shapes than the model: {mismatched[:3]}")
    model.load_state_dict(state, strict=False)
    if source := manifest.get("source"):
        setattr(model, SOURCE_ATTRIBUTE, source)
    return model.eval()


def _is_alias(model: nn.Module, key: str, state: dict) -> bool:
    """A key absent from the file because it names a tensor saved under another (shared) name."""
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    tensor = params.get(key)
    if tensor is None:
        return False
    return any(other is tensor and k in state for k, other in params.items() if k != key)


def _build_source(manifest: dict, allow_code: bool) -> nn.Module:
    from surgery.models import load_model, parse_model_spec

    source = manifest.get("source")
    if not isinstance(source, str) or not source:
        return rebuild_from_source(manifest)  # a description (HF config, timm/torchvision constructor) or none
    spec = parse_model_spec(source)
    if spec.kind == "py" and not allow_code:
        raise ManifestError(f"the manifest's source {source!r} would import and run code; pass "
                            "allow_code=True (CLI: --allow-code) if you trust it, or pass model=")
    model = load_model(spec, random_init=True, allow_code=allow_code)
    setattr(model, SOURCE_ATTRIBUTE, source)
    return model


def _rebuild(model: nn.Module, manifest: dict) -> None:
    modules = dict(model.named_modules())
    groups: dict[tuple[str, str], list[AttentionSite]] = {}
    for entry in manifest["sites"]:
        try:
            site = AttentionSite.from_dict(entry["site"])
        except (TypeError, ValueError, KeyError) as error:
            raise ManifestError(f"the manifest's site {entry['site'].get('name')!r} is malformed ({error}); "
                                "save the model again") from None
        module = modules.get(site.name)
        if module is None or type(module).__name__ != site.module_type:
            found = type(module).__name__ if module is not None else "nothing"
            raise ManifestError(
                f"the manifest does not match the model: site {site.name!r} should be a "
                f"{site.module_type}, found {found}; pass the base model it was saved from"
            )
        _check_site_widths(site, module)
        get_replacement(entry["replacement"])
        key = (entry["replacement"], json.dumps(entry["config"], sort_keys=True))
        groups.setdefault(key, []).append(site)
    for (name, config), sites in groups.items():
        replace_attention(model, name, config=json.loads(config), sites=sites)
    finalized = {e["site"]["name"] for e in manifest["sites"] if e["finalized"]}
    for wrapper in replaced_sites(model):
        if wrapper.site.name in finalized:
            wrapper.original = None


def _check_site_widths(site: AttentionSite, module: nn.Module) -> None:
    """The recorded width and heads of a site against the module the base model has there."""
    heads = next((getattr(module, a) for a in _HEAD_ATTRIBUTES
                  if isinstance(getattr(module, a, None), int) and not isinstance(getattr(module, a), bool)), None)
    width = module.embed_dim if isinstance(module, nn.MultiheadAttention) else None
    if width is None:
        first = next((m for m in module.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"), None)
        if isinstance(first, nn.Linear):
            width = first.in_features
        elif first is not None and isinstance(getattr(first, "weight", None), torch.Tensor):
            width = first.weight.shape[0]  # HF Conv1D: weight [in, out]
    wrong = [f"{what} {recorded} (the model has {actual})" for what, recorded, actual in
             (("heads", site.num_heads, heads), ("width", site.embed_dim, width))
             if actual is not None and recorded is not None and recorded != actual]
    if wrong:
        raise ManifestError(f"the manifest records site {site.name!r} with {', '.join(wrong)}; pass the base "
                            "model it was saved from, or save it again")


# ------------------------------------------------------------------------------- pruned shapes
def _fit_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every module whose saved tensors have other shapes (a pruned model) those shapes.

    A replaced site's mixer is rebuilt by its replacement's own ``resize`` hook (the registry), which
    knows how its parts follow their weights; everything else is a plain layer resized by type
    (``_LAYER_RESIZERS``). Weights are loaded afterwards.
    """
    from surgery.swap import replaced_sites

    owned: set[str] = set()
    for wrapper in replaced_sites(model):
        hook = get_replacement(wrapper.replacement).resize
        if hook is None:
            continue
        name = _module_name(model, wrapper.mixer)
        prefix = f"{name}."
        saved = {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
        current = {k: tuple(v.shape) for k, v in wrapper.mixer.state_dict().items()}
        if saved and saved != current:
            hook(wrapper.mixer, saved)
        owned.add(name)
    for name, module in list(model.named_modules()):
        if any(name == o or name.startswith(f"{o}.") for o in owned):
            continue
        prefix = f"{name}." if name else ""
        shapes = {k[len(prefix):]: tuple(v.shape) for k, v in state.items()
                  if k.startswith(prefix) and "." not in k[len(prefix):]}
        if not shapes:
            continue
        current = {k: tuple(v.shape) for k, v in list(module.named_parameters(recurse=False))
                   + list(module.named_buffers(recurse=False)) if v is not None}
        if all(current.get(k) == s for k, s in shapes.items()):
            continue
        _resize(module, shapes, name)


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _resize_linear(module: nn.Linear, shapes: dict) -> None:
    module.out_features, module.in_features = shapes["weight"]


def _resize_recurrent(module: nn.RNNBase, shapes: dict) -> None:
    module.hidden_size = shapes["weight_hh_l0"][1]
    module.input_size = shapes["weight_ih_l0"][1]
    if "weight_hr_l0" in shapes:
        module.proj_size = shapes["weight_hr_l0"][0]


def _resize_convolution(module: nn.Module, shapes: dict) -> None:
    module.out_channels = shapes["weight"][0]
    module.in_channels = shapes["weight"][1] * module.groups
    if module.groups > 1:
        module.groups = module.out_channels
        module.in_channels = module.out_channels * shapes["weight"][1]


def _resize_layer_norm(module: nn.LayerNorm, shapes: dict) -> None:
    module.normalized_shape = tuple(shapes["weight"])


def _resize_embedding(module: nn.Embedding, shapes: dict) -> None:
    module.num_embeddings, module.embedding_dim = shapes["weight"]


#: plain layers whose structure follows their weights' shapes, by type (a replacement's own parts
#: are resized by its ``resize`` hook instead)
_LAYER_RESIZERS: dict[type, Callable[[nn.Module, dict], None]] = {
    nn.Linear: _resize_linear,
    nn.RNNBase: _resize_recurrent,
    nn.Conv1d: _resize_convolution,
    nn.Conv2d: _resize_convolution,
    nn.LayerNorm: _resize_layer_norm,
    nn.Embedding: _resize_embedding,
}


def _resizer(module: nn.Module) -> Callable[[nn.Module, dict], None] | None:
    for kind in type(module).__mro__:
        if kind in _LAYER_RESIZERS:
            return _LAYER_RESIZERS[kind]
        if kind.__name__ == "Conv1D":  # HuggingFace GPT-2's Conv1D: weight [in, out]
            return lambda m, shapes: setattr(m, "nf", shapes["weight"][1])
    return None


def _resize(module: nn.Module, shapes: dict[str, tuple], name: str) -> None:
    resizer = _resizer(module)
    if resizer is None:
        raise ManifestError(f"module {name!r} ({type(module).__name__}) has saved shapes {shapes} "
                            "that differ from the rebuilt model and cannot be resized")
    resizer(module, shapes)
    for key, shape in shapes.items():
        tensor = getattr(module, key, None)
        if isinstance(tensor, nn.Parameter):
            setattr(module, key, nn.Parameter(torch.empty(shape, dtype=tensor.dtype, device=tensor.device),
                                              requires_grad=tensor.requires_grad))
        elif isinstance(tensor, torch.Tensor):
            module.register_buffer(key, torch.empty(shape, dtype=tensor.dtype, device=tensor.device))
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def _plain_number(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain_number(v) for v in value)
    return isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value))


def _set_module_attributes(model: nn.Module, attributes: dict[str, dict[str, Any]]) -> None:
    """Set the recorded structural numbers; only allow-listed names that hold plain numbers already."""
    for name, values in attributes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ManifestError(f"the manifest sets attributes on {name!r}, which the model lacks") from None
        for key, value in values.items():
            current = getattr(module, key, None)
            if key not in ALLOWED_ATTRIBUTES or not _plain_number(value) or not _plain_number(current) \
                    or current is None:
                raise ManifestError(f"the manifest sets {name}.{key} = {str(value)[:40]!r}; only the plain "
                                    f"numbers {', '.join(sorted(ALLOWED_ATTRIBUTES))} may be set on load")
        for key, value in values.items():
            setattr(module, key, value)


