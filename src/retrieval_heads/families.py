"""Which layers of a model use softmax attention, read from its config.

Hybrid families interleave attention layers with layers that never reach the attention interface (Mamba
or linear-attention mixers, convolutions, recurrent blocks). The probe's once-per-layer check, the result's
heads, the heatmaps and the ablation draws all count the attention layers only. The config says which
they are, under one of several names:

==========================================  =====================================================
config field                                an attention layer
==========================================  =====================================================
``layer_types`` / ``layers_block_type``     an entry ending in ``attention`` that is not linear
                                            (``full_attention``, ``sliding_attention``, ...),
                                            ``attention``, or ``hybrid`` (attention beside a
                                            Mamba mixer: falcon_h1, zaya, zamba)
``block_types`` (recurrent_gemma)           ``attention``
``attn_layer_indices`` (bamba, ...)         listed
``attn_layer_period``, ``attn_layer_offset``  ``i % period == offset`` (jamba)
==========================================  =====================================================

A config that declares none of them attends on every layer.

>>> from transformers import Qwen3NextConfig
>>> attention_layers(Qwen3NextConfig(num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"]))
[3]
>>> attention_layers(Qwen3NextConfig(num_hidden_layers=2, layer_types=["full_attention"] * 2)) is None
True
"""

from __future__ import annotations

_NOT_ATTENTION = ("linear", "mamba", "conv", "recurrent", "ssm", "rwkv", "deltanet", "gdn", "kda", "lightning")


def _attends(kind) -> bool:
    if not isinstance(kind, str):
        return False
    k = kind.lower()
    if any(word in k for word in _NOT_ATTENTION):
        return False
    return k in ("attention", "hybrid", "hybrid_sliding") or k.endswith("_attention")


def attention_layers(config) -> list[int] | None:
    """The indices of the layers that use softmax attention, ascending; None when every layer does (or the
    config declares nothing). ``config`` is a model's config (its text config is read)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = int(cfg.num_hidden_layers)
    layers: list[int] | None = None
    for name in ("layer_types", "layers_block_type", "block_types"):
        kinds = getattr(cfg, name, None)
        if isinstance(kinds, (list, tuple)) and kinds:
            kinds = [kinds[i % len(kinds)] for i in range(n)]  # block_types repeats as a pattern
            layers = [i for i, kind in enumerate(kinds) if _attends(kind)]
            break
    if layers is None:
        indices = getattr(cfg, "attn_layer_indices", None)
        period, offset = getattr(cfg, "attn_layer_period", None), getattr(cfg, "attn_layer_offset", None)
        if isinstance(indices, (list, tuple)) and indices:
            layers = sorted({int(i) for i in indices if 0 <= int(i) < n})
        elif isinstance(period, int) and isinstance(offset, int) and period > 0:
            layers = [i for i in range(n) if i % period == offset]
    if layers is None or layers == list(range(n)):
        return None
    return layers


def layer_set(config) -> list[int]:
    """Every attention layer's index (all layers where :func:`attention_layers` is None)."""
    layers = attention_layers(config)
    n = int(config.get_text_config().num_hidden_layers if hasattr(config, "get_text_config") else config.num_hidden_layers)
    return list(range(n)) if layers is None else layers
