"""Exact attention rows from inside any Hugging Face decoder, through transformers' attention registry.

The probe is an attention function registered under :data:`PROBE` (with transformers' sdpa mask builder, so
padding and sliding windows reach it). For every attention layer it

1. computes the layer's real output with sdpa, or with the family's own eager function where the family
   soft-caps its logits, has attention sinks (``s_aux``/``sinks``, one logit per head), or where the model
   ran eager before it was prepared (a family without sdpa support), so the model's forward pass is
   unchanged;
2. recomputes only the selected query rows (by default the last one) exactly as the model attends: on the
   query and keys it was given (after rotary embeddings and q/k norms), each query head against its own KV
   head under GQA, with the model's scaling, soft-capping, sinks (an extra softmax column that takes mass
   and is dropped: the rows are the weights the values get and sum to less than one) and mask (causal,
   padding, sliding window; none for a bidirectional layer), softmax in float32. That is ``(B, H, S, K)``
   per layer: memory O(layers x heads x N), never O(N^2);
3. hands the probabilities to a callback, and optionally zeroes chosen heads' outputs (ablation: the head
   is removed before the output projection), the same heads in every row or, with a (B, L, H) boolean
   tensor, each row's own.

The probe's presence is a property of the model: :func:`prepare` switches it to the probe's function once
(``attention_probe`` does so on first use) and nothing switches it back. With no probe active in the calling
context the function is exactly sdpa (or the family's eager path where it soft-caps). What a probe does is
scoped to one ``attention_probe`` block in one context (a :class:`contextvars.ContextVar`): two threads
probing one model each see only their own rows; a probe nested in another in one context is an error.
Every attention layer reports to the active probe; callers check after each forward pass that each one
reported exactly once (:meth:`ProbeState.end_pass`), so a layer that bypasses the attention interface, or
one called several times per pass (diffllama's two maps, looped layers), fails loudly. A hybrid's other
layers (Mamba, linear attention, convolutions) are expected silent: :func:`retrieval_heads.families.attention_layers`
reads which layers attend from the config. A keyword of the attention call that the probe does not read
and that would change the weights (a ``position_bias``, sparse ``indices``) stops the pass with one line
naming the family and the keyword, instead of being dropped. docs/families.md lists every causal-LM family
of the installed transformers with its status.

>>> scores = torch.zeros(lm.num_layers, lm.num_heads)                   # doctest: +SKIP
>>> def on_layer(layer, probs):                                          # probs: (B, H, S, K)
...     scores[layer] += probs[0, :, -1, start:end].sum(-1)
>>> with attention_probe(lm.model, on_layer):                             # doctest: +SKIP
...     lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)

:func:`reference_rows` of ``tests/reference.py`` is the slow, obviously correct path the probe is tested
against: eager attention with ``output_attentions=True`` (full N x N matrices), rows picked afterwards.
"""

from __future__ import annotations

import contextvars
import sys
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import eager_rows
from .errors import UserError
from .families import attention_layers

PROBE = "retrieval_heads_probe"
# The same function with masks always built: for models whose attention modules say is_causal=False (a
# decoder that gets its causality from the mask alone, or a bidirectional one), where sdpa's mask builder
# would skip a causal mask and leave the layer to attend everywhere.
PROBE_MASKED = "retrieval_heads_probe_masked"

OnLayer = Callable[[int, torch.Tensor], None]


