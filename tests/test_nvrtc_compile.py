"""Every kernel instantiation builds for sm_80 (A100) and sm_90a (H100), on a machine without a GPU.

NVRTC from the ``nvidia-cuda-nvrtc`` wheel (through ``cupy.cuda.nvrtc``, which needs no driver) and
the CUDA headers of the ``nvidia-cuda-runtime`` wheel; the options are those CuPy uses on a device.
Also checks that the NumPy mirrors of the kernels' parameter structs (``sparge_cupy._gpu``) have
the C layout, field by field.
"""
from __future__ import annotations

import pytest

cupy = pytest.importorskip("cupy")

from sparge_cupy import _compile, _gpu  # noqa: E402

ARCHS = (80, 90)


def _nvrtc_ready():
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception:                   # no libnvrtc: the wheel is not installed
        return False
    return bool(_compile.cuda_include_dirs())


pytestmark = pytest.mark.skipif(not _nvrtc_ready(),
                                reason="needs nvidia-cuda-nvrtc and nvidia-cuda-runtime (headers)")


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("source", _compile.SOURCES)
def test_every_instantiation_compiles(source, cc):
    """Every kernel the launcher may ask for builds; on sm_90a the wgmma kernel's default modes
    also keep every register (check_wgmma_spills)."""
    names = [n for s, n in _compile.kernel_names(cc) if s == source]
    assert names, f"no kernels listed for {source}"
    wg = source == "sparse_attn.cu" and cc == 90
    cubin, log = _compile.compile_for_arch(source, names, cc, verbose_ptxas=wg)
    assert len(cubin) > 0
    if wg:
        check_wgmma_spills(log, [n for n in names if "sparse_attn_wg" in n])


def check_wgmma_spills(log, names):
    """ptxas's ``log`` of a build of the wgmma kernels ``names``: the default modes (int8 Q K,
    FP8 P V) keep every register: no spills at D = 64 (two CTAs per SM, the overlap's second score
    tile) and D = 256 (one), nor at D = 128 with the kept-block list where D = 128 does not
    overlap (without the list, the map scan's state spilled 4 bytes there)."""
    import re
    spills = {m.group(1): int(m.group(2)) for m in re.finditer(
        r"Compiling entry function '(\S*sparse_attn_wg\S+)'.*?(\d+) bytes spill stores", log, re.S)}
    assert len(spills) == len(names), log[-2000:]
    # sparse_attn_wg<D, true, true, T, LIST>
    modes = {m: re.search(r"sparse_attn_wgILi(\d+)ELb1ELb1E.+?Lb([01])EEEv", m) for m in spills}
    d128 = 128 not in _compile.wg_overlap_dims()      # the overlapped loop does not fit at D = 128
    wanted = [m for m, x in modes.items() if x and (x[1] in ("64", "256") or d128 and x.groups() == ("128", "1"))]
    assert len(wanted) == (4 + d128) * len(_compile.ELEMENT_TYPES), sorted(spills)
    bad = {m: spills[m] for m in wanted if spills[m]}
    assert not bad, f"{len(bad)} of {len(wanted)} spill (bytes): {sorted(bad.items())[:4]}"


def test_fp8_left_out_of_sm80_only():
    on_80 = {n for _, n in _compile.kernel_names(80)}
    on_90 = {n for _, n in _compile.kernel_names(90)}
    assert not any("quantize_v" in n and ", true, " in n for n in on_80)
    assert any("quantize_v" in n and ", true, " in n for n in on_90)
    assert _compile.attn_name(256, "int8", "fp8", "bfloat16") in on_90
    assert _compile.attn_name(256, "int8", "fp8", "bfloat16") not in on_80
    assert on_80 < on_90


def _offset_checks(struct, dtype):
    lines = [f'static_assert(__builtin_offsetof(sparge::{struct}, {name}) == {dtype.fields[name][1]}, '
             f'"{struct}.{name}: offset differs from sparge_cupy._gpu");' for name in dtype.names]
    lines.append(f'static_assert(sizeof(sparge::{struct}) == {dtype.itemsize}, '
                 f'"sizeof({struct}) differs from sparge_cupy._gpu");')
    return "\n".join(lines)


