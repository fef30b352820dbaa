"""SM clock, board power and per-call time while one attention call runs back to back.

    PYTHONPATH=. python bench/power_probe.py [--seconds 12] [--L 32768] [--D 128 64]
        [--methods sparge_attn sdpa_cudnn] [--out DIR]

For each (method, D): B=4, H=32, fp16 random inputs, the call repeated for ``--seconds`` (CUDA
events around each call) while ``nvidia-smi`` samples the SM clock, the power draw, the
temperature and the active clock-throttle reasons every 100 ms; 2 s idle between cases. Writes
``calls.csv`` (time, method, D, ms) and ``smi.csv`` to ``--out`` and prints per case the call
times (min / median / max) and the clock and power over the samples taken while it ran, with the
share of samples under the software power cap (throttle reason 0x4). ``sparge_attn`` is the whole
call with the prediction (cdfthreshd 0.9, simthreshd1 0.3: random inputs keep every block),
``sdpa_cudnn`` PyTorch's SDPA with the cuDNN backend. Needs a CUDA GPU, torch and nvidia-smi.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_clocks import ClockSampler  # noqa: E402


def call(method, q, k, v):
    import torch
    if method == "sparge_attn":
        import sparge_cupy.torch as st
        return lambda: st.sparge_attn(q, k, v, cdfthreshd=0.9, simthreshd1=0.3)
    if method == "sdpa_cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def f():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return f
    raise ValueError(f"--methods: expected sparge_attn or sdpa_cudnn, got {method!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--L", type=int, default=32768)
    ap.add_argument("--D", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--methods", nargs="+", default=["sparge_attn", "sdpa_cudnn"])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    import torch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clocks = ClockSampler(torch.cuda.current_device())
    calls, spans = [], []
    try:
        for D in args.D:
            for method in args.methods:
                torch.manual_seed(0)
                q, k, v = (torch.randn(4, 32, args.L, D, device="cuda", dtype=torch.float16) for _ in range(3))
                f = call(method, q, k, v)
                f()
                torch.cuda.synchronize()
                t0 = time.time()
                while time.time() < t0 + args.seconds:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    f()
                    b.record()
                    b.synchronize()
                    calls.append((time.time(), method, D, a.elapsed_time(b)))
                spans.append((method, D, t0 + 1.0, time.time()))   # the first second: ramp-up
                del q, k, v, f
                time.sleep(2)
    finally:
        clocks.close()
    with open(out / "calls.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("time", "method", "D", "ms")] + [(f"{t:.3f}", m, D, f"{ms:.3f}")
                                                                   for t, m, D, ms in calls])
    with open(out / "smi.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("time", "sm_mhz", "power_w", "temp_c", "throttle")]
                                 + [(f"{s[0]:.3f}", s[1], s[2], s[3], hex(s[4])) for s in clocks.samples])
    print(f"{torch.cuda.get_device_name()}, B4 H32 L{args.L} fp16, {args.seconds:g} s a case")
    print("| method | D | calls | ms min / median / max | SM MHz median (min) | W median | samples at the power cap |")
    print("|---|---|---|---|---|---|---|")
    for method, D, t0, t1 in spans:
        ms = [m for t, me, d, m in calls if me == method and d == D]
        s = clocks.window(t0, t1)
        if not s:
            print(f"| {method} | {D} | {len(ms)} | no nvidia-smi samples in this span |")
            continue
        print(f"| {method} | {D} | {len(ms)} | {min(ms):.2f} / {statistics.median(ms):.2f} / {max(ms):.2f} | "
              f"{s['sm_mhz']:.0f} ({s['sm_mhz_min']:.0f}) | {s['power_w']:.0f} | {s['power_capped']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
