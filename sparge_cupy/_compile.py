"""The one compile path of the package: CUDA sources in ``cuda/``, compiled at run time.

On a GPU, :func:`get_kernel` builds a ``cupy.RawModule`` for one template instantiation the first
time it is asked for and keeps it per (device, source, name), the options following from the
device; CuPy also caches the binary on disk, so later processes skip NVRTC. Without a GPU,
:func:`compile_for_arch` compiles
every instantiation with NVRTC directly (the ``nvidia-cuda-nvrtc`` wheel, headers from the
``nvidia-cuda-runtime`` wheel), which is what the CPU tests use to catch a kernel that no longer
builds.

The local headers (``common.cuh``, ``wgmma.cuh``) are pasted into each source instead of being
included, so that CuPy's cache key (the source text) changes whenever a header does.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import struct
from pathlib import Path

import numpy as np

from ._resources import cuda_dir
from .config import CONFIG

SOURCES = ("block_stats.cu", "select.cu", "quant_v.cu", "sparse_attn.cu")
ELEMENT_TYPES = {"float16": "__half", "float32": "float", "bfloat16": "__nv_bfloat16"}
HEAD_DIMS = tuple(CONFIG.native_head_dims)
FP8_MIN_CC = 89                     # e4m3 conversion and mma: Ada / Hopper and newer

_modules: dict = {}
_LOCAL_INCLUDE = re.compile(r'^#include "([\w.]+\.cuh)"[^\n]*$', re.M)


def source_text(name, folder=None):
    """The source of ``cuda/<name>`` with every local header (``#include "x.cuh"`` naming a file
    of ``cuda/``) pasted in place of its include line, each header once. ``folder``: another
    folder of sources to read instead (the benchmarks' variant builds)."""
    folder = cuda_dir() if folder is None else Path(folder)
    pasted: set = set()

    def expand(text):
        def paste(match):
            header = match.group(1)
            if header in pasted:
                return ""
            pasted.add(header)
            return expand((folder / header).read_text().replace("#pragma once", ""))
        return _LOCAL_INCLUDE.sub(paste, text)

    return expand((folder / name).read_text())


@functools.lru_cache(maxsize=None)
def cuda_include_dirs():
    """Folders holding cuda_fp16.h and friends, those matching the NVRTC in use first: CuPy's
    CUDA root (where it loads libnvrtc from), then the ``nvidia-cuda-runtime`` wheel, then
    CUDA_PATH."""
    roots = []
    try:
        import cupy
        roots.append(cupy.cuda.get_cuda_path())
    except Exception:                   # CuPy absent or without a CUDA root: try the others
        pass
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        roots += [str(Path(base) / sub) for sub in ("cu13", "cu12", "cuda_runtime")]
    roots.append(os.environ.get("CUDA_PATH"))
    dirs = []
    for root in roots:
        inc = Path(root) / "include" if root else None
        if inc and (inc / "cuda_fp16.h").is_file() and str(inc) not in dirs:
            dirs.append(str(inc))
    return tuple(dirs)


def arch_flag(cc):
    """``-arch=sm_90a`` for Hopper (its wgmma / setmaxnreg need the ``a`` target), else sm_XY."""
    cc = int(cc)
    return f"-arch=sm_{cc}a" if cc == 90 else f"-arch=sm_{cc}"


@functools.lru_cache(maxsize=None)
def nvrtc_version():
    """(major, minor) of the NVRTC CuPy compiles with."""
    from cupy.cuda import nvrtc
    return tuple(int(x) for x in nvrtc.getVersion())


def base_options():
    # NVRTC before 13.2 takes the kernels' generic lambdas (auto parameters, block_stats.cu and
    # quant_v.cu) for host functions, which JIT mode refuses ("host functions are not allowed");
    # -default-device makes unannotated functions device functions. Seen with 13.0.88, the NVRTC
    # wheel that torch's CUDA 13.0 builds pin; 13.2 (the GPU suite's) and 13.5 need no flag, and
    # their builds stay as measured.
    extra = ("-default-device",) if nvrtc_version() < (13, 2) else ()
    return ("-std=c++17",) + extra + tuple(f"-I{d}" for d in cuda_include_dirs())


# Head dims at which sparse_attn_wg overlaps the next block's Q K^T with the current block's
# softmax (cuda/sparse_attn.cu, SPARGE_WG_OVERLAP: three stages of K and V, a second score tile
# in registers): D = 64, where it measured 1.04-1.08x (bench/NOTES.md, sixth session; at D = 256
# it was 1% slower dense, at D = 128 it does not fit in registers). The environment variable
# SPARGE_WG_OVERLAP (head dims, comma-separated, e.g. "64,256"; "" for none) sets them for a
# process (the GPU suite and the benchmarks).
WG_OVERLAP_DIMS = (64,)


def wg_overlap_dims():
    """The head dims SPARGE_WG_OVERLAP names ("" or "0": none), else WG_OVERLAP_DIMS."""
    raw = os.environ.get("SPARGE_WG_OVERLAP")
    return tuple(WG_OVERLAP_DIMS) if raw is None else _parse_overlap(raw)


# The launcher reads these switches several times per launch (shared memory, CTAs per SM, the
# kernel's options); parsed once per value of the variable.
@functools.lru_cache(maxsize=8)
def _parse_overlap(raw):
    dims = []
    for part in raw.replace(" ", "").split(","):
        if part in ("", "0"):
            continue
        if not part.isdigit() or int(part) not in HEAD_DIMS:
            raise ValueError(f"SPARGE_WG_OVERLAP: expected head dims from {HEAD_DIMS}, comma-"
                             f"separated (\"\" or 0: none), got {raw!r}")
        dims.append(int(part))
    return tuple(sorted(set(dims)))


def wg_overlap_mask(dims):
    """SPARGE_WG_OVERLAP's value in C: bit D / 64 set for each head dim D."""
    return sum(1 << (d // 64) for d in dims)


def attn_defines():
    """SPARGE_ATTN_DEFINES: the attention kernel's benchmark switches for a process, as
    ``NAME=INTEGER`` words naming ``SPARGE_WG_*`` macros of cuda/sparse_attn.cu (not
    SPARGE_WG_OVERLAP, which the launcher's shared memory follows: see wg_overlap_dims), e.g.
    ``"SPARGE_WG_EARLY_Q=1 SPARGE_WG_MAP_PREFETCH=1"``; NVRTC options ``-DNAME=INTEGER``."""
    return _parse_attn_defines(os.environ.get("SPARGE_ATTN_DEFINES", ""))


@functools.lru_cache(maxsize=8)
def _parse_attn_defines(raw):
    words = raw.split()
    for w in words:
        name, _, value = w.partition("=")
        if (not name.startswith("SPARGE_WG_") or name == "SPARGE_WG_OVERLAP"
                or not name[10:].replace("_", "").isalnum()
                or not value.isdigit()):
            raise ValueError(f"SPARGE_ATTN_DEFINES: expected NAME=INTEGER words naming SPARGE_WG_* "
                             f"switches other than SPARGE_WG_OVERLAP, got {w!r}")
    return tuple(f"-D{w}" for w in words)


def attn_define(name):
    """The integer value SPARGE_ATTN_DEFINES gives macro ``name``, or None where it is not set."""
    return _define_values(attn_defines()).get(name)


@functools.lru_cache(maxsize=8)
def _define_values(options):
    return {key: int(value) for key, _, value in (opt[2:].partition("=") for opt in options)}


def wg_map_list_on():
    """Whether the wgmma kernel may read the kept key blocks from a list in shared memory
    (sparse_attn_wg's LIST; where it does, _gpu.wg_map_list): on unless SPARGE_ATTN_DEFINES says
    ``SPARGE_WG_MAP_LIST=0`` (the A/B switch of the benchmarks and the GPU suite)."""
    value = attn_define("SPARGE_WG_MAP_LIST")
    return value is None or bool(value)


def source_options(source):
    """The NVRTC options a source takes beyond base_options() and the architecture."""
    if source == "sparse_attn.cu":
        return (f"-DSPARGE_WG_OVERLAP={wg_overlap_mask(wg_overlap_dims())}",) + attn_defines()
    return ()


# ---------------------------------------------------------------------------------------------
# Name expressions: every template instantiation the launcher may ask for.

ATTN_KERNELS = ("mma", "wgmma")     # mma.sync (sm_80 and newer), warpgroup MMA (sm_90a only)
SELECT_ROW_KEYS = (1, 2, 4, 8, 16)  # select_rows<E>: a warp per map row of at most 32 E key blocks


def attn_name(D, qk, pv, out_dtype, kernel="mma", map_list=True):
    """The attention kernel's name expression; the wgmma kernel's last argument says whether it
    reads the kept key blocks from a list in shared memory (``map_list``)."""
    func = {"mma": "sparse_attn", "wgmma": "sparse_attn_wg"}[kernel]
    B = lambda x: "true" if x else "false"
    last = f", {B(map_list)}" if kernel == "wgmma" else ""
    return f"sparge::{func}<{D}, {B(qk == 'int8')}, {B(pv == 'fp8')}, {ELEMENT_TYPES[out_dtype]}{last}>"


def kernel_names(cc):
    """Every (source, name expression) pair that a device of compute capability ``cc`` can run."""
    fp8 = int(cc) >= FP8_MIN_CC
    names = []
    for dt, T in ELEMENT_TYPES.items():
        for D in HEAD_DIMS:
            names += [("block_stats.cu", f"sparge::q_stats<{T}, {D}>"),
                      ("block_stats.cu", f"sparge::k_sums<{T}, {D}>"),
                      ("block_stats.cu", f"sparge::k_pass<{T}, signed char, {D}>"),
                      ("block_stats.cu", f"sparge::k_pass<{T}, __half, {D}>"),
                      ("block_stats.cu", f"sparge::quantize_q<{T}, signed char, {D}>"),
                      ("block_stats.cu", f"sparge::quantize_q<{T}, __half, {D}>"),
                      ("quant_v.cu", f"sparge::v_channel_amax<{T}, {D}>"),
                      ("quant_v.cu", f"sparge::quantize_v<{T}, false, {D}>"),
                      ("select.cu", f"sparge::qbar_keys_mma<{T}, {D}>"),
                      ("block_stats.cu", f"sparge::q_groups<{T}, {D}, {CONFIG.query_group}>")]
            if fp8:
                names.append(("quant_v.cu", f"sparge::quantize_v<{T}, true, {D}>"))
            for qk in ("int8", "fp16"):
                for pv in (("fp8", "fp16") if fp8 else ("fp16",)):
                    names.append(("sparse_attn.cu", attn_name(D, qk, pv, dt)))
                    if int(cc) == 90:
                        names += [("sparse_attn.cu", attn_name(D, qk, pv, dt, "wgmma", lst))
                                  for lst in (True, False)]
    names += [("block_stats.cu", "sparge::head_scales"), ("select.cu", "sparge::compressed_map"),
              ("select.cu", "sparge::group_mass_map"),
              ("select.cu", "sparge::select_blocks")]
    names += [("select.cu", f"sparge::select_rows<{e}>") for e in SELECT_ROW_KEYS]
    return names


# ---------------------------------------------------------------------------------------------
# GPU path (CuPy).

_NULL = bytes(8)
_U64 = struct.Struct("<Q")


def _arg_bytes(a):
    """The bytes cuLaunchKernel copies for one argument of :class:`Kernel`."""
    if isinstance(a, bytes):
        return a
    if a is None:
        return _NULL
    if isinstance(a, (np.ndarray, np.generic)):
        return a.tobytes()
    ptr = getattr(getattr(a, "data", None), "ptr", None)
    if ptr is None:
        raise TypeError(f"kernel argument: expected bytes, a CuPy array, None or a NumPy scalar "
                        f"or record, got {type(a).__name__}")
    return _U64.pack(ptr)


class Kernel:
    """A compiled kernel launched straight through ``cuLaunchKernel`` on CuPy's current stream.

    Called like a ``cupy.RawKernel`` (``kern(grid, block, args, shared_mem=0)``), but the
    arguments are only packed: ``bytes`` (a parameter struct's image, ``_gpu._params``), CuPy
    arrays (their pointer), None (a null pointer), NumPy scalars and records (their bytes). CuPy's
    generic argument handling builds a C type name for every structured argument of every launch,
    tens of microseconds each; a call of the API launches about ten kernels."""

    def __init__(self, raw):
        self.raw = raw
        self._ptr = None

    @property
    def max_dynamic_shared_size_bytes(self):
        return self.raw.max_dynamic_shared_size_bytes

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, nbytes):
        self.raw.max_dynamic_shared_size_bytes = nbytes

    def __call__(self, grid, block, args, shared_mem=0):
        import ctypes

        import cupy
        from cupy_backends.cuda.api import driver
        if self._ptr is None:
            self._ptr = self.raw.kernel.ptr
        blobs = [_arg_bytes(a) for a in args]
        offsets, at = [], 0
        for b in blobs:                         # each argument 16-byte aligned in one buffer
            offsets.append(at)
            at += -(-len(b) // 16) * 16
        image = bytearray(at)
        for b, o in zip(blobs, offsets):
            image[o:o + len(b)] = b
        buf = (ctypes.c_char * max(at, 1)).from_buffer(image)
        base = ctypes.addressof(buf)
        ptrs = (ctypes.c_void_p * len(blobs))(*[base + o for o in offsets])
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        bx, by, bz = (tuple(block) + (1, 1))[:3]
        driver.launchKernel(self._ptr, gx, gy, gz, bx, by, bz, shared_mem,
                            cupy.cuda.get_current_stream().ptr, ctypes.addressof(ptrs), 0)


def get_kernel(source, name):
    """The :class:`Kernel` of template instantiation ``name`` in ``cuda/<source>``, compiled on
    first use for the current device and kept (the options follow from the device)."""
    import cupy

    dev_id = cupy.cuda.runtime.getDevice()
    extra = source_options(source)
    key = (dev_id, source, name, extra)
    hit = _modules.get(key)
    if hit is None:
        cc = int(cupy.cuda.Device(dev_id).compute_capability)
        options = base_options() + (arch_flag(cc),) + extra
        mod = cupy.RawModule(code=source_text(source), options=options, name_expressions=[name])
        hit = _modules[key] = (mod, Kernel(mod.get_function(name)))
    return hit[1]


# ---------------------------------------------------------------------------------------------
# CPU path (NVRTC only, no driver).

@functools.lru_cache(maxsize=None)
def _nvrtc():
    from cupy.cuda import nvrtc
    return nvrtc


def nvrtc_options(source, cc, *, verbose_ptxas=False):
    """The NVRTC options of ``cuda/<source>`` for ``sm_<cc>`` as CuPy builds it on a device
    (``-ftz=true`` included), plus ``-Xptxas=-v`` for the register / spill report."""
    return ([*base_options(), arch_flag(cc), "-ftz=true", *source_options(source)]
            + (["-Xptxas=-v"] if verbose_ptxas else []))


def compile_for_arch(source, names, cc, *, verbose_ptxas=False):
    """Compile ``names`` of ``cuda/<source>`` for ``sm_<cc>`` with NVRTC alone (no GPU needed),
    with :func:`nvrtc_options`.

    Returns ``(cubin bytes, log)``; raises ``RuntimeError`` with NVRTC's log on failure. The cubin
    is CuPy's ``nvrtc.getCUBIN``, which drops its last byte (nvdisasm calls it an invalid ELF;
    ``bench/sass.py`` fetches the whole one through ctypes): for "it compiled", not for tools.
    """
    nvrtc = _nvrtc()
    options = nvrtc_options(source, cc, verbose_ptxas=verbose_ptxas)
    prog = nvrtc.createProgram(source_text(source), source, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed on {source} for sm_{cc}: {exc}\n"
                               f"{nvrtc.getProgramLog(prog)}") from None
        return nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def compile_all(cc, *, verbose_ptxas=False):
    """Compile every instantiation for ``sm_<cc>``; returns ``{source: log}``."""
    by_source: dict = {}
    for src, name in kernel_names(cc):
        by_source.setdefault(src, []).append(name)
    return {src: compile_for_arch(src, names, cc, verbose_ptxas=verbose_ptxas)[1]
            for src, names in by_source.items()}
