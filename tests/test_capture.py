"""The probe against the eager reference (full N x N matrices), family by family, on tiny random models."""

import pytest
import torch

from conftest import FAMILIES, tiny_model
from retrieval_heads.capture import attention_probe, attention_rows, reference_rows
from retrieval_heads.methods.base import needle_mass

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


def test_probe_leaves_model_output_unchanged():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
        with attention_probe(model, lambda layer, p: None):
            probed = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(plain, probed)
    assert model.config._attn_implementation == "sdpa"  # restored afterwards


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