@dataclass
class ProbeState:
    """What one ``attention_probe`` block does, and how often each layer has reported in the current pass."""

    on_layer: OnLayer | None
    query_positions: torch.Tensor | None  # indices into the query axis (negative allowed); None: the last row
    ablate: dict[int, list[int]] | torch.Tensor = field(default_factory=dict)  # or (B, L, H) bool, True = removed
    num_layers: int = 1
    on_visible: OnLayer | None = None  # gets (layer, allowed (B, 1 or H, S, K) bool): the keys each row may see
    counts: list[int] = field(default_factory=list)  # reports per layer since the last end_pass
    attention_layers: list[int] | None = None  # the layers that attend (hybrids); None: every layer

    def __post_init__(self) -> None:
        self.counts = [0] * self.num_layers

    def layer_index(self, module) -> int:
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < self.num_layers:
            raise UserError(f"{type(module).__name__} has no layer index in 0..{self.num_layers - 1} "
                            f"(layer_idx={idx!r}); it cannot be probed")
        return idx

    def end_pass(self, model=None) -> None:
        """Check that every layer reported exactly once since the last call (one forward pass), then reset.
        Raises UserError naming the layers that did not (a layer that bypasses the attention interface)."""
        counts, self.counts = self.counts, [0] * self.num_layers
        attends = set(range(self.num_layers) if self.attention_layers is None else self.attention_layers)
        wrong = [(layer, n) for layer, n in enumerate(counts) if n != (1 if layer in attends else 0)]
        if wrong:
            name = type(model).__name__ if model is not None else "the model"
            said = ", ".join(f"layer {layer} {n} times" for layer, n in wrong[:4])
            more = f" (and {len(wrong) - 4} more)" if len(wrong) > 4 else ""
            if any(n > 1 for _, n in wrong):
                raise UserError(f"in one forward pass of {name} each attention layer must reach the probe once: "
                                f"{said}{more}; a layer attending several times per pass (a looped or shared "
                                "layer) cannot be probed")
            raise UserError(f"in one forward pass of {name} each attention layer must reach the probe once: "
                            f"{said}{more}; its attention does not go through transformers' attention interface")


_ACTIVE: contextvars.ContextVar[ProbeState | None] = contextvars.ContextVar("retrieval_heads_probe", default=None)


# Keywords of the attention call that do not change which weights the layer applies, or that the probe reads
# (softcap, the sinks). Any other keyword with a value (a position bias, a kernel option) is refused.
_UNDERSTOOD = frozenset({
    "dropout", "scaling", "sliding_window", "is_causal", "position_ids", "output_attentions", "use_cache",
    "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "softcap", "s_aux",
    "sinks", "layer_idx", "position_embeddings", "past_key_values", "past_key_value", "token_type_ids",
})
SINK_KEYS = ("s_aux", "sinks")


def family_of(module) -> str:
    """The transformers family a module belongs to (``gpt_oss`` for ``transformers.models.gpt_oss...``)."""
    parts = type(module).__module__.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["transformers", "models"] else type(module).__name__


def _sinks(module, kwargs) -> torch.Tensor | None:
    """The per-head sink logits (H,) the layer was given, or None; UserError for any other shape."""
    given = [(k, kwargs[k]) for k in SINK_KEYS if kwargs.get(k) is not None]
    if not given:
        return None
    key, sinks = given[0]
    H = getattr(module, "num_heads", None) or getattr(getattr(module, "config", None), "num_attention_heads", None)
    if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1 or (H is not None and sinks.numel() != H):
        shape = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise UserError(f"{family_of(module)}: its attention passes {key} of shape {shape}, not one sink logit "
                        "per head; it cannot be probed exactly")
    return sinks


def check_keywords(module, kwargs) -> None:
    """UserError naming the family and the keyword for any keyword the probe does not understand."""
    for key, value in kwargs.items():
        if key in _UNDERSTOOD or value is None or value is False:
            continue
        raise UserError(f"{family_of(module)}: its attention passes {key}=, which the probe does not read; "
                        "it cannot be probed exactly")


