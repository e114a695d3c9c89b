"""The ablation's controls and statistics: the layer-matched draw, the paired test (against scipy and an
enumeration of every sign pattern), the per-k spread over draws, Holm over k, and the conclusion."""

import itertools

import numpy as np
import pytest
import torch

from retrieval_heads.ablation_stats import conclusion, matched_heads, paired_lower, random_heads, summary, top_heads
from retrieval_heads.ablation_stats import paired_tests
from retrieval_heads.errors import UserError
from retrieval_heads.results import make_record, parse_head


def record(scores):
    return make_record(method="summed_attention", model_key="tiny", model_name="tiny", question="inc_state",
                       question_prompt="q", total_tokens=32, needle_position=0.5, scores=scores,
                       samples_processed=4, seed=0, dtype="float32")


def layer_counts(heads):
    out = {}
    for h in heads:
        out[parse_head(h)[0]] = out.get(parse_head(h)[0], 0) + 1
    return out


def test_matched_draw_keeps_layers_avoids_top_and_repeats_by_seed():
    rec = record(torch.rand(6, 8, generator=torch.Generator().manual_seed(1)))
    for k in (1, 3, 8, 12):
        top = top_heads(rec, k)
        draws = [matched_heads(rec, k, s) for s in range(6)]
        for heads, borrowed in draws:
            assert borrowed == 0 and len(set(heads)) == k and not set(heads) & set(top)
            assert layer_counts(heads) == layer_counts(top)  # the same number of heads in every layer
        assert draws[2] == matched_heads(rec, k, 2)  # the same draw for the same seed
        assert len({tuple(h) for h, _ in draws}) > 1  # seeds differ
    assert matched_heads(rec, 3, 0)[0] != random_heads(rec, 3, 0)  # not the unmatched draw


def test_matched_draw_borrows_from_the_nearest_layer_and_counts_it():
    """Layer 1 holds 3 of the top 4 and has 4 heads: 1 free head, so two come from layers 0 and 2 (nearest,
    lower first on a tie), and the draw says 2 were borrowed."""
    scores = torch.zeros(4, 4)
    scores[1, :3] = torch.tensor([9.0, 8.0, 7.0])
    scores[3, 0] = 6.0
    rec = record(scores)
    assert sorted(top_heads(rec, 4), key=parse_head) == ["L1H0", "L1H1", "L1H2", "L3H0"]
    for seed in range(5):
        heads, borrowed = matched_heads(rec, 4, seed)
        assert borrowed == 2
        counts = layer_counts(heads)
        assert counts[1] == 1 and counts[3] == 1 and counts.get(0, 0) + counts.get(2, 0) == 2
        assert "L1H3" in heads and not set(heads) & set(top_heads(rec, 4))
    with pytest.raises(UserError, match="outside the top 9"):
        matched_heads(rec, 9, 0)


def brute_force_p(d):
    """P(W+ >= observed) under the null, by enumerating every sign pattern of the non-zero |d|."""
    d = np.asarray([x for x in d if x != 0])
    ranks = np.argsort(np.argsort(np.abs(d))) + 1.0
    observed = ranks[d > 0].sum()
    hits = sum(sum(r for r, s in zip(ranks, signs) if s) >= observed
               for signs in itertools.product([0, 1], repeat=len(d)))
    return hits / 2 ** len(d)


def test_paired_test_equals_scipy_and_the_enumeration():
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(3)
    top = rng.normal(-5, 1, 10)
    control = rng.normal(-4, 1, (10, 5))
    got = paired_lower(control, top)
    mean = control.mean(1)
    assert got["p"] == pytest.approx(wilcoxon(top, mean, alternative="less", method="exact").pvalue, rel=1e-12)
    assert got["p"] == pytest.approx(brute_force_p(mean - top), rel=1e-12)
    assert got["n_lower"] == int((top < mean).sum()) and got["n"] == got["n_nonzero"] == 10
    # every sample lower: p = 2^-n exactly
    assert paired_lower([[0.0]] * 6, [-1.0, -2, -3, -4, -5, -6])["p"] == pytest.approx(2 ** -6)


def fake(k, values, heads=()):
    return {"k": k, "heads": list(heads), "accuracy": float(np.mean([v > -3 for v in values])),
            "logprob": float(np.mean(values)), "leadin_logprob": float(np.mean(values)) + 1,
            "samples": [{"logprob": v, "leadin_logprob": v + 1, "correct": v > -3} for v in values]}


def test_summary_tests_and_conclusion_by_hand():
    """6 samples, k = 0, 2, 4; 3 matched draws. At k = 2 top is lower on every sample (p = 1/64 each, Holm
    over 2 ks: 2/64); at k = 4 on none (p = 1)."""
    base = [-1.0, -2.0, -1.5, -1.0, -2.5, -1.2]
    top = [fake(0, base), fake(2, [v - 3 - 0.1 * i for i, v in enumerate(base)]), fake(4, [v + 1 for v in base])]
    matched = [fake(0, base)] * 3 + [fake(2, [v - d for v in base]) for d in (0.5, 1.0, 0.2)] + \
              [fake(4, [v - d for v in base]) for d in (0.1, 0.3, 0.2)]
    for i, m in enumerate(matched):
        m["seed"] = i % 3
    rows = summary([0, 2, 4], top, {"matched": matched})
    assert rows[1]["matched_logprob_min"] == pytest.approx(np.mean(base) - 1.0)
    assert rows[1]["matched_logprob_median"] == pytest.approx(np.mean(base) - 0.5)
    assert rows[1]["matched_logprob_max"] == pytest.approx(np.mean(base) - 0.2)
    assert rows[1]["top_logprob"] == pytest.approx(np.mean(base) - 3.25)
    t = [r for r in paired_tests([0, 2, 4], top, {"matched": matched}) if r["metric"] == "logprob"]
    assert [r["k"] for r in t] == [2, 4]
    assert t[0]["p"] == pytest.approx(1 / 64) and t[0]["p_holm"] == pytest.approx(2 / 64)
    assert t[0]["n_lower"] == 6 and t[1]["n_lower"] == 0 and t[1]["p_holm"] > 0.9
    line = conclusion({"tests": t, "controls": ["matched"], "draws": 3})
    assert line.startswith("causal at k = 2 (p 0.031, 6/6 samples lower)") and "not at k = 4" in line
    assert "layer-matched" in line and "\n" not in line
    none = conclusion({"tests": [dict(r, p_holm=0.5) for r in t], "controls": ["matched"], "draws": 3})
    assert none.startswith("not shown")
    assert conclusion({"tests": [], "controls": [], "draws": 0}).startswith("no test: no control was drawn")
