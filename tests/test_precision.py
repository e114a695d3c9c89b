"""Half precision: a bfloat16 run ranks heads like float32; a float16 overflow is a clear error, not NaN scores.

The bf16 thresholds come from measurement on SmolLM2 (384 tokens, 2 samples, this suite's settings):
Spearman over all 270 heads 0.9998, top-10 overlap 10 of 10, largest per-sample difference 0.011 (single
samples at 512 tokens: Spearman 0.9996-0.9998, overlap 9-10, difference <= 0.019). The tests allow
Spearman >= 0.995, overlap >= 8 and difference <= 0.05: loose enough for other CPUs' bf16 kernels, tight
enough that a probe computing its softmax in bf16, or reading the wrong rows, fails them.
"""

import pytest
import scipy.stats
import torch

from retrieval_heads import detect
from retrieval_heads.capture import attention_probe
from retrieval_heads.errors import NumericalError
from retrieval_heads.methods.base import needle_mass
from retrieval_heads.models import LoadedModel, load_model

TOKENS, SAMPLES = 384, 2


@pytest.fixture(scope="module")
def smollm2_bf16():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return load_model("smollm2", dtype="bfloat16")


@pytest.fixture(scope="module")
def runs(smollm2, smollm2_bf16):
    f32 = detect(smollm2, question="inc_state", tokens=TOKENS, samples=SAMPLES)
    bf16 = detect(smollm2_bf16, question="inc_state", tokens=TOKENS, samples=SAMPLES)
    return f32, bf16


def top(scores: torch.Tensor, k: int) -> set[int]:
    return set(scores.flatten().argsort(descending=True)[:k].tolist())


def test_bf16_ranking_agrees_with_float32(runs):
    f32, bf16 = runs
    assert bf16.record["dtype"] == "bfloat16" and f32.record["dtype"] == "float32"
    assert len(top(f32.scores, 10) & top(bf16.scores, 10)) >= 8
    rho = scipy.stats.spearmanr(f32.scores.flatten().numpy(), bf16.scores.flatten().numpy()).statistic
    assert rho >= 0.995
    assert (f32.sample_scores - bf16.sample_scores).abs().max() <= 0.05
    assert f32.top(1)[0][0] == bf16.top(1)[0][0]  # the same strongest head


def test_normal_runs_finite_masses_in_unit_interval(runs):
    for res in runs:
        s = res.sample_scores  # (S, L, H): one needle mass per sample and head
        assert s.dtype == torch.float32 and s.shape == (SAMPLES, 30, 9)
        assert torch.isfinite(s).all()
        assert s.min() >= 0 and s.max() <= 1 + 1e-6
        assert s.max() > 0.05  # not all zeros: some head does read the needle
        assert torch.allclose(res.scores, s.sum(0))


def test_bf16_probe_softmax_runs_in_float32(smollm2_bf16):
    seen = []
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), attention_probe(smollm2_bf16.model, lambda layer, p: seen.append((p.dtype, p.sum(-1)))):
        smollm2_bf16.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    assert len(seen) == 30
    for dtype, total in seen:  # total: (B, H, S), each row sums to 1 to float32 precision
        assert dtype == torch.float32
        assert torch.allclose(total, torch.ones_like(total), atol=1e-5)


def overflowing_model(tokenizer, dtype):
    """A tiny Llama over SmolLM2's vocabulary whose layer 1 query projection is scaled up a million-fold:
    its outputs reach ~1e5, beyond float16's 65504, but are ordinary numbers in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(1e6)
    return model.to(dtype)


def q_proj_peak(model, ids) -> float:
    """The largest |value| layer 1's query projection produces (inf once float16 overflows)."""
    peak = []
    hook = model.model.layers[1].self_attn.q_proj.register_forward_hook(
        lambda mod, inp, out: peak.append(out.float().abs().max().item()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    hook.remove()
    return peak[0]


def test_float16_overflow_is_a_clear_error_naming_the_layer(smollm2, tmp_path):
    tok = smollm2.tokenizer
    fp16 = LoadedModel(overflowing_model(tok, torch.float16), tok, "tiny-overflow", "tiny-overflow")
    fp32 = LoadedModel(overflowing_model(tok, torch.float32), tok, "tiny-overflow", "tiny-overflow")
    ids = torch.randint(0, len(tok), (1, 64), generator=torch.Generator().manual_seed(0))
    key_mask = torch.zeros(1, 64)
    key_mask[:, 20:30] = 1

    # the construction really overflows in float16, and only there
    assert q_proj_peak(fp16.model, ids) == float("inf")
    assert 65504 < q_proj_peak(fp32.model, ids) < float("inf")
    mass = needle_mass(fp32.model, ids, key_mask)  # (1, L, H, 1)
    assert torch.isfinite(mass).all()

    with pytest.raises(NumericalError, match=r"layer 1\b"):
        needle_mass(fp16.model, ids, key_mask)
    out = tmp_path / "out"
    with pytest.raises(NumericalError, match=r"layer 1\b"):
        detect(fp16, question="inc_state", tokens=TOKENS, samples=1, output_dir=out, save_samples=True)
    assert not out.exists() or not any(out.rglob("*"))  # no result file, no samples file