# The attention function each prepared model ran before it was switched to the probe, by module: the probe
# computes a layer's output with the family's eager function where the model ran eager (a family without
# sdpa support), else with sdpa.
_RAN_EAGER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _base_attention(module, softcap, sinks) -> Callable:
    """The function that computes the layer's real output: sdpa, or the family's own eager path where the
    layer soft-caps its logits or has attention sinks (sdpa knows neither), or where the model ran eager."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if softcap is None and sinks is None and not _RAN_EAGER.get(module, False):
        return sdpa_attention_forward
    family = sys.modules.get(type(module).__module__)
    fn = getattr(family, "eager_attention_forward", None)
    if fn is None:
        what = "soft-caps attention" if softcap is not None else "has attention sinks"
        raise UserError(f"{family_of(module)}: {type(module).__name__} {what} but its module has no "
                        "eager_attention_forward; it cannot be probed exactly")
    return fn


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None = None,
    positions: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Attention probabilities of the selected query rows, in float32.

    query (B, H, Q, d); key (B, H_kv, K, d) with H = G * H_kv (query head h reads KV head h // G, as
    ``repeat_kv`` lays them out); attention_mask None (plain causal), boolean (True = attend) or additive,
    shaped (B, 1 or H, Q, >=K). Returns (B, H, S, K) for the S rows in ``positions`` (default: the last).
    ``sinks`` (H,): per-head sink logits, one extra column of the softmax that takes mass and is dropped
    (gpt-oss and others): the rows then sum to less than one, the weights the layer applies to the values.
    ``causal=False`` with no mask: every row sees every key (a bidirectional layer).
    """
    B, H, Q, d = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    G = H // Hkv
    # The default (last row) is a plain slice, and other rows are checked on the host: no device sync per layer.
    pos = None if positions is None else positions.cpu() % Q  # (S,)
    S = 1 if pos is None else pos.numel()
    scale = d**-0.5 if scaling is None else scaling
    rows = query[:, :, -1:, :] if pos is None else query[:, :, pos.to(query.device), :]  # (B, H, S, d)
    q = rows.float().reshape(B, Hkv, G * S, d)  # (B, Hkv, G*S, d)
    logits = torch.matmul(q, key.float().transpose(-1, -2))  # (B, Hkv, G*S, K)
    logits = logits.view(B, H, S, K) * scale  # (B, H, S, K)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is None:
        # the last row sees every key under causal (lower-right) alignment; earlier rows need masking
        absolute = None if pos is None or not causal else pos + (K - Q)  # (S,) key index of each selected query
        if absolute is not None and bool((absolute < K - 1).any()):
            future = torch.arange(K)[None, :] > absolute[:, None]  # (S, K)
            logits = logits.masked_fill(future.to(query.device), float("-inf"))
    else:
        m = attention_mask[..., :K]
        m = m[:, :, -1:, :] if pos is None else m[:, :, pos.to(m.device), :]  # (B, 1 or H, S, K)
        if m.dtype == torch.bool:
            logits = logits.masked_fill(~m, float("-inf"))
        else:
            logits = logits + m.float()
    if sinks is not None:
        sink = sinks.float().to(logits.device).view(1, H, 1, 1).expand(B, H, S, 1)  # (B, H, S, 1)
        return torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :K]  # (B, H, S, K)
    return torch.softmax(logits, dim=-1)  # (B, H, S, K)


