"""One PyTorch ``scaled_dot_product_attention`` launch for Nsight Compute, beside our kernel's
(``attn_variants.py --ncu``): what the baseline's attention kernel does on the same shape
(issue 4, targets 1 and 5).

    ncu --clock-control none --profile-from-start off --set full -o cudnn \\
        python bench/sdpa_ncu.py 4,32,16384,64,1 cudnn
    ncu --import cudnn.ncu-rep --page details > cudnn.txt

The arguments are B,H,L,D,CAUSAL (fp16, random inputs, the torch layout B, H, L, D) and the
backend: cudnn or flash. Two calls run first (kernel selection and warm-up); the profiler is on
for the third call only (cudaProfilerStart / Stop), so the report holds its kernels alone.
"""
from __future__ import annotations

import sys

BACKENDS = ("cudnn", "flash")


def main(shape, backend):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    B, H, L, D, causal = (int(x) for x in shape.split(","))
    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn((B, H, L, D), device="cuda", dtype=torch.float16, generator=gen)
               for _ in range(3))
    with sdpa_kernel([which]):
        for _ in range(2):
            sdpa(q, k, v, is_causal=bool(causal))
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        sdpa(q, k, v, is_causal=bool(causal))
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "4,32,16384,64,1",
         sys.argv[2] if len(sys.argv) > 2 else "cudnn")
