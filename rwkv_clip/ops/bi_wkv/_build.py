"""Lazy, cached builds of the C++/CUDA extensions with torch.utils.cpp_extension.load (ninja).

Builds go to $RWKV_CLIP_OPS_CACHE or ~/.cache/rwkv_clip/ops/<torch+python tag>/<name>. torch's
loader hashes sources and flags, so nothing is rebuilt when nothing changed; a file lock in the
build directory makes concurrent first calls (DDP ranks, test workers) safe.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

_HERE = Path(__file__).resolve().parent
_LOCK = threading.Lock()
_MODULES: dict[str, ModuleType] = {}
_ERRORS: dict[str, str] = {}
DEFAULT_CUDA_ARCHS = ("8.0", "9.0")  # always built, so a prebuilt cache serves A100- and H100-class GPUs


def cache_root() -> Path:
    root = os.environ.get("RWKV_CLIP_OPS_CACHE")
    if root:
        return Path(root).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "rwkv_clip" / "ops"


def _tag() -> str:
    cuda = torch.version.cuda or "cpu"
    return f"torch{torch.__version__.split('+')[0]}_cu{cuda.replace('.', '')}_py{sys.version_info.major}{sys.version_info.minor}"


def _cpu_fingerprint() -> str:
    """-march=native code must not be reused on a different CPU (shared home directories)."""
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    info += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return hashlib.sha1(info.encode()).hexdigest()[:10]


def cuda_archs() -> list[str]:
    """Compute capabilities to build for: sm_80, sm_90 and every visible GPU (deterministic)."""
    archs = set(DEFAULT_CUDA_ARCHS)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            archs.add(f"{major}.{minor}")
    return sorted(archs, key=lambda a: tuple(int(x) for x in a.split(".")))


@contextlib.contextmanager
def _env(**kv: str):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update(kv)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load(name: str, sources: list[Path], verbose: bool, **kwargs) -> ModuleType:
    # Importing cpp_extension on a machine without a GPU logs "No CUDA runtime is found"; that is
    # expected for the CPU kernel and a CUDA build failure reports its own reason.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        log.setLevel(level)

    build_dir = cache_root() / _tag() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name=name, sources=[str(s) for s in sources], build_directory=str(build_dir),
                verbose=verbose, **kwargs)


def _build_cpu(verbose: bool) -> ModuleType:
    name = f"rwkv_clip_bi_wkv_cpu_{_cpu_fingerprint()}"
    src = [_HERE / "cpu.cpp"]
    # -fopenmp: at::parallel_for is a header template; without it the (b, h) loop runs on one thread.
    base = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp"]
    ld = ["-fopenmp"]
    try:  # native vector width (AVX-512 / AVX2 / NEON) where the compiler knows the host
        return _load(name, src, verbose, extra_cflags=base + ["-march=native"], extra_ldflags=ld)
    except Exception:  # noqa: BLE001 - e.g. a compiler without -march=native: portable build
        return _load(name + "_generic", src, verbose, extra_cflags=base, extra_ldflags=ld)


def _build_cuda(verbose: bool) -> ModuleType:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or ";".join(cuda_archs())
    tag = hashlib.sha1(archs.encode()).hexdigest()[:8]
    with _env(TORCH_CUDA_ARCH_LIST=archs):
        return _load(f"rwkv_clip_bi_wkv_cuda_{tag}", [_HERE / "cuda_bind.cpp", _HERE / "cuda.cu"], verbose,
                     extra_cflags=["-O3"],
                     extra_cuda_cflags=["-O3", "-lineinfo", "--extra-device-vectorization", "-Xptxas=-O3"])


def get_extension(kind: str, verbose: bool = False) -> ModuleType:
    """Return the built extension ("cpu" or "cuda"); raises RuntimeError with the reason on failure.

    A failure is remembered, so a broken toolchain costs one attempt per process.
    """
    with _LOCK:
        if kind in _MODULES:
            return _MODULES[kind]
        if kind in _ERRORS:
            raise RuntimeError(_ERRORS[kind])
        try:
            mod = _build_cpu(verbose) if kind == "cpu" else _build_cuda(verbose)
        except Exception as e:  # noqa: BLE001 - any toolchain problem becomes a clear message
            msg = f"building the bi_wkv {kind} extension failed: {type(e).__name__}: {str(e).strip()[-2000:]}"
            _ERRORS[kind] = msg
            raise RuntimeError(msg) from e
        _MODULES[kind] = mod
        return mod
