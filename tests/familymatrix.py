"""The probe on every causal-LM family of the installed transformers, on tiny random configs.

For each family of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` :func:`tiny_config` shrinks the family's default
config (hidden size 64, 2 layers, 4 heads, a small vocabulary; hybrids keep one attention layer and one
other layer) and :func:`check` runs one model three ways on the same ids:

- plain: the model as loaded (its default attention function), logits;
- probed: under :func:`retrieval_heads.capture.attention_probe`, the last row and one earlier row of every
  attention layer, and the logits;
- reference: eager attention with ``output_attentions=True`` (full N x N matrices), the same rows.

A family is ``exact`` when every probed row is within ROW_TOL of the reference and the probed logits within
LOGIT_TOL of the plain ones; ``eager`` when it has no attention interface but is exact with
``--eager-attentions`` (:mod:`retrieval_heads.eager_rows`, against its own ``output_attentions`` rows);
``refused`` when the probe stops with one line (a UserError) saying why;
``differs`` when neither (a silent wrong result: a bug); ``error`` when the probe raised anything but a
UserError (a traceback: a bug); ``untestable`` when the tiny config or the plain forward pass cannot be
built (nothing about the probe is learnt).

``bench/families.py`` writes the statuses to ``tests/family_status.json`` and ``docs/families.md``;
``tests/test_families.py`` runs the matrix and compares.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings

import torch

ROW_TOL = 1e-5
LOGIT_TOL = 1e-5
N = 20  # prompt length: short, longer than the tiny sliding windows below
VOCAB = 256
MAX_PARAMS = 20_000_000

# shrunk wherever the default config has the attribute (sub-configs too)
SHRINK = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "n_embed": 64, "embed_dim": 64, "hidden_dim": 64,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    "decoder_attention_heads": 4, "encoder_attention_heads": 4, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "kv_channels": 16, "d_kv": 16, "swa_head_dim": 16, "global_head_dim": 16,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "d_ff": 128, "ffn_hidden_size": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_topk": 2, "top_k": 2, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "num_dense_layers": 1,
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    "vocab_size": VOCAB, "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "max_seq_len": 128,
    "sliding_window": 8, "attention_window": 8, "local_window_size": 8, "max_window_layers": 1,
    "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "mamba_d_state": 8, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_expand": 2,
    "ssm_state_size": 8, "state_size": 8, "n_groups": 1, "mamba_head_dim": 16, "time_step_rank": 8,
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16, "emb_dim": 64, "moe_k": 2,
    "shape_vocab_size": 64, "pronunciation_vocab_size": 64, "shape_embed_dim": 16, "pronunciation_embed_dim": 16,
    "mamba_headdim": 16, "conv_L_cache": 3, "mamba_d_ssm": 128, "rotary_dim": 8, "num_kv_shared_layers": 0, "lru_width": 64, "num_nextn_predict_layers": 0, "mtp_num_layers": 0,
}
# set even where the default is None (None there means "derive it", not "off")
NONE_TOO = {"num_experts_per_tok", "n_routed_experts", "num_experts", "num_local_experts", "moe_intermediate_size",
            "head_dim", "n_shared_experts", "num_key_value_heads"}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
             "cls_token_id", "unk_token_id", "mask_token_id")


def families() -> list[str]:
    """Every causal-LM family (model type) of the installed transformers, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _two_layers(kinds: list, attends) -> list:
    """A 2-layer version of a layer pattern: one layer that does not attend then one that does, if the
    pattern has both; else its first two entries."""
    other = [k for k in kinds if not attends(k)]
    att = [k for k in kinds if attends(k)]
    if other and att:
        return [other[0], att[0]]
    return [kinds[0], kinds[min(1, len(kinds) - 1)]]


