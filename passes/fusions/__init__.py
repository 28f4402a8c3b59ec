"""Fusion passes: GELU, LayerNorm/RMSNorm and residual forms, activations, embeddings, attention, rotary.

Every public module here is imported by the pass registry's discovery; private modules
(``_attention_*``) are helpers of the attention fusion.
"""
