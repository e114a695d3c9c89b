"""The probe against the eager reference (full N x N matrices), family by family, on tiny random models."""

import threading

import pytest
import torch

import retrieval_heads.capture as capture
from conftest import FAMILIES, tiny_config, tiny_model
from reference import eager_attention, reference_rows
from retrieval_heads.capture import PROBE, attention_probe, attention_rows, prepare
from retrieval_heads.errors import UserError
from retrieval_heads.methods.base import needle_mass
from reference import shared_needle_mass

TOL = 1e-5


def probe_rows(model, ids, positions=None):
    got = {}
    with torch.no_grad(), attention_probe(model, lambda layer, p: got.__setitem__(layer, p.clone()),
                                          query_positions=positions):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return [got[i] for i in range(len(got))]


@pytest.mark.parametrize("family", FAMILIES)
def test_probe_equals_reference(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([-1, -7, 5])  # the last row, a row inside the window, an early row
    got = probe_rows(model, ids, positions)
    ref = reference_rows(model, ids, positions)
    assert len(got) == len(ref) == 3
    for layer, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape == (2, 4, 3, 48)
        assert torch.allclose(g, r, atol=TOL, rtol=0), f"{family} layer {layer}: {(g - r).abs().max():.2e}"
        assert torch.allclose(g.sum(-1), torch.ones(2, 4, 3), atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_is_applied(family):
    """Rows of windowed layers put zero mass beyond the window (the mask reached the probe)."""
    model = tiny_model(family)
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(2))
    got = probe_rows(model, ids)
    layer0 = got[0][0, :, 0, :]  # (H, K) of layer 0, a sliding layer in both configs
    assert torch.all(layer0[:, : 48 - 16] == 0)
    assert torch.all(layer0[:, 48 - 16 :] > 0)
    if family == "gemma2":  # layer 1 is a full-attention layer
        assert torch.all(got[1][0, :, 0, :] > 0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_probe_leaves_model_output_unchanged(family):
    """The probe's function gives the model's own logits bit for bit, with a probe active or not; the model
    stays switched to it after the block (its presence is a property of the model)."""
    model = tiny_model(family)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
        with attention_probe(model, lambda layer, p: None):
            probed = model(input_ids=ids, use_cache=False).logits
        assert model.config._attn_implementation == PROBE  # not switched back
        idle = model(input_ids=ids, use_cache=False).logits  # the probe's function, no probe active
    assert torch.equal(plain, probed)
    assert torch.equal(plain, idle)


def test_prepare_is_idempotent_and_eager_restores_the_probe():
    model = tiny_model("llama")
    assert model.config._attn_implementation == "sdpa"
    prepare(model)
    prepare(model)
    capture.install()
    assert model.config._attn_implementation == PROBE
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(7))
    ref = reference_rows(model, ids)
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == PROBE
    got = probe_rows(model, ids)
    assert all(torch.allclose(g, r, atol=TOL, rtol=0) for g, r in zip(got, ref))


def test_two_threads_probing_one_model_equal_one_after_the_other():
    """Each thread's probe sees exactly its own passes: the same scores as running the jobs sequentially.
    (When the probe switched the model on entry and back on exit, one thread's exit made the other's
    remaining layers run unprobed, and their scores came out 0.)"""
    model = tiny_model("llama")  # not prepared yet: both threads prepare it on first use
    gen = torch.Generator().manual_seed(8)
    jobs = []
    for t in range(2):
        ids = torch.randint(0, 128, (2, 64 + 16 * t), generator=gen)  # (B, N), a different length per thread
        mask = (torch.rand(ids.shape, generator=gen) < 0.3).float()  # (B, N)
        jobs.append((ids, mask))
    expect = [needle_mass(model, ids, mask) for ids, mask in jobs]
    reps = 40
    got: list[list] = [[], []]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(t):
        try:
            start.wait()
            for _ in range(reps):
                got[t].append(needle_mass(model, *jobs[t]))
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    for t in range(2):
        assert len(got[t]) == reps
        for g in got[t]:
            assert torch.allclose(g, expect[t], atol=1e-6, rtol=0)
    assert model.config._attn_implementation == PROBE


def test_nested_probes_are_a_clear_error():
    model = tiny_model("llama")
    with attention_probe(model, None):
        with pytest.raises(RuntimeError, match="nested probes are not supported"):
            with attention_probe(model, None):
                pass
    with attention_probe(model, None):  # the outer block still works after the refused inner one
        pass


def test_layer_without_an_index_is_refused():
    model = tiny_model("llama")
    model.model.layers[1].self_attn.layer_idx = None
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(9))
    with pytest.raises(UserError, match=r"^LlamaAttention has no layer index in 0\.\.2 \(layer_idx=None\)") as e:
        needle_mass(model, ids, torch.ones(1, 16))
    assert "\n" not in str(e.value)


def _bypass(layer_module):
    """A layer whose attention never reaches the attention interface (as a custom module might)."""
    layer_module.self_attn.forward = lambda hidden_states, *args, **kwargs: (torch.zeros_like(hidden_states), None)


