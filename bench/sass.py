"""Read a kernel's SASS without a GPU: NVRTC (as the package builds it) to a cubin, nvdisasm to
text, and the instruction mix of the whole kernel and of each loop (a backward branch and the
instructions from its target to it).

    python bench/sass.py 'sparge::sparse_attn_wg<64, true, true, __half>'
    python bench/sass.py 'sparge::sparse_attn_wg<64, true, true, __half>' -D SPARGE_WG_OVERLAP=0
    python bench/sass.py NAME --dump /tmp/k.sass        # the whole listing too

nvdisasm comes from the ``nvidia-cuda-nvdisasm`` wheel (``pip install nvidia-cuda-nvdisasm``) or
``--nvdisasm PATH``. The cubin is taken with ``nvrtcGetCUBINSize`` / ``nvrtcGetCUBIN`` through
ctypes: CuPy's ``nvrtc.getCUBIN`` returns it one byte short, which nvdisasm calls an invalid ELF
(bench/NOTES.md). Static counts: an instruction in a loop counts once per iteration it is on the
path of, which for the attention kernel's block loop is the work per kept key block.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sparge_cupy import _compile  # noqa: E402


def _libnvrtc():
    import nvidia
    for base in nvidia.__path__:
        hits = sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so.*")))
        hits = [h for h in hits if "builtins" not in h]
        if hits:
            return ctypes.CDLL(hits[-1])
    return ctypes.CDLL("libnvrtc.so")


def cubin(source, name, cc, extra=()):
    """The whole cubin of ``name`` in ``cuda/<source>`` for ``sm_<cc>``, built with the package's
    options (``_compile.nvrtc_options``) and ``extra``."""
    lib = _libnvrtc()
    prog = ctypes.c_void_p()

    def ok(code, what):
        if code != 0:
            log = b""
            size = ctypes.c_size_t()
            if lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) == 0:
                buf = ctypes.create_string_buffer(size.value)
                lib.nvrtcGetProgramLog(prog, buf)
                log = buf.value
            raise RuntimeError(f"{what} failed ({code}):\n{log.decode(errors='replace')}")
    text = _compile.source_text(source).encode()
    ok(lib.nvrtcCreateProgram(ctypes.byref(prog), text, source.encode(), 0, None, None), "create")
    try:
        ok(lib.nvrtcAddNameExpression(prog, name.encode()), "name")
        opts = [*_compile.nvrtc_options(source, cc), *extra]
        ok(lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])),
           "compile")
        size = ctypes.c_size_t()
        ok(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        buf = ctypes.create_string_buffer(size.value)
        ok(lib.nvrtcGetCUBIN(prog, buf), "cubin")
        return buf.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def find_nvdisasm(path=None):
    if path:
        return path
    try:
        import nvidia
        for base in nvidia.__path__:
            hits = glob.glob(os.path.join(base, "*", "bin", "nvdisasm"))
            if hits:
                return hits[0]
    except ImportError:
        pass
    found = shutil.which("nvdisasm")
    if not found:
        raise SystemExit("nvdisasm not found: pip install nvidia-cuda-nvdisasm, or --nvdisasm PATH")
    return found


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def disassemble(blob, nvdisasm):
    """The listing of the one kernel in ``blob`` (nvdisasm text)."""
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "k.cubin"
        f.write_bytes(blob)
        return subprocess.run([nvdisasm, "-c", str(f)], capture_output=True, text=True,
                              check=True).stdout


def parse_listing(text):
    """[(address, opcode with modifiers, operands)] of an nvdisasm listing, branch targets given
    as addresses (``BRA `(.L_x_12)`` -> ``BRA 0x1a30``)."""
    out, labels, pending = [], {}, []
    for line in text.splitlines():
        lab = re.match(r"^(\.L\w+):", line)
        if lab:
            pending.append(lab.group(1))
        m = _INSN.search(line)
        if m:
            a = int(m.group(1), 16)
            labels.update((name, a) for name in pending)
            pending = []
            out.append((a, m.group(3), (m.group(2) or "") + m.group(4).strip()))
    return [(a, op, re.sub(r"`\((\.L\w+)\)", lambda t: hex(labels.get(t.group(1), -1)), args))
            for a, op, args in out]


def mix(insns, full=False):
    """Counter of opcodes (``full``: with their modifiers)."""
    return collections.Counter(op if full else op.split(".")[0] for _, op, _ in insns)


def loops(insns):
    """(first, last) instruction index of each backward branch's range, innermost first; ranges
    holding an EXIT are left out (an out-of-line slow path placed after the kernel's end that
    branches back into it is no loop)."""
    addr = {a: k for k, (a, _, _) in enumerate(insns)}
    found = []
    for k, (a, op, args) in enumerate(insns):
        if op.startswith("BRA") or op.startswith("JMP"):
            m = re.search(r"0x([0-9a-f]+)", args)
            if m and int(m.group(1), 16) < a and int(m.group(1), 16) in addr:
                lo = addr[int(m.group(1), 16)]
                if not any(o.startswith("EXIT") for _, o, _ in insns[lo:k + 1]):
                    found.append((lo, k))
    return sorted(found, key=lambda r: r[1] - r[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="name expression, e.g. 'sparge::sparse_attn_wg<64, true, true, __half>'")
    ap.add_argument("--source", default="sparse_attn.cu")
    ap.add_argument("--cc", default="90")
    ap.add_argument("-D", action="append", default=[], help="extra NVRTC define NAME=VALUE")
    ap.add_argument("--nvdisasm")
    ap.add_argument("--dump", help="write the listing here")
    ap.add_argument("--top", type=int, default=24, help="opcodes listed per range")
    ap.add_argument("--min-loop", type=int, default=40, help="smallest loop (instructions) listed")
    args = ap.parse_args(argv)
    blob = cubin(args.source, args.name, args.cc, tuple(f"-D{d}" for d in args.D))
    text = disassemble(blob, find_nvdisasm(args.nvdisasm))
    insns = parse_listing(text)
    if args.dump:
        Path(args.dump).write_text(text)
    def show(title, part):
        c = mix(part)
        print(f"{title}: {len(part)} instructions")
        print("  " + ", ".join(f"{op} {n}" for op, n in c.most_common(args.top)))
    show(f"{args.name} (sm_{args.cc}{' ' + ' '.join(args.D) if args.D else ''})", insns)
    for lo, hi in loops(insns):
        if hi - lo + 1 >= args.min_loop:
            show(f"loop {insns[lo][0]:#06x}-{insns[hi][0]:#06x}", insns[lo:hi + 1])


if __name__ == "__main__":
    main()