def _shrink(cfg, depth: int = 0) -> None:
    from retrieval_heads.families import _attends

    for name, value in SHRINK.items():
        old = vars(cfg).get(name, False)
        if (isinstance(old, int) and not isinstance(old, bool)) or (old is None and name in NONE_TOO):
            setattr(cfg, name, value)
    for name in TOKEN_IDS:
        v = vars(cfg).get(name)
        if isinstance(v, int) and v >= VOCAB:
            setattr(cfg, name, 1)
        elif isinstance(v, list):
            setattr(cfg, name, [i if i < VOCAB else 1 for i in v])
    for name in ("layer_types", "layers_block_type", "block_types"):
        kinds = vars(cfg).get(name)
        if isinstance(kinds, (list, tuple)) and kinds:
            setattr(cfg, name, _two_layers(list(kinds), _attends))
    if isinstance(vars(cfg).get("attn_layer_period"), int):
        cfg.attn_layer_period, cfg.attn_layer_offset = 2, 1
    if isinstance(vars(cfg).get("attn_layer_indices"), list) or "attn_layer_indices" in vars(cfg):
        cfg.attn_layer_indices = [1]
    if isinstance(vars(cfg).get("qk_rope_head_dim"), int) and "head_dim" in vars(cfg):
        cfg.head_dim = cfg.qk_rope_head_dim  # multi-head latent attention: rotary on head_dim channels
        if "num_key_value_heads" in vars(cfg) and isinstance(vars(cfg).get("kv_lora_rank"), int):
            cfg.num_key_value_heads = cfg.num_attention_heads  # its keys are one per head
    if isinstance(vars(cfg).get("mlp_layer_types"), list):
        cfg.mlp_layer_types = cfg.mlp_layer_types[:2]
    for name, sub in list(vars(cfg).items()):
        if depth < 2 and hasattr(sub, "to_dict") and hasattr(sub, "model_type"):
            _shrink(sub, depth + 1)


# what a few families need beyond the shrinking (their defaults would not test what matters)
FIXES = {
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},  # its default has no attention
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "mamba2": {"num_heads": 8},  # heads x head_dim = expand x hidden
    "glm4_moe_lite": {"num_key_value_heads": 4},  # multi-head latent attention: a key per head
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [32, 32]},
}


