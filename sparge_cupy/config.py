"""The one frozen configuration that the reference, the launcher, the tests and the plots share.

Block geometry and default thresholds live here and nowhere else (SPEC.md sections 1-3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SpargeConfig:
    block_q: int = 128          # BQ: query rows per block (one program of the attention kernel)
    block_k: int = 64           # BK: key rows per block
    query_group: int = 32       # predictor="qgroup_keys": query rows pooled together (divides BQ)
    pv_group_rows: int = 16     # Stage 2 filter granularity: one mma row tile of a warp
    simthreshd1: float = 0.6    # theta: a block is self-similar iff sim > theta
    cdfthreshd: float = 0.98    # tau: TopCdf keeps the smallest prefix holding this share of P^
    sim_eps: float = 1e-6       # guard for zero rows in the self-similarity
    int8_max: int = 127         # symmetric INT8 range [-127, 127]
    fp8_max: float = 448.0      # largest finite e4m3 value
    max_head_dim: int = 256     # larger D is refused; smaller D is zero-padded by the GPU launcher
    native_head_dims: tuple = (64, 128, 256)

    @property
    def log2e(self) -> float:
        return 1.0 / math.log(2.0)


CONFIG = SpargeConfig()
