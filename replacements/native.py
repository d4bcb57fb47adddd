"""The native kernels (``csrc/``: the multi-head recurrence of ``mhlstm``/``gru``, ``conv``'s token
convolution, one extension): built once with
``torch.utils.cpp_extension.load``, cached by a hash of its source, its flags and torch's version.

Portable by default: no ``-march=native`` (a build cache shared by several machines must not hand
one CPU's instructions to another), but a named instruction-set level the CPU has (x86-64 with
AVX2: ``-mavx2 -mfma -mf16c``; the flags are part of the hash); ``SURGERY_NATIVE_MARCH=1`` asks for this
CPU's full instruction set (the CPU's identity then joins the hash). ``SURGERY_FAST_KERNEL=0`` disables the
kernel. Without a C++ compiler the PyTorch loop (``recurrence._recurrence_torch``, the tested
reference) runs instead, and one line says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

_CSRC = Path(__file__).resolve().parent / "csrc"
#: the recurrence kernel (kept for code that read it)
SOURCE = _CSRC / "recurrence.cpp"
#: the extension's sources: the recurrence, conv's token convolution, linear's feature map, bindings
SOURCES = (SOURCE, _CSRC / "token_conv.cpp", _CSRC / "feature_map.cpp", _CSRC / "bindings.cpp")
#: headers they include (hashed with the sources, so an edit to one rebuilds)
HEADERS = (_CSRC / "kernels.h", _CSRC / "vector_math.h")

# -ffast-math only when compiling (it lets GCC call libmvec's vector expf/tanhf); the link line
# never sees it, so crtfastmath's flush-to-zero is not set for the whole process
_PORTABLE_FLAGS = ["-O3", "-ffast-math", "-fopenmp"]
_LINK_FLAGS = ["-fopenmp"]

_lock = threading.Lock()
_kernel: Any = None
_error: str | None = None


def _isa_flags() -> list[str]:
    """The instruction-set level to build for: a fixed, named level this CPU has, never this CPU's
    own full set unless asked. On x86-64 with AVX2 and FMA (what torch itself dispatches to) ``-mavx2
    -mfma -mf16c`` (every AVX2 CPU has F16C; it widens float16 weights): measured 10 ms against 33 ms
    for one DeiT-T block's recurrence built for baseline x86-64 (1 thread), where the per-head
    nn.LSTM takes 12 ms. With these flags the kernel takes its AVX2 path (inline 8-wide
    exp/sigmoid/tanh, optional float16 recurrent weights)."""
    if os.environ.get("SURGERY_NATIVE_MARCH") == "1":
        return ["-march=native"]
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")()
    if platform.machine().lower() in ("x86_64", "amd64") and capability in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def _flags() -> list[str]:
    return list(_PORTABLE_FLAGS) + _isa_flags()


def _cpu_identity() -> str:
    identity = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as handle:
            identity += sorted({line for line in handle if line.startswith(("model name", "flags"))})
    except OSError:
        identity.append(platform.processor())
    return "".join(identity)


def build_name() -> str:
    """The extension's name: a hash of the source, the flags, torch's version (and, with
    ``-march=native``, the CPU), so a changed input never reuses a stale build."""
    flags = _flags()
    parts = [path.read_bytes().decode() for path in SOURCES + HEADERS]
    parts += [" ".join(flags), " ".join(_LINK_FLAGS), torch.__version__]
    if "-march=native" in flags:
        parts.append(_cpu_identity())
    return "surgery_recurrence_" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def load_kernel() -> Any:
    """The compiled kernel module, or None (the reason is kept for ``kernel_status``)."""
    global _kernel, _error
    with _lock:
        if _kernel is not None or _error is not None:
            return _kernel
        if os.environ.get("SURGERY_FAST_KERNEL", "1") == "0":
            _error = "disabled by SURGERY_FAST_KERNEL=0"
            return None
        if _compiler() is None:
            _error = "no C++ compiler found (c++, g++ or clang++)"
            warnings.warn(f"surgery: {_error}; mhlstm/gru inference runs the PyTorch loop (same results, "
                          "slower); install g++ for the native kernel", RuntimeWarning, stacklevel=3)
            return None
        # importing cpp_extension warns "No CUDA runtime is found" on CPU machines: not our concern
        cpp_logger = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_logger.level
        cpp_logger.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load

            _kernel = load(name=build_name(), sources=[str(path) for path in SOURCES], extra_cflags=_flags(),
                           extra_ldflags=_LINK_FLAGS, verbose=False)
        except Exception as error:  # no headers, a failed build, ...: the PyTorch loop still works
            lines = str(error).strip().splitlines()
            _error = f"{type(error).__name__}: {lines[-1] if lines else ''}"
        finally:
            cpp_logger.setLevel(level)
        return _kernel


def kernel_status() -> dict[str, Any]:
    """Whether the native recurrence kernel is available (compiling it on first call).

    Example:
        >>> sorted(kernel_status())
        ['available', 'error']
    """
    kernel = load_kernel()
    return {"available": kernel is not None, "error": _error}
