"""Families beyond plain attention: sinks, unknown attention keywords, hybrids; and the matrix over every
causal-LM family of the installed transformers (tests/familymatrix.py, tests/family_status.json)."""

from __future__ import annotations

import json
from pathlib import Path

import familymatrix
import pytest
import torch

from retrieval_heads.capture import attention_probe, attention_rows
from reference import reference_rows
from retrieval_heads.errors import UserError
from retrieval_heads.families import attention_layers

STATUS = Path(__file__).resolve().parent / "family_status.json"
TOL = 1e-5


def sink_model(family: str):
    """A tiny gpt_oss or granite_swa with random, clearly non-zero sinks (their inits are zeros or small)."""
    cfg = familymatrix.tiny_config(family)
    cfg.sliding_window = 8  # one sliding layer, one full one, both with sinks
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape) * 2)
    return model


def probe(model, ids, positions=None):
    got = {}
    with torch.no_grad(), attention_probe(model, lambda layer, p: got.__setitem__(layer, p.clone()),
                                          query_positions=positions) as state:
        logits = model(input_ids=ids, use_cache=False).logits
        state.end_pass(model)
    return got, logits


@pytest.mark.parametrize("family", ["gpt_oss", "granite_swa"])
def test_sink_rows_equal_eager_and_outputs_unchanged(family):
    """The sinks are in the probe's softmax (rows sum to less than one) and the rows equal eager's (for
    granite_swa, whose eager weights leave the sink out and scale the output instead, eager with gpt-oss's
    function, which gives the same logits: checked here); the model's logits are unchanged by the probe."""
    model = sink_model(family)
    ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([-1, -9, 3])
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
    got, probed = probe(model, ids, positions)
    assert torch.allclose(probed, plain, atol=1e-6, rtol=0), (probed - plain).abs().max()
    with torch.no_grad():
        ref = familymatrix._reference(model, ids, positions, family)
    for layer, r in enumerate(ref):
        g = got[layer]
        assert g.shape == r.shape == (2, 4, 3, 20)
        assert torch.allclose(g, r, atol=TOL, rtol=0), f"layer {layer}: {(g - r).abs().max():.2e}"
        assert bool((g.sum(-1) < 0.999).all())  # the sink took mass
    if family == "granite_swa":  # the reference's eager function gives the model's own logits
        import transformers.models.granite_swa.modeling_granite_swa as mod
        from transformers.models.gpt_oss.modeling_gpt_oss import (
            eager_attention_forward as gpt_oss_eager,
        )

        own = mod.eager_attention_forward
        mod.eager_attention_forward = gpt_oss_eager
        try:
            model.set_attn_implementation("eager")
            with torch.no_grad():
                other = model(input_ids=ids, use_cache=False).logits
        finally:
            mod.eager_attention_forward = own
        assert torch.allclose(other, plain, atol=1e-5, rtol=0)


