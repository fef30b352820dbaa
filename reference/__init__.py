"""Pure NumPy SpargeAttn: dense float64 attention (the truth) and a blocked mirror of every kernel.

All functions of the mirror take HND arrays and per-head threshold arrays; the public API in
``sparge_cupy`` validates user input and converts layouts before calling here.
"""
from .attention import PV_MODES, QK_MODES, block_sparse_attention, quantized_operands
from .dense import block_attention_mass, dense_attention
from .layout import (expand_block_map, from_hnd, local_blocks, num_blocks, to_hnd, token_mask,
                     valid_blocks)
from .oracle import exact_attention, oracle_block_map
from .predict import (block_self_similarity, mean_group_logits, pool_blocks, predict_block_map,
                      qbar_keys_logits, qgroup_keys_logits, query_keys_lse, round_tf32,
                      select_blocks, select_mass_threshold, select_topcdf, select_topk)
from .quant import (QuantStats, channel_scales, check_fp16_operands, dequantize_int8_per_block,
                    expand_kv_heads, quantize_int8_per_block, quantize_v_fp8, quant_stats,
                    round_e4m3, round_fp16, smooth_k, to_output)
from .stats import (concat_sparsity_stats, cosine_similarity, error_metrics, filter_skips,
                    mask_skips, relative_l1, rmse, sparsity_stats)

__all__ = [
    "PV_MODES", "QK_MODES", "QuantStats", "block_attention_mass", "block_self_similarity",
    "block_sparse_attention", "channel_scales", "check_fp16_operands", "cosine_similarity",
    "dense_attention",
    "dequantize_int8_per_block", "error_metrics", "expand_block_map", "expand_kv_heads",
    "from_hnd", "mean_group_logits", "num_blocks", "pool_blocks", "predict_block_map",
    "qbar_keys_logits", "qgroup_keys_logits", "query_keys_lse", "round_tf32",
    "quantize_int8_per_block", "quantize_v_fp8", "quant_stats",
    "quantized_operands", "relative_l1", "rmse", "round_e4m3", "round_fp16", "select_blocks",
    "select_mass_threshold", "select_topcdf", "select_topk", "smooth_k", "sparsity_stats",
    "mask_skips", "filter_skips",
    "to_output",
    "concat_sparsity_stats", "exact_attention", "oracle_block_map",
    "to_hnd", "token_mask", "valid_blocks", "local_blocks",
]