def allowed_keys(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                 positions: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
    """The keys each selected query row may attend to, as :func:`attention_rows` masks them: (B, 1 or H, S, K)
    bool. Under uniform attention (zero queries) a row spreads its mass evenly over exactly these keys."""
    B, Q, K = query.shape[0], query.shape[2], key.shape[2]
    pos = None if positions is None else positions.cpu() % Q  # (S,)
    if attention_mask is None and not causal:
        return torch.ones(B, 1, 1 if pos is None else pos.numel(), K, dtype=torch.bool, device=query.device)
    if attention_mask is None:
        absolute = torch.tensor([Q - 1]) if pos is None else pos  # (S,) query index
        allowed = torch.arange(K)[None, :] <= (absolute + (K - Q))[:, None]  # (S, K) lower-right causal
        return allowed.to(query.device)[None, None].expand(B, 1, -1, -1)  # (B, 1, S, K)
    m = attention_mask[..., :K]
    m = m[:, :, -1:, :] if pos is None else m[:, :, pos.to(m.device), :]  # (B or 1, 1 or H, S, K)
    allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return allowed.expand(B, -1, -1, -1)


def _additive_mask(attention_mask, query, key, causal: bool = True) -> torch.Tensor | None:
    """Eager paths add the mask to the logits and get causality only from it: turn the sdpa mask (boolean,
    or None for plain causal, or for no mask at all in a bidirectional layer) into an additive one."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return attention_mask
    if attention_mask is None and not causal:
        return None
    Q, K = query.shape[2], key.shape[2]
    if attention_mask is None:
        q_abs = torch.arange(Q, device=query.device) + (K - Q)  # lower-right aligned causal mask
        allowed = (torch.arange(K, device=query.device)[None, :] <= q_abs[:, None])[None, None]  # (1, 1, Q, K)
    else:
        allowed = attention_mask
    zeros = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
    return zeros.masked_fill(~allowed, torch.finfo(query.dtype).min)


def probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered attention function: the model's own output, plus the probe's rows when active."""
    check_keywords(module, kwargs)
    softcap = kwargs.get("softcap")
    sinks = _sinks(module, kwargs)
    base = _base_attention(module, softcap, sinks)
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal) and query.shape[2] > 1
    base_mask = attention_mask
    if base.__name__ != "sdpa_attention_forward":
        base_mask = _additive_mask(attention_mask, query, key, causal)
    out, weights = base(module, query, key, value, base_mask, dropout=dropout, scaling=scaling, **kwargs)
    state = _ACTIVE.get()
    if state is None:
        return out, weights
    layer = state.layer_index(module)
    state.counts[layer] += 1
    if state.on_layer is not None:
        rows = attention_rows(query, key, attention_mask, scaling, softcap, state.query_positions, sinks, causal)
        state.on_layer(layer, rows)
    if state.on_visible is not None:
        state.on_visible(layer, allowed_keys(query, key, attention_mask, state.query_positions, causal))
    if isinstance(state.ablate, torch.Tensor):  # per row: out[b, :, h, :] = 0 where ablate[b, layer, h]
        remove = state.ablate[:, layer].to(out.device)  # (B, H)
        return out.masked_fill(remove[:, None, :, None], 0), weights  # out: (B, Q, H, d)
    heads = state.ablate.get(layer)
    if heads:
        out = out.clone()
        out[:, :, heads, :] = 0  # out: (B, Q, H, d), the heads' outputs before o_proj
    return out, weights


_installed = False
_lock = threading.Lock()


def install() -> None:
    """Register the probe and its mask builder with transformers (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        def full_mask(*args, **kwargs):
            kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
            return sdpa_mask(*args, **kwargs)

        AttentionInterface.register(PROBE, probe_attention)
        AttentionMaskInterface.register(PROBE, sdpa_mask)
        AttentionInterface.register(PROBE_MASKED, probe_attention)
        AttentionMaskInterface.register(PROBE_MASKED, full_mask)
        _installed = True


def prepare(model) -> None:
    """Switch ``model`` to the probe's attention function, once (idempotent; nothing switches it back).

    With no probe active the function computes exactly what sdpa (or, where the family soft-caps, its eager
    path) computes, so the model's outputs are unchanged. Raises UserError for a model that does not use
    transformers' attention interface."""
    install()
    with _lock:
        if model.config._attn_implementation in (PROBE, PROBE_MASKED):
            return
        if not model._can_set_attn_implementation():
            if eager_rows.enabled(model):
                return
            raise UserError(f"{type(model).__name__} does not use transformers' attention interface; it cannot be "
                            f"probed (rerun with {eager_rows.FLAG} to score it from its full attention matrices)")
        ran_eager = model.config._attn_implementation == "eager"
        masked = False
        for module in model.modules():
            _RAN_EAGER[module] = ran_eager
            masked = masked or (hasattr(module, "layer_idx") and getattr(module, "is_causal", True) is False)
        model.set_attn_implementation(PROBE_MASKED if masked else PROBE)


