"""Small helpers around a transformers model that every layer may use: where its inputs go, how a KV cache
is handed to it and read back, quiet logging, and the finiteness check of a probed pass.

This module sits at the bottom of the package (beside ``errors``, ``registry`` and ``io``): it imports no
other module of the package but ``errors``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import NumericalError, UserError

if TYPE_CHECKING:
    import torch


def input_device(model):
    """Where the input ids go: the embedding's device (also right for models sharded with a device_map)."""
    return model.get_input_embeddings().weight.device


def cache_kwarg(model) -> str:
    """The forward argument that takes a KV cache: ``cache`` where the model's forward has it, else
    ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward pass returned."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def quiet_transformers() -> None:
    """No transformers warnings or loading bars between our progress bar and table."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def check_tokenizer(model: str, tokenizer, config=None) -> None:
    """UserError when ``tokenizer`` turns a word into no tokens: what transformers builds for a local folder
    that lacks its tokenizer files (an empty vocabulary), which would fail later as an "empty needle"; and,
    given the model's ``config``, when the tokenizer's own vocabulary (added tokens aside) holds ids beyond
    the model's embeddings (config.json of a model with another vocabulary), which would fail in the first
    forward pass with an IndexError."""
    try:
        ids = tokenizer("Delaware", add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001  (another failure is reported where the tokenizer is used)
        return
    if not ids:
        raise UserError(f"the tokenizer of {model!r} encodes text to no tokens: its folder lacks the tokenizer "
                        "files (tokenizer.json, or vocab.json and merges.txt, or tokenizer.model); copy them from "
                        "the model it was trained with")
    text = config.get_text_config() if config is not None else None
    have, need = getattr(text, "vocab_size", None), getattr(tokenizer, "vocab_size", None)
    if isinstance(have, int) and isinstance(need, int) and need > have:
        raise UserError(f"the tokenizer of {model!r} has {need} tokens but the model's embeddings only {have} "
                        "(vocab_size in config.json): tokenizer and weights do not belong together")


def check_finite(mass: torch.Tensor, logits: torch.Tensor | None = None) -> None:
    """mass (B, L, ...): raise NumericalError naming the first layer with a non-finite value."""
    import torch

    bad = ~torch.isfinite(mass.flatten(2)).all(dim=2).all(dim=0)  # (L,)
    if bool(bad.any()):
        layer = int(bad.nonzero()[0])
        raise NumericalError(
            f"the forward pass produced NaN/inf attention from layer {layer} on (overflow? try --dtype bfloat16 or float32)"
        )
    if logits is not None and not bool(torch.isfinite(logits).all()):
        raise NumericalError("the forward pass produced NaN/inf logits after the last layer (overflow? try --dtype float32)")


LOCAL_ATTENTION = (None, "eager", "sdpa", "flex_attention")  # implementations whose code ships with torch


def check_attention_code(model: str, config, trust_remote_code: bool) -> None:
    """UserError when the model's config.json asks for an attention implementation other than torch's own
    (``attn_implementation``: a hub kernel such as ``org/kernel``, or ``flash_attention_2``, for which
    transformers fetches ``kernels-community/flash-attn2`` when the package is missing). Such a kernel is
    native code from the hub, loaded from a file's field: it runs only with ``--trust-remote-code``, like a
    model's own Python code (offline, the kernels library even skips its publisher check)."""
    if trust_remote_code:
        return
    subs = [getattr(config, k, None) for k in getattr(config, "sub_configs", None) or {}]
    for c in [config, config.get_text_config(), *subs]:
        impl = getattr(c, "_attn_implementation", None)
        if impl not in LOCAL_ATTENTION:
            raise UserError(f"the config.json of {model!r} asks for attention implementation {str(impl)[:80]!r}, "
                            "whose code comes from the hub (a kernel) or a package; it runs only with "
                            "--trust-remote-code (or remove attn_implementation from config.json)")
