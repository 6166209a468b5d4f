"""frankly's native CPU kernels, compiled for this machine on first use.

One kernel so far: ``torch.ops.frankly.int8_linear`` (``int8_linear.cpp``), the int8 weight-only
linear layer of ``--weights int8`` on x86 CPUs with AVX2 and FMA. It is a plain C++ file against
torch's own headers (no Python headers, no ninja): ``g++ -O3 -march=native`` builds it into
``<cache>/kernels/<key>/`` once (about 20 s on two cores), where the key covers the source, the
torch build, the compiler and this CPU's flags, so a changed machine or torch rebuilds it. The
library is registered with ``torch.ops.load_library`` and runs on torch's own OpenMP threads.

Choice (``FRANKLY_INT8_KERNEL`` or ``--int8-kernel``): ``auto`` (default) uses frankly's kernel when
it builds and runs here and otherwise torch's ``aten._weight_int8pack_mm`` with a warning saying why;
``frankly`` makes a failure an error; ``aten`` never builds anything.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from directions.files import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_linear.cpp")
KERNEL_CHOICES = ("auto", "frankly", "aten")


class KernelError(RuntimeError):
    """frankly's kernel was asked for (``--int8-kernel frankly``) and cannot be built or run here."""


@dataclass(frozen=True)
class Int8Kernel:
    """Which int8 matmul ``Int8Linear`` runs: ``name`` is ``frankly`` or ``aten``; ``why`` says why
    frankly's kernel is not in use (empty when it is)."""

    name: str
    why: str = ""

    def describe(self) -> str:
        if self.name == "frankly":
            return "frankly int8_linear (AVX2: activations int16 in blocks of 128, int32 sums per block, fp32 across)"
        return f"torch aten._weight_int8pack_mm ({self.why})" if self.why else "torch aten._weight_int8pack_mm"


_lock = threading.Lock()
_chosen: Int8Kernel | None = None
_loaded: Path | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_flags() -> set[str]:
    """This CPU's feature flags (``/proc/cpuinfo``), e.g. ``{"avx2", "fma", ...}``; empty where unknown."""
    return set(_cpu_flags().split())


def cpu_supported() -> bool:
    """Whether this CPU can run frankly's kernel (x86-64 with AVX2 and FMA); says nothing about the compiler."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return {"avx2", "fma"} <= cpu_flags()


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "g++")
    return shutil.which(cxx)


def _torch_dirs() -> tuple[Path, Path]:
    root = Path(torch.__file__).resolve().parent
    return root / "include", root / "lib"


def _key(cxx: str) -> str:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        torch.__version__.encode(),
        str(_torch_dirs()[1]).encode(),
        version.encode(),
        _cpu_flags().encode(),
        platform.machine().encode(),
    ):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def build(*, quiet: bool = False) -> Path:
    """The compiled kernel library for this machine: built now if not cached. Raises
    :class:`KernelError` with the compiler's message when it cannot be built."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelError(f"frankly's int8 kernel is written for x86-64 CPUs, not {platform.machine()}")
    flags = _cpu_flags().split()
    if flags and not {"avx2", "fma"} <= set(flags):
        raise KernelError("frankly's int8 kernel needs AVX2 and FMA; this CPU lacks them")
    cxx = _compiler()
    if cxx is None:
        raise KernelError(
            f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH to build frankly's int8 kernel "
            "(Debian/Ubuntu: apt-get install g++)"
        )
    out_dir = cache_root() / "kernels" / _key(cxx)
    lib = out_dir / "frankly_int8_linear.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        if lib.exists():
            return lib
        inc, libdir = _torch_dirs()
        abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [
            cxx, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{inc}", f"-I{inc / 'torch/csrc/api/include'}",
            str(SOURCE), f"-L{libdir}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{libdir}", "-o", tmp,
        ]  # fmt: skip
        if not quiet:
            print("building frankly's int8 kernel for this CPU (once, about 20 s) ...", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            os.unlink(tmp)
            raise KernelError(f"building frankly's int8 kernel failed: {e}") from e
        if done.returncode != 0:
            os.unlink(tmp)
            tail = "\n".join(done.stderr.strip().splitlines()[-8:])
            raise KernelError(f"building frankly's int8 kernel failed ({cxx}):\n{tail}")
        os.replace(tmp, lib)
    return lib


def _self_check() -> None:
    """The loaded kernel against an fp32 reference on a small random layer (guards a miscompiled
    or mis-dispatched build before it serves anything)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (40, 37), dtype=torch.int8, generator=g)
    s = torch.rand(40, generator=g) + 0.5
    b = torch.randn(40, generator=g)
    for m in (1, 2, 3, 4, 7):
        x = torch.randn(m, 37, generator=g)
        want = x @ (w.float() * s[:, None]).T + b
        got = torch.ops.frankly.int8_linear(x, w, s, b)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-3):
            raise KernelError("frankly's int8 kernel failed its self-check against fp32 on this machine")


def _load(quiet: bool) -> None:
    global _loaded
    lib = build(quiet=quiet)
    if _loaded is None:
        torch.ops.load_library(str(lib))
        _loaded = lib
    _self_check()


def loaded() -> bool:
    """Whether frankly's library is registered in this process (``torch.ops.frankly`` usable)."""
    return _loaded is not None


def choose(choice: str | None = None, *, quiet: bool = False) -> Int8Kernel:
    """Resolve the int8 kernel once per process (``choice``: auto / frankly / aten; default the
    ``FRANKLY_INT8_KERNEL`` environment variable, else auto) and return it; building on first use."""
    global _chosen
    choice = (choice or os.environ.get("FRANKLY_INT8_KERNEL") or "auto").lower()
    if choice not in KERNEL_CHOICES:
        raise KernelError(f"unknown int8 kernel {choice!r}; choose {', '.join(KERNEL_CHOICES)}")
    with _lock:
        if _chosen is not None and (choice == "auto" or _chosen.name == choice):
            return _chosen
        if choice == "aten":
            _chosen = Int8Kernel("aten", "chosen with --int8-kernel aten")
            return _chosen
        try:
            _load(quiet)
            _chosen = Int8Kernel("frankly")
        except (KernelError, OSError, RuntimeError) as e:
            if choice == "frankly":
                raise e if isinstance(e, KernelError) else KernelError(str(e)) from e
            log.warning("int8: using torch's kernel: %s", e)
            _chosen = Int8Kernel("aten", str(e).splitlines()[0])
        return _chosen


def current() -> Int8Kernel:
    """The kernel chosen so far in this process (resolving ``auto`` now if nothing chose yet)."""
    return _chosen if _chosen is not None else choose()


def reset_for_tests() -> None:
    """Forget the choice (the loaded library stays registered in this process)."""
    global _chosen
    with _lock:
        _chosen = None


class using:
    """``with kernels.using("aten"): ...`` runs the block on that kernel and restores the previous
    choice (benchmarks put the two kernels side by side in one process; tests compare them)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> Int8Kernel:
        global _chosen
        self.before = _chosen
        if self.name == "frankly":
            return choose("frankly", quiet=True)  # loads (and checks) the library once; raises where it cannot
        with _lock:
            _chosen = Int8Kernel("aten", "chosen for a comparison")
        return _chosen

    def __exit__(self, *exc) -> None:
        global _chosen
        with _lock:
            _chosen = self.before