def tiny_config(family: str):
    """The family's default config, shrunk (see the module's docstring); float32."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = CONFIG_MAPPING[family]()
    _shrink(cfg)
    for name, value in FIXES.get(family, {}).items():
        setattr(cfg, name, value)
    return cfg


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def _reference(model, ids, positions, family):
    """Eager rows (B, H, S, N) per attention layer, by layer index; granite_swa-style families, whose eager
    weights leave the sink out (it scales the output instead), get gpt-oss's eager function, which puts the
    sink in the softmax: the same output (checked by the caller), and the weights the values are given."""
    from reference import eager_attention, reference_rows
    from retrieval_heads.families import layer_set

    n_layers = model.config.get_text_config().num_hidden_layers
    attends = layer_set(model.config)
    if attends != list(range(n_layers)):  # a hybrid: its other layers' outputs may be anything
        with eager_attention(model):
            out = model(input_ids=ids, output_attentions=True, use_cache=False, logits_to_keep=1)
        att = [a for a in out.attentions if a is not None]
        if len(att) == n_layers:
            att = [att[i] for i in attends]
        n = ids.shape[1]
        return [a[:, :, (positions % n).to(a.device), :].float() for a in att]
    mod = sys.modules[type(model).__module__]
    patched = None
    if family in SINK_AS_SCALE:
        from transformers.models.gpt_oss import modeling_gpt_oss

        patched = mod.eager_attention_forward
        mod.eager_attention_forward = modeling_gpt_oss.eager_attention_forward
    try:
        rows = reference_rows(model, ids, positions)
    finally:
        if patched is not None:
            mod.eager_attention_forward = patched
    return rows


SINK_AS_SCALE = {"granite_swa", "granitemoe_swa"}


def check(family: str) -> dict:
    """One family's status: {"status": ..., "why": one line, and for exact ones "row_diff", "logit_diff"}."""
    from transformers import AutoModelForCausalLM

    from retrieval_heads.capture import attention_probe
    from retrieval_heads.errors import UserError
    from retrieval_heads.families import layer_set

    with _quiet():
        try:
            cfg = tiny_config(family)
            with torch.device("meta"):  # count first: a config that stays big is not built
                size = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
            if size > MAX_PARAMS:
                return {"status": "untestable", "why": f"the shrunk config still has {size / 1e6:.0f}M parameters"}
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg).float().eval()
            ids = torch.randint(3, VOCAB, (1, N), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                plain = model(input_ids=ids, use_cache=False).logits
        except Exception as e:  # noqa: BLE001 - any failure to build is "untestable"
            return {"status": "untestable", "why": _first_line(e)}
        positions = torch.tensor([-6, -1])  # an earlier row and the last
        got: dict[int, torch.Tensor] = {}
        try:
            with torch.no_grad(), attention_probe(model, lambda l, p: got.__setitem__(l, p.clone()),
                                                  query_positions=positions) as probe:
                probed = model(input_ids=ids, use_cache=False).logits
                probe.end_pass(model)
        except UserError as e:
            why = str(e).splitlines()[0]
            if "--eager-attentions" in why:
                return _check_eager(model, ids, positions, plain, why)
            return {"status": "refused", "why": why}
        except Exception as e:  # noqa: BLE001
            return {"status": "error", "why": _first_line(e)}
        logit_diff = float((probed.float() - plain.float()).abs().max())
        try:
            with torch.no_grad():
                ref = _reference(model, ids, positions, family)
        except Exception as e:  # noqa: BLE001
            return {"status": "untestable", "why": "eager reference: " + _first_line(e)}
        layers = layer_set(model.config)
        ref = [r for r in ref if r is not None]
        if len(ref) != len(layers) or sorted(got) != layers:
            return {"status": "differs", "why": f"probe reported layers {sorted(got)}, eager {len(ref)} layers, "
                                                f"the config's attention layers {layers}"}
        row_diff = 0.0
        for layer, r in zip(layers, ref):
            g = got[layer]
            if g.shape != r.shape:
                return {"status": "differs", "why": f"layer {layer}: probe rows {tuple(g.shape)}, eager {tuple(r.shape)}"}
            row_diff = max(row_diff, float((g - r).abs().max()))
    out = {"row_diff": float(f"{row_diff:.1e}"), "logit_diff": float(f"{logit_diff:.1e}")}
    if row_diff <= ROW_TOL and logit_diff <= LOGIT_TOL:
        return {"status": "exact", "why": "", **out}
    return {"status": "differs", "why": f"rows differ by {row_diff:.1e}, logits by {logit_diff:.1e}", **out}


def _check_eager(model, ids, positions, plain, why) -> dict:
    """A family refused for lack of the attention interface, again with --eager-attentions: its rows against
    the same model's output_attentions without the flag, and its logits."""
    from retrieval_heads import eager_rows
    from retrieval_heads.capture import attention_probe
    from retrieval_heads.errors import UserError

    refused = {"status": "refused", "why": why}
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False, output_attentions=True).attentions
        eager_rows.enable(model)
        got: dict[int, torch.Tensor] = {}
        with torch.no_grad(), attention_probe(model, lambda l, p: got.__setitem__(l, p.clone()),
                                              query_positions=positions) as probe:
            probed = model(input_ids=ids, use_cache=False).logits
            probe.end_pass(model)
    except UserError as e:
        return {**refused, "why": f"{why}; with the flag: {str(e).splitlines()[0]}"}
    except Exception as e:  # noqa: BLE001
        return {**refused, "why": f"{why}; with the flag: {_first_line(e)}"}
    if not ref or any(r is None for r in ref) or len(ref) != len(got):
        return {"status": "differs", "why": "--eager-attentions: the layers reported are not output_attentions'"}
    n = ids.shape[1]
    row_diff = max(float((got[i] - r[:, :, positions % n, :].float()).abs().max()) for i, r in enumerate(ref))
    logit_diff = float((probed - plain).abs().max())
    out = {"row_diff": float(f"{row_diff:.1e}"), "logit_diff": float(f"{logit_diff:.1e}")}
    if row_diff <= ROW_TOL and logit_diff <= LOGIT_TOL:
        return {"status": "eager", "why": "no attention interface; exact with --eager-attentions", **out}
    return {"status": "differs", "why": f"--eager-attentions: rows differ by {row_diff:.1e}, logits by "
                                        f"{logit_diff:.1e}", **out}


def run_all(names: list[str] | None = None) -> dict[str, dict]:
    return {f: check(f) for f in (names or families())}


if __name__ == "__main__":
    import json
    import time

    for f in sys.argv[1:] or families():
        t = time.perf_counter()
        r = check(f)
        print(f, json.dumps(r), f"{time.perf_counter() - t:.1f}s", flush=True)