@contextmanager
def attention_probe(
    model,
    on_layer: OnLayer | None,
    query_positions: torch.Tensor | None = None,
    ablate: dict[int, list[int]] | torch.Tensor | None = None,
    on_visible: OnLayer | None = None,
) -> Iterator[ProbeState]:
    """Within this block every forward pass of ``model`` in this context (thread) calls ``on_layer(layer,
    probs)`` per layer, with probs (B, H, S, K) for the rows ``query_positions`` of that pass's queries
    (default: the last row), and zeroes the outputs of the heads in ``ablate``: {layer: [head, ...]} in every
    row, or a (B, L, H) boolean tensor, True where row b's head (l, h) is removed (every pass then has B rows).
    ``on_visible(layer, allowed)``, if given, gets the same rows' mask: allowed (B, 1 or H, S, K) bool, True
    where the row may attend.

    Yields the :class:`ProbeState`; call its ``end_pass(model)`` after each forward pass to check that every
    attention layer reported exactly once. A model without the attention interface is refused unless
    :func:`retrieval_heads.eager_rows.enable` was called for it; its rows then come from its own full
    matrices (no ablation on that path). Probes in other threads are independent; nesting one in another in the same
    context raises RuntimeError. The model stays switched to the probe's function afterwards (see
    :func:`prepare`)."""
    if isinstance(ablate, torch.Tensor):
        cfg = model.config.get_text_config()
        want = (cfg.num_hidden_layers, cfg.num_attention_heads)
        if ablate.dtype != torch.bool or ablate.dim() != 3 or tuple(ablate.shape[1:]) != want:
            raise ValueError(f"ablate: a boolean (B, {want[0]}, {want[1]}) tensor, got {ablate.dtype} "
                             f"{tuple(ablate.shape)}")
    prepare(model)
    if _ACTIVE.get() is not None:
        raise RuntimeError("attention_probe is already active in this context: nested probes are not supported "
                           "(combine the callbacks and ablations in one probe)")
    removal = ablate if isinstance(ablate, torch.Tensor) else dict(ablate or {})
    layers = attention_layers(model.config)
    if layers == []:
        raise UserError(f"{type(model).__name__} has no softmax-attention layer (its config's layer types); "
                        "it cannot be probed")
    state = ProbeState(on_layer, query_positions, removal, model.config.get_text_config().num_hidden_layers,
                       on_visible=on_visible, attention_layers=layers)
    if eager_rows.enabled(model) and not model._can_set_attn_implementation():
        removes = bool(removal.any()) if isinstance(removal, torch.Tensor) else any(removal.values())
        if removes:
            raise UserError(f"{type(model).__name__}: heads cannot be removed with {eager_rows.FLAG} (removing a "
                            "head needs transformers' attention interface)")
        with eager_rows.hooked(model, lambda layer, weights: _eager_report(state, layer, weights)):
            try:
                yield state
            except (UserError, RuntimeError, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - a family whose layers return their weights otherwise
                raise UserError(f"{type(model).__name__}: its forward pass fails with {eager_rows.FLAG} "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


def _eager_report(state: ProbeState, layer: int, weights: torch.Tensor) -> None:
    """One decoder layer's full weights (B, H, Q, K) on the --eager-attentions path: its selected rows."""
    state.counts[layer] += 1
    Q = weights.shape[2]
    pos = state.query_positions
    rows = weights[:, :, -1:, :] if pos is None else weights[:, :, (pos.cpu() % Q).to(weights.device), :]
    rows = rows.float()  # (B, H, S, K)
    if state.on_layer is not None:
        state.on_layer(layer, rows)
    if state.on_visible is not None:
        state.on_visible(layer, rows > 0)