def _compile_with_checks(source, checks):
    """Compile ``cuda/<source>`` for sm_90a with ``checks`` (static_asserts) appended; fail the
    test with NVRTC's log if it does not build."""
    from cupy.cuda import nvrtc
    prog = nvrtc.createProgram(_compile.source_text(source) + "\n" + "\n".join(checks), source, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(_compile.base_options()) + [_compile.arch_flag(90)]
                                 + list(_compile.source_options(source)))
        except nvrtc.NVRTCError:
            pytest.fail(nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)


def _nvrtc_has_offsetof():
    """Whether this NVRTC knows __builtin_offsetof (13.0.88 does not; 13.5 does)."""
    from cupy.cuda import nvrtc
    prog = nvrtc.createProgram("struct S { int a; double b; };\n"
                               "static_assert(__builtin_offsetof(S, b) == 8, \"\");\n", "probe.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["-std=c++17"])
        return True
    except nvrtc.NVRTCError:
        return False
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.skipif(_nvrtc_ready() and not _nvrtc_has_offsetof(),
                    reason="this NVRTC has no __builtin_offsetof (13.0); the layouts are checked "
                           "with one that has (CI's)")
@pytest.mark.parametrize("source,structs", [
    ("block_stats.cu", ("TensorView", "QStatsParams", "HeadScalesParams", "KPassParams",
                        "QuantizeQParams")),
    ("select.cu", ("MapParams", "SelectParams")),
    ("sparse_attn.cu", ("AttnParams", "WgMaps")),
])
def test_param_structs_match_c_layout(source, structs):
    _compile_with_checks(source, [_offset_checks(s, _gpu.STRUCTS[s]) for s in structs])


class _FakeArray:
    """What _gpu._params reads of a CuPy array: ``.data.ptr``."""

    def __init__(self, ptr):
        self.data = type("Mem", (), {"ptr": ptr})()


@pytest.mark.parametrize("struct", sorted(_gpu.STRUCTS))
def test_param_images_match_numpy_records(struct):
    """_gpu._params packs each struct with struct.Struct (fast); the image must be byte for byte
    the NumPy record's whose layout the static_asserts above check against the C structs."""
    import numpy as np
    dtype = _gpu.STRUCTS[struct]
    rng = np.random.default_rng(len(struct))
    rec, fields = np.zeros(1, dtype=dtype), {}
    for name in dtype.names:
        ft = dtype.fields[name][0]
        if ft == np.uint64:                            # a pointer
            ptr = int(rng.integers(1, 2 ** 62))
            fields[name], rec[name] = _FakeArray(ptr), ptr
        elif ft.names or ft.subdtype:                  # nested struct or byte array: its image
            sub = np.frombuffer(rng.bytes(ft.itemsize), dtype=ft).copy()
            fields[name], rec[name] = sub, sub
        else:
            value = ft.type(rng.integers(-1000, 1000) if ft.kind == "i" else rng.standard_normal())
            fields[name], rec[name] = value, value
    image = _gpu._params(dtype, **fields)
    want = rec.tobytes()
    diff = [i for i, (a, b) in enumerate(zip(image, want)) if a != b]
    assert len(image) == len(want) and not diff, \
        f"{struct}: {len(diff)} bytes differ (sizes {len(image)} / {len(want)}), first at {diff[:8]}"
    zeros = _gpu._params(dtype)                        # fields not given: zero, None: null
    assert zeros == bytes(dtype.itemsize)


def test_kernel_argument_images():
    import numpy as np
    assert _compile._arg_bytes(None) == bytes(8)
    assert _compile._arg_bytes(_FakeArray(0x1234)) == (0x1234).to_bytes(8, "little")
    assert _compile._arg_bytes(np.int32(-2)) == (-2).to_bytes(4, "little", signed=True)
    assert _compile._arg_bytes(b"abc") == b"abc"
    with pytest.raises(TypeError, match="kernel argument"):
        _compile._arg_bytes(3)


def test_kernel_constants_match_config():
    """The block geometry is compile-time in the kernels (common.cuh) and runtime in CONFIG."""
    import re

    from sparge_cupy import CONFIG
    text = (_compile.cuda_dir() / "common.cuh").read_text()
    consts = {m[0]: int(m[1]) for m in re.findall(r"constexpr int (\w+) = (\d+);", text)}
    assert (consts["BQ"], consts["BK"], consts["PV_GROUP_ROWS"]) == \
        (CONFIG.block_q, CONFIG.block_k, CONFIG.pv_group_rows)


def test_padded_head_dims():
    assert [_gpu.padded_head_dim(d) for d in (1, 32, 64, 65, 80, 128, 129, 256)] == \
        [64, 64, 64, 128, 128, 128, 256, 256]
    with pytest.raises(ValueError, match="head dim"):
        _gpu.padded_head_dim(257)


def test_attention_shared_memory_fits_sm80():
    # A100: 163 KiB per block after opt-in; the largest configuration must fit.
    worst = max(_gpu.attn_smem_bytes(D, qk, pv) for D in _compile.HEAD_DIMS
                for qk in ("int8", "fp16") for pv in ("fp16",))
    assert worst <= 163 * 1024


def test_wgmma_header_is_generated():
    """cuda/wgmma.cuh is what scripts/gen_wgmma.py writes (edit the script, not the header)."""
    import importlib.util
    path = _compile.cuda_dir().parent / "scripts" / "gen_wgmma.py"
    if not path.is_file():
        pytest.skip("scripts/ is not part of an installed package")
    spec = importlib.util.spec_from_file_location("gen_wgmma", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (_compile.cuda_dir() / "wgmma.cuh").read_text() == gen.generate(), \
        "cuda/wgmma.cuh differs from scripts/gen_wgmma.py's output: run python scripts/gen_wgmma.py"


def test_wgmma_kernel_only_on_sm90():
    on_80 = {n for _, n in _compile.kernel_names(80)}
    on_90 = {n for _, n in _compile.kernel_names(90)}
    wg = _compile.attn_name(128, "int8", "fp8", "float16", "wgmma")
    assert wg in on_90 and wg not in on_80
    assert not any("sparse_attn_wg" in n for n in on_80)


def test_attention_kernel_choice(monkeypatch):
    monkeypatch.delenv("SPARGE_ATTN_KERNEL", raising=False)
    assert _gpu.attn_kernel_choice(90) == "wgmma"
    assert _gpu.attn_kernel_choice(80) == "mma"
    assert _gpu.attn_kernel_choice(89) == "mma"
    monkeypatch.setenv("SPARGE_ATTN_KERNEL", "mma")
    assert _gpu.attn_kernel_choice(90) == "mma"
    monkeypatch.setenv("SPARGE_ATTN_KERNEL", "wgmma")
    with pytest.raises(ValueError, match="SPARGE_ATTN_KERNEL=wgmma needs compute capability 9.0"):
        _gpu.attn_kernel_choice(80)
    monkeypatch.setenv("SPARGE_ATTN_KERNEL", "fast")
    with pytest.raises(ValueError, match="SPARGE_ATTN_KERNEL: expected one of"):
        _gpu.attn_kernel_choice(90)


def test_wgmma_shared_memory_fits_sm90():
    # H100: 227 KiB per block after opt-in.
    worst = max(_gpu.attn_smem_bytes(D, qk, pv, "wgmma") for D in _compile.HEAD_DIMS
                for qk in ("int8", "fp16") for pv in ("fp8", "fp16"))
    assert worst <= 227 * 1024


@pytest.mark.parametrize("overlap", ["", "64,128,256"])
def test_wgmma_shared_memory_matches_launcher(overlap, monkeypatch):
    """The launcher's shared-memory size of the wgmma kernel is the kernel's WgSmem, for each head
    dim and mode, with and without the overlapped loop (three stages where they fit)."""
    monkeypatch.setenv("SPARGE_WG_OVERLAP", overlap)
    checks, B = [], lambda x: "true" if x else "false"
    for D in _compile.HEAD_DIMS:
        for qk in ("int8", "fp16"):
            for pv in ("fp8", "fp16"):
                t = f"sparge::WgSmem<{D}, {B(qk == 'int8')}, {B(pv == 'fp8')}>"
                checks.append(f"static_assert({t}::bytes == {_gpu.attn_smem_bytes(D, qk, pv, 'wgmma')}, "
                              f'"{t}: bytes");')
    _compile_with_checks("sparse_attn.cu", checks)


def test_map_list_shared_memory(monkeypatch):
    """The kept-block list: the launch adds its bytes (int16, nk + 1 entries, 16-byte rounded) to
    the tiles' shared memory, refuses more key blocks than int16 entries hold, and takes the list
    exactly where it costs no CTA per SM, unless SPARGE_WG_MAP_LIST=0 turns it off."""
    monkeypatch.delenv("SPARGE_WG_OVERLAP", raising=False)
    monkeypatch.delenv("SPARGE_ATTN_DEFINES", raising=False)
    tiles = _gpu.attn_smem_bytes(128, "int8", "fp8", "wgmma")
    assert _gpu.attn_smem_bytes(128, "int8", "fp8", "wgmma", nk=512) == tiles
    assert _gpu.attn_smem_bytes(128, "int8", "fp8", "wgmma", nk=512, map_list=True) == tiles + 1040  # 1026 -> 1040
    assert _gpu.attn_smem_bytes(128, "int8", "fp8", "mma", nk=512, map_list=True) == _gpu.attn_smem_bytes(128, "int8", "fp8")
    with pytest.raises(ValueError, match=r"k: the kept-block list takes at most 32766 key blocks"):
        _gpu.attn_smem_bytes(128, "int8", "fp8", "wgmma", nk=32767, map_list=True)
    assert _compile.wg_map_list_on()
    sm, per_cta = 228 * 1024, 1024 + 2048           # an SM's shared memory; reserved + static
    for D, qk, pv in [(64, "int8", "fp8"), (128, "int8", "fp8"), (128, "fp16", "fp16"),
                      (256, "int8", "fp8"), (256, "fp16", "fp16")]:
        tiles = _gpu.attn_smem_bytes(D, qk, pv, "wgmma")
        ctas = min(2 if D <= 128 else 1, sm // (tiles + per_cta))
        assert ctas >= 1, (D, qk, pv)
        # the largest nk whose list keeps `ctas` CTAs per SM (and fits int16)
        room = sm // ctas - per_cta - tiles
        last = min(_gpu.WG_MAP_LIST_MAX, room // 2 - 1)
        while last < _gpu.WG_MAP_LIST_MAX and \
                _gpu.attn_smem_bytes(D, qk, pv, "wgmma", nk=last + 1, map_list=True) + per_cta <= sm // ctas:
            last += 1
        assert _gpu.wg_map_list(D, qk, pv, 1) and _gpu.wg_map_list(D, qk, pv, last), (D, qk, pv, last)
        assert not _gpu.wg_map_list(D, qk, pv, last + 1), (D, qk, pv, last)
    assert _gpu.wg_map_list(128, "int8", "fp8", 256)                # L = 16K
    assert not _gpu.wg_map_list(128, "int8", "fp8", 32767)
    # one CTA per SM (SPARGE_WG_MIN_BLOCKS=1) leaves room for the largest list at D = 128
    monkeypatch.setenv("SPARGE_ATTN_DEFINES", "SPARGE_WG_MIN_BLOCKS=1")
    assert _gpu.wg_map_list(128, "int8", "fp8", _gpu.WG_MAP_LIST_MAX)
    monkeypatch.setenv("SPARGE_ATTN_DEFINES", "SPARGE_WG_MAP_LIST=0")
    assert not _compile.wg_map_list_on() and not _gpu.wg_map_list(128, "int8", "fp8", 256)


def test_wg_overlap_setting(monkeypatch):
    monkeypatch.delenv("SPARGE_WG_OVERLAP", raising=False)
    assert _compile.wg_overlap_dims() == tuple(_compile.WG_OVERLAP_DIMS)
    monkeypatch.setenv("SPARGE_WG_OVERLAP", "256, 64")
    assert _compile.wg_overlap_dims() == (64, 256)
    assert _compile.source_options("sparse_attn.cu") == ("-DSPARGE_WG_OVERLAP=18",)
    assert _compile.source_options("select.cu") == ()
    assert _gpu.attn_smem_bytes(64, "int8", "fp8", "wgmma") == 1024 + 128 * 64 + 3 * 2 * 64 * 64
    assert _gpu.attn_smem_bytes(128, "int8", "fp8", "wgmma") == 1024 + 128 * 128 + 2 * 2 * 64 * 128
    # three stages of fp16 K and V at D = 256 do not fit in a CTA's shared memory: two
    assert _gpu.attn_smem_bytes(256, "fp16", "fp16", "wgmma") == 1024 + 128 * 512 + 2 * 2 * 64 * 512
    monkeypatch.setenv("SPARGE_WG_OVERLAP", "0")
    assert _compile.wg_overlap_dims() == ()
    for bad in ("96", "x", "64;128", "-64"):
        monkeypatch.setenv("SPARGE_WG_OVERLAP", bad)
        with pytest.raises(ValueError, match="SPARGE_WG_OVERLAP: expected head dims"):
            _compile.wg_overlap_dims()


def test_attn_defines(monkeypatch):
    monkeypatch.setenv("SPARGE_ATTN_DEFINES", " SPARGE_WG_EARLY_Q=1  SPARGE_WG_MAP_PREFETCH=0 ")
    monkeypatch.setenv("SPARGE_WG_OVERLAP", "")
    assert _compile.source_options("sparse_attn.cu") == (
        "-DSPARGE_WG_OVERLAP=0", "-DSPARGE_WG_EARLY_Q=1", "-DSPARGE_WG_MAP_PREFETCH=0")
    assert _compile.attn_define("SPARGE_WG_EARLY_Q") == 1 and _compile.attn_define("SPARGE_WG_MAP_LIST") is None
    assert _compile.wg_map_list_on()
    monkeypatch.setenv("SPARGE_ATTN_DEFINES", "SPARGE_WG_MAP_LIST=0")       # parsed per value
    assert _compile.attn_define("SPARGE_WG_EARLY_Q") is None and not _compile.wg_map_list_on()
    monkeypatch.setenv("SPARGE_WG_OVERLAP", "64, 256")
    assert _compile.wg_overlap_dims() == (64, 256)
    for bad in ("SPARGE_WG_OVERLAP=2", "FOO=1", "SPARGE_WG_X=", "SPARGE_WG_X=a", "SPARGE_WG_X"):
        monkeypatch.setenv("SPARGE_ATTN_DEFINES", bad)
        with pytest.raises(ValueError, match="SPARGE_ATTN_DEFINES: expected NAME=INTEGER"):
            _compile.source_options("sparse_attn.cu")


@pytest.mark.parametrize("overlap,defines", [
    ("64,128,256", "SPARGE_WG_EARLY_Q=1 SPARGE_WG_MAP_PREFETCH=1 SPARGE_WG_MASK_FROM=0"),
    ("", "SPARGE_WG_EARLY_Q=0 SPARGE_WG_MAP_PREFETCH=0"),
])
def test_wgmma_switches_build(overlap, defines, monkeypatch):
    """The wgmma kernel, with and without the kept-block list, builds for sm_90a with its
    switches the other ways from the defaults (the overlapped loop SPARGE_WG_OVERLAP at every
    head dim and the mask threshold register off; then no overlap with the early Q load and the
    map prefetch off), and its default modes keep every register (check_wgmma_spills)."""
    monkeypatch.setenv("SPARGE_WG_OVERLAP", overlap)
    monkeypatch.setenv("SPARGE_ATTN_DEFINES", defines)
    names = [n for s, n in _compile.kernel_names(90) if s == "sparse_attn.cu" and "sparse_attn_wg" in n]
    _, log = _compile.compile_for_arch("sparse_attn.cu", names, 90, verbose_ptxas=True)
    check_wgmma_spills(log, names)


def test_default_device_only_for_nvrtc_before_13_2(monkeypatch):
    """NVRTC 13.0 refuses the kernels' generic lambdas as host functions unless unannotated
    functions default to device (``-default-device``); newer NVRTC builds stay without the flag.
    (Both compile every kernel: this module's compile tests, run with 13.0.88 and 13.5.)"""
    for version, flagged in (((13, 0), True), ((13, 1), True), ((13, 2), False), ((13, 5), False)):
        monkeypatch.setattr(_compile, "nvrtc_version", lambda v=version: v)
        assert ("-default-device" in _compile.base_options()) == flagged, version


def test_statistics_kernels_do_not_spill():
    """block_stats.cu's passes keep every register at their cap of 128 (4 programs per SM) on
    sm_90a: a spill puts local-memory traffic into passes that should stream Q and K at DRAM
    speed (k_pass spilled 16-92 bytes before Pooling::add<KEEP>). The NVRTC in use decides; the
    message names the kernels and bytes."""
    import re
    names = [n for s, n in _compile.kernel_names(90) if s == "block_stats.cu"]
    _, log = _compile.compile_for_arch("block_stats.cu", names, 90, verbose_ptxas=True)
    spills = {m.group(1): int(m.group(2)) for m in re.finditer(
        r"Compiling entry function '(\S+)'.*?(\d+) bytes spill stores", log, re.S)}
    assert len(spills) == len(names), log[-2000:]
    bad = {m: b for m, b in spills.items() if b}
    assert not bad, f"{len(bad)} of {len(spills)} spill (bytes): {sorted(bad.items())[:4]}"
