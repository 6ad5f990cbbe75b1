"""Ground truth: dense, float64-friendly dilated attention with explicit masks (stage 0)."""

from reference.dense import attention, dilated_attention, dilation_mask, head_groups, merge_partials

__all__ = ["attention", "dilated_attention", "dilation_mask", "head_groups", "merge_partials"]