def test_rows_without_the_sink_would_differ():
    """The check above can fail: the same rows without the sinks are far from eager's."""
    model = sink_model("gpt_oss")
    ids = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    ref = reference_rows(model, ids)
    got, _ = probe(model, ids)
    assert torch.allclose(got[1], ref[1], atol=TOL, rtol=0)
    q = torch.randn(1, 4, 5, 16)
    k = torch.randn(1, 2, 5, 16)
    sinks = torch.tensor([0.0, 1.0, -1.0, 3.0])
    with_sink = attention_rows(q, k, None, None, sinks=sinks)  # (1, 4, 1, 5)
    plain = attention_rows(q, k, None, None)
    # by hand: the sink is one more logit in the denominator
    assert torch.allclose(with_sink, plain / (1 + torch.exp(sinks.view(1, 4, 1, 1) - torch.logsumexp(
        (q[:, :, -1:] @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 4, -1, keepdim=True))), atol=1e-6)


def test_an_unknown_attention_keyword_is_refused(monkeypatch):
    """A keyword the probe does not read (here a position bias) stops the pass with one line naming the
    family and the keyword, instead of being dropped."""
    from transformers.models.llama import modeling_llama

    model = familymatrix.tiny_config("llama")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(model).eval()
    real = modeling_llama.LlamaAttention.forward

    def forward(self, *args, **kwargs):
        kwargs["position_bias"] = torch.zeros(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
    ids = torch.randint(3, 256, (1, 12))
    with pytest.raises(UserError, match=r"^llama: its attention passes position_bias=, which the probe does not read"):
        probe(model, ids)


def test_attention_layers_from_configs():
    from transformers import (
        JambaConfig,
        NemotronHConfig,
        Qwen3NextConfig,
        RecurrentGemmaConfig,
    )

    assert attention_layers(JambaConfig(num_hidden_layers=8, attn_layer_period=4, attn_layer_offset=2)) == [2, 6]
    assert attention_layers(Qwen3NextConfig(num_hidden_layers=4)) == [3]
    assert attention_layers(RecurrentGemmaConfig(num_hidden_layers=6)) == [2, 5]
    assert attention_layers(NemotronHConfig(layers_block_type=["mamba", "moe", "attention", "mlp"])) == [2]
    assert attention_layers(familymatrix.tiny_config("llama")) is None


def tiny_hybrid(family: str):
    """A 4-layer jamba or qwen3_next with SmolLM2's tokenizer: attention on layers 1 and 3 only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrieval_heads.models import LoadedModel, smollm2_path

    cfg = familymatrix.tiny_config(family)
    cfg.vocab_size, cfg.num_hidden_layers = 49152, 4
    if family == "jamba":
        cfg.attn_layer_period, cfg.attn_layer_offset = 2, 1
    else:
        cfg.layer_types = ["linear_attention", "full_attention"] * 2
    cfg.max_position_embeddings = 1024
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    return LoadedModel(AutoModelForCausalLM.from_config(cfg).float().eval(), tok, family, family)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["jamba", "qwen3_next"])
def test_hybrid_results_hold_the_attention_layers_only(family):
    from retrieval_heads.experiments import detect
    from retrieval_heads.results import parse_head, validate

    lm = tiny_hybrid(family)
    det = detect(lm, question="inc_state", tokens=200, samples=1)
    record = det.record
    validate(record)
    assert record["attention_layers"] == [1, 3]
    layers = {parse_head(r["head"])[0] for r in record["head_rankings"]}
    assert len(record["head_rankings"]) == 2 * record["num_heads"] and layers == {1, 3}
    assert all(x == 0 for layer in (0, 2) for x in record["scores"][layer])
    assert any(x > 0 for x in record["scores"][1])
    assert {parse_head(h)[0] for h, _ in det.top(8)} == {1, 3}
    from retrieval_heads.results import _checksum

    for layers in ([1, 2], [0, 1, 2, 3], [3, 1]):  # another set, every layer, out of order: resealed, still refused
        bad = dict(record, attention_layers=layers)
        bad["checksum"] = _checksum(bad)
        with pytest.raises(UserError, match="attention_layers is not|attention layers"):
            validate(bad)
    if family == "jamba":
        return
    # the rest of the pipeline on qwen3_next: heatmap rows, exports, ablation draws, bootstrap ranks
    import numpy as np

    from retrieval_heads.ablation import ablate
    from retrieval_heads.export import kv_view
    from retrieval_heads.report.collect import Experiment
    from retrieval_heads.report.figures import heatmap
    from retrieval_heads.report.stability import bootstrap_ranks

    assert kv_view(record)["attention_layers"] == [1, 3]
    assert heatmap(Experiment(record, Path("x.json"), "x.json")).startswith(b"\x89PNG")
    abl = ablate(record, model=lm, ks=(0, 4), random_seeds=2, max_new_tokens=2)
    drawn = [h for r in abl.record["random"] for h in r["heads"]] + abl.record["top"][1]["heads"]
    assert len(drawn) == 12 and {parse_head(h)[0] for h in drawn} == {1, 3}
    with pytest.raises(UserError, match="outside 0..8"):
        ablate(record, model=lm, ks=(9,), random_seeds=0)
    per_sample = np.random.default_rng(0).normal(size=(3, 4, 4))  # (S, L, H), negative scores too
    ranks = bootstrap_ranks(per_sample, 20, 0, [1, 3]).reshape(20, 4, 4)  # (B, L, H)
    assert ranks[:, [1, 3]].max() == 8 and ranks[:, [0, 2]].min() == 9


def test_family_status_file_lists_every_family():
    """A family that a new transformers release adds is missing from the status file: listed here, never
    a silent pass. (The statuses themselves are checked by test_family_matrix.)"""
    status = json.loads(STATUS.read_text())
    missing = sorted(set(familymatrix.families()) - set(status))
    assert not missing, f"untested families (run bench/families.py): {missing}"


@pytest.mark.slow
def test_family_matrix():
    """Every causal-LM family: exact (rows within 1e-5 of eager, logits within 1e-5 of the plain model's)
    or refused with one line, as recorded in tests/family_status.json; none differs or raises."""
    status = json.loads(STATUS.read_text())
    got = familymatrix.run_all()
    bad = {f: r for f, r in got.items() if r["status"] in ("differs", "error")}
    assert not bad, bad
    changed = {f: (status.get(f, {}).get("status", "untested"), r["status"], r["why"]) for f, r in got.items()
               if status.get(f, {}).get("status") != r["status"] or status[f].get("why") != r["why"]}
    assert not changed, changed


def eager_model(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(familymatrix.tiny_config(family)).float().eval()


@pytest.mark.parametrize("family", ["bloom", "gpt_neo"])
def test_eager_attentions_rows_equal_the_models_own_and_outputs_unchanged(family):
    """--eager-attentions: a family without the attention interface is refused with a line naming the flag;
    with it, its rows are its own eager matrices' rows (as output_attentions returns them, with no probe),
    the logits are unchanged and heads cannot be removed."""
    from retrieval_heads import eager_rows

    model = eager_model(family)
    ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([-1, -7, 2])
    with pytest.raises(UserError, match=r"does not use transformers' attention interface; .* --eager-attentions"):
        probe(model, ids)
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
        ref = model(input_ids=ids, use_cache=False, output_attentions=True).attentions  # L x (B, H, N, N)
    eager_rows.enable(model)
    got, probed = probe(model, ids, positions)
    assert torch.equal(probed, plain)
    assert sorted(got) == [0, 1]
    for layer, r in enumerate(ref):
        assert torch.allclose(got[layer], r[:, :, positions % 20, :].float(), atol=TOL, rtol=0)
    assert model.config.output_attentions is False  # restored after the block
    with pytest.raises(UserError, match="heads cannot be removed with --eager-attentions"), \
            attention_probe(model, None, ablate={0: [1]}):
        pass


@pytest.mark.slow
def test_detect_with_eager_attentions_on_bloom(tmp_path):
    """detect --eager-attentions scores a tiny bloom end to end (the shared prefill and the answers too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrieval_heads.experiments import detect
    from retrieval_heads.models import LoadedModel, smollm2_path

    cfg = familymatrix.tiny_config("bloom")
    cfg.vocab_size = 49152
    torch.manual_seed(0)
    lm = LoadedModel(AutoModelForCausalLM.from_config(cfg).eval(), AutoTokenizer.from_pretrained(smollm2_path()),
                     "bloom", "bloom")
    with pytest.raises(UserError, match="--eager-attentions"):
        detect(lm, question="inc_state", tokens=200, samples=1)
    det = detect(lm, question="inc_state", tokens=200, samples=1, method="summed_attention,query_focused",
                 eager_attentions=True)
    for res in det.values():
        assert len(res.record["head_rankings"]) == 2 * 4 and "attention_layers" not in res.record
        assert torch.isfinite(res.scores).all()


@pytest.mark.slow
def test_sweep_with_eager_attentions_on_bloom(tmp_path):
    """A sweep's grid takes eager_attentions (typed strictly); with it a bloom folder is swept, without it
    the sweep stops with the line naming the flag."""
    import shutil

    from retrieval_heads.models import smollm2_path
    from retrieval_heads.sweep import make_grid, run_sweep

    with pytest.raises(UserError, match='eager_attentions: expected true or false, got "false"'):
        make_grid(models=["smollm2"], eager_attentions="false")
    d = tmp_path / "bloom"
    d.mkdir()
    for f in smollm2_path().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, d / f.name)
    cfg = familymatrix.tiny_config("bloom")
    cfg.vocab_size = 49152
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    settings = dict(models=[str(d)], questions=["inc_state"], tokens=[200], samples=1)
    with pytest.raises(UserError, match="--eager-attentions"):
        run_sweep(make_grid(**settings), tmp_path / "plain", progress=False, echo=lambda s: None)
    run_sweep(make_grid(**settings, eager_attentions=True), tmp_path / "out", progress=False, echo=lambda s: None)
    written = sorted(p.name for p in (tmp_path / "out").rglob("*.json"))
    assert any(name.endswith("_inc_state_200.json") for name in written), written