def test_a_silent_layer_fails_loudly():
    """A layer that never reports would have scored 0; now the pass is refused, naming the layer."""
    model = tiny_model("llama")
    _bypass(model.model.layers[1])
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(10))
    mask = torch.zeros(2, 40)
    mask[:, 5:15] = 1
    with pytest.raises(UserError, match=r"LlamaForCausalLM each attention layer must reach the probe once: layer 1 0 times;"):
        needle_mass(model, ids, mask)
    with pytest.raises(UserError, match="layer 1 0 times"):
        shared_needle_mass(model, ids[:, :32], [ids[:, 32:36], ids[:, 32:40]], mask[:, :32])
    with pytest.raises(UserError, match="layer 1 0 times"):
        probe_rows_checked(model, ids)


def test_a_layer_reporting_twice_fails_loudly():
    model = tiny_model("qwen2")
    model.model.layers[2].self_attn.layer_idx = 1  # layer 1 reports twice, layer 2 never
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(11))
    with pytest.raises(UserError, match="layer 1 2 times, layer 2 0 times"):
        needle_mass(model, ids, torch.ones(1, 24))


def probe_rows_checked(model, ids):
    with torch.no_grad(), attention_probe(model, lambda layer, p: None) as probe:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        probe.end_pass(model)


def test_soft_cap_that_binds_is_applied(monkeypatch):
    """Gemma2 with q/k scaled up so that the logits reach far beyond the cap: the probe's rows equal the eager
    reference and differ clearly from the same rows computed without the cap (the cap really binds, so a
    probe that ignored it would fail the first check)."""
    import transformers as t

    torch.manual_seed(0)
    cfg = tiny_config("gemma2")
    cfg.attn_logit_softcapping = 2.0
    model = t.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    uncapped = {}
    real_rows = capture.attention_rows

    def both(query, key, mask, scaling, softcap=None, positions=None, *rest):
        assert softcap == 2.0
        uncapped[len(uncapped)] = real_rows(query, key, mask, scaling, None, positions, *rest)
        return real_rows(query, key, mask, scaling, softcap, positions, *rest)

    monkeypatch.setattr(capture, "attention_rows", both)
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(12))
    positions = torch.tensor([-1, -7, 5])
    got = probe_rows(model, ids, positions)
    ref = reference_rows(model, ids, positions)
    assert len(got) == len(ref) == len(uncapped) == 3
    for layer in range(3):
        assert torch.allclose(got[layer], ref[layer], atol=TOL, rtol=0), f"layer {layer}: {(got[layer] - ref[layer]).abs().max():.2e}"
        gap = (uncapped[layer] - ref[layer]).abs().max()
        assert gap > 0.1, f"layer {layer}: the cap does not bind (gap {gap:.2e})"


def test_attention_rows_by_hand():
    """A 1-layer hand check of GQA head mapping, scaling, softcap and the causal mask."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 5, 8, generator=g)  # (B, H, Q, d)
    k = torch.randn(1, 2, 5, 8, generator=g)  # (B, Hkv, K, d)
    rows = attention_rows(q, k, None, scaling=0.3, softcap=2.0, positions=torch.tensor([-1, 1]))
    for h in range(4):
        for s, p in enumerate([4, 1]):
            logits = (k[0, h // 2, : p + 1] @ q[0, h, p]) * 0.3
            logits = torch.tanh(logits / 2.0) * 2.0
            expect = torch.zeros(5)
            expect[: p + 1] = torch.softmax(logits, -1)
            assert torch.allclose(rows[0, h, s], expect, atol=1e-6)


def test_batched_mass_equals_single():
    model = tiny_model("qwen2")
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(3, 40)
    mask[0, 5:9], mask[1, 20:30], mask[2, 0:3] = 1, 1, 1
    batched = needle_mass(model, ids, mask)
    single = torch.cat([needle_mass(model, ids[i : i + 1], mask[i : i + 1]) for i in range(3)])
    assert batched.shape == (3, 3, 4, 1)
    assert torch.allclose(batched, single, atol=1e-6)


def test_ablation_changes_only_that_heads_contribution():
    """Zeroing head (1, 2) changes layer 1's attention output exactly by that head's slice."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(6))
    captured = {}
    o_proj = model.model.layers[1].self_attn.o_proj
    hook = o_proj.register_forward_hook(lambda m, inp, out: captured.__setitem__("x", inp[0].clone()))
    try:
        with torch.no_grad():
            with attention_probe(model, None):
                model(input_ids=ids, use_cache=False)
            full = captured["x"].view(1, 24, 4, 16)
            with attention_probe(model, None, ablate={1: [2]}):
                model(input_ids=ids, use_cache=False)
            ablated = captured["x"].view(1, 24, 4, 16)
    finally:
        hook.remove()
    assert torch.all(ablated[:, :, 2] == 0)
    assert torch.equal(ablated[:, :, [0, 1, 3]], full[:, :, [0, 1, 3]])
    assert full[:, :, 2].abs().sum() > 0
