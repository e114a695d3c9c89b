"""The statistics module against hand-computed values: lift, the signed-rank test, BH and Holm, the verdict."""

import numpy as np
import pytest

from retrieval_heads import stats


def test_lift_is_score_over_baseline_and_zero_out_of_sight():
    got = stats.lift(np.array([[0.5, 0.0], [0.2, 0.3]]), np.array([[0.1, 0.0], [0.2, 0.05]]))
    np.testing.assert_allclose(got, [[5.0, 0.0], [1.0, 6.0]])


@pytest.mark.parametrize("diffs, p, n", [
    ([3, -1, 2, 4], 2 / 16, 4),       # W+ = 2+3+4 = 9 of 10: {1,2,3,4}, {2,3,4} -> 2 of 16 sign patterns
    ([5, 4, 3, 2, -1], 2 / 32, 5),    # W+ = 14 of 15: 2 of 32
    ([0, 1, 2], 1 / 4, 2),            # the zero is dropped: W+ = 3 of 3 over 2 differences
    ([1, 2, 3, 4, 5, 6], 1 / 64, 6),  # all positive: the smallest p for 6 samples
    ([-1, -2, -3], 1.0, 3),           # all negative: W+ = 0, P(W+ >= 0) = 1
    ([0, 0, 0], 1.0, 0),              # nothing left to test
    ([1e-7, 2e-7, 3e-7], 1.0, 0),     # float32 noise counts as zero
])
def test_signed_rank_by_hand(diffs, p, n):
    d = np.array(diffs, dtype=np.float64)[:, None]
    got_p, used = stats.signed_rank_greater(1.0 + d, np.ones_like(d))
    assert got_p[0] == pytest.approx(p, abs=1e-12) and used[0] == n


def test_corrections_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.2])
    # BH: sorted 0.01, 0.03, 0.04, 0.2 -> x 4/1, 4/2, 4/3, 4/4 = 0.04, 0.06, 0.0533, 0.2 -> running min from the top
    np.testing.assert_allclose(stats.benjamini_hochberg(p), [0.04, 0.16 / 3, 0.16 / 3, 0.2])
    # Holm: x 4, 3, 2, 1 = 0.04, 0.09, 0.08, 0.2 -> running max
    np.testing.assert_allclose(stats.holm(p), [0.04, 0.09, 0.09, 0.2])
    np.testing.assert_allclose(stats.benjamini_hochberg(np.array([0.5, 0.9])), [0.9, 0.9])
    assert stats.min_attainable_p(4) == 1 / 16 and stats.min_attainable_p(0) == 1.0


def test_significance_lists_heads_and_says_when_samples_are_too_few():
    rng = np.random.default_rng(0)
    S, L, H = 6, 2, 3
    control = rng.uniform(0.5, 1.5, (S, L, H))
    target = control.copy()
    target[:, 1, 2] += np.arange(1, S + 1)  # one head above its control in every sample
    got = stats.significance(target, control, alpha=0.05)
    # p = 1/64 for that head, 1 for the others; BH over 6 heads: 6/64 = 0.09375 > 0.05 -> none significant
    assert got["heads"] == [] and got["p_adjusted"][1][2] == pytest.approx(6 / 64)
    assert got["note"].startswith("no head beats the control at alpha 0.05")
    got = stats.significance(target, control, alpha=0.1)
    assert [h["head"] for h in got["heads"]] == ["L1H2"] and got["heads"][0]["p"] == pytest.approx(1 / 64)
    assert got["note"] == "" and got["min_attainable_p"] == pytest.approx(1 / 64)
    few = stats.significance(target[:4], control[:4], alpha=0.05)
    assert few["heads"] == [] and few["min_attainable_p"] == 1 / 16
    assert few["note"].startswith("too few samples: with 4 sample(s) the smallest attainable one-sided p is 1/16")
    assert few["test"].startswith("Wilcoxon signed-rank") and few["correction"].startswith("Benjamini-Hochberg")



def test_a_tiny_alpha_names_the_samples_it_needs():
    """An alpha so small that 1 / alpha overflows (any alpha in (0, 1) is accepted) still gives the note."""
    got = stats.significance(np.ones((3, 1, 2)), np.zeros((3, 1, 2)), alpha=1e-320)
    assert got["heads"] == [] and "use at least 1064 samples" in got["note"]  # 2 ** -1063 > 1e-320

def test_verdict_lines():
    assert stats.verdict(7, 0.05, 8, 8.14, "L12H3", 5, 8) == \
        "7 heads beat the control at alpha 0.05; top lift 8.1x (L12H3); accuracy 5/8"
    assert stats.verdict(1, 0.05, 8, 3.0, "L1H1") == "1 head beats the control at alpha 0.05; top lift 3.0x (L1H1)"
    assert stats.verdict(6, 0.05, 16, 1.07, "L0H4", 4, 16) == (
        "6 heads beat the control at alpha 0.05; top lift 1.1x (L0H4); accuracy 4/16: they favour the span over the "
        "control but stay near chance (top lift under 2x)")
    assert stats.verdict(1, 0.05, 16, 1.94, "L0H4") == (
        "1 head beats the control at alpha 0.05; top lift 1.9x (L0H4): it favours the span over the control but "
        "stays near chance (top lift under 2x)")
    assert stats.verdict(1, 0.05, 16, 1.96, "L0H4") == "1 head beats the control at alpha 0.05; top lift 2.0x (L0H4)"
    assert stats.verdict(0, 0.05, 16, 1.96, "L0H4") == "no head beats the control on these 16 samples; top lift 2.0x (L0H4)"
    assert stats.verdict(0, 0.05, 4, 1.3, "L0H4", 1, 8, too_few=True) == (
        "no head beats the control on these 4 samples (too few samples for alpha 0.05); top lift 1.3x (L0H4); "
        "accuracy 1/8: the model may not be retrieving at this length")


def test_significance_with_no_sample_left():
    got = stats.significance(np.zeros((0, 2, 3)), np.zeros((0, 2, 3)))
    assert got["heads"] == [] and got["samples"] == 0 and got["min_attainable_p"] == 1.0
    assert got["note"].startswith("too few samples: with 0 sample(s)")
    assert got["p_adjusted"] == [[1.0] * 3] * 2


def test_signed_rank_equals_scipy():
    """The numpy test against scipy.stats.wilcoxon (the reference it replaced), column by column: exact
    distributions (1-50 differences), ties and zeros (normal approximation), large samples, ties of zeros."""
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(0)
    cols = []
    for n in (1, 2, 3, 5, 8, 13, 20, 33, 50, 51, 80):
        cols.append(rng.normal(0.3, 1.0, n))
        cols.append(np.round(rng.normal(0.2, 1.0, n), 1))  # tied magnitudes, some zeros
    cols.append(np.array([1.0, -1.0, 2.0, 2.0, -2.0, 3.0]))
    cols.append(np.array([-0.5] * 7))
    for x in cols:
        d = x[:, None]
        got_p, used = stats.signed_rank_greater(1.0 + d, np.ones_like(d))
        kept = stats.paired_differences(1.0 + d, np.ones_like(d))[:, 0]
        kept = kept[kept != 0]
        assert used[0] == kept.size
        if kept.size == 0:
            assert got_p[0] == 1.0
            continue
        ties = np.unique(np.abs(kept)).size < kept.size
        if ties and kept.size <= stats.EXACT_UP_TO:  # exact conditional on the ties, which scipy does not do
            assert got_p[0] >= 2.0 ** -kept.size
            if kept.size <= 13:
                assert got_p[0] == pytest.approx(enumerated_p(kept), rel=1e-12), x
            else:  # too many patterns to enumerate in a test: close to the normal approximation
                want = wilcoxon(kept, alternative="greater", zero_method="wilcox", method="approx").pvalue
                assert abs(got_p[0] - float(want)) < 0.03, x
            continue
        method = "exact" if kept.size <= stats.EXACT_UP_TO else "approx"
        want = wilcoxon(kept, alternative="greater", zero_method="wilcox", method=method).pvalue
        assert got_p[0] == pytest.approx(float(want), rel=1e-9, abs=1e-15), (x, method)


def enumerated_p(d):
    """P(W+ >= observed) by listing all 2**n sign patterns of the average ranks of |d| (ties share their mean
    rank), each equally likely under the null."""
    import itertools
    a = np.abs(d)
    ranks = np.array([np.sum(a < v) + (np.sum(a == v) + 1) / 2 for v in a])  # average ranks, by definition
    observed = ranks[d > 0].sum()
    hits = sum(sum(r for r, s in zip(ranks, signs) if s) >= observed - 1e-9
               for signs in itertools.product([0, 1], repeat=len(d)))
    return hits / 2 ** len(d)


@pytest.mark.parametrize("diffs, p", [
    ([0.5, 0.5, 0.5, 0.5], 1 / 16),  # all tied and positive: one pattern of 16, not the normal tail's 0.0228
    ([1, 1, -2, 3], 5 / 16),         # ranks 1.5 1.5 3 4, W+ = 7: {a,b,4} {a,3,4} {b,3,4} {a,b,3,4} {3,4}
    ([2, 2, 2, -2, 2, 2], 7 / 64),   # all rank 3.5: 5 or 6 positive of 6 -> 6 + 1 patterns
])
def test_signed_rank_with_ties_is_exact(diffs, p):
    d = np.array(diffs, dtype=np.float64)[:, None]
    got_p, used = stats.signed_rank_greater(1.0 + d, np.ones_like(d))
    assert got_p[0] == pytest.approx(p, rel=1e-12) and got_p[0] == pytest.approx(enumerated_p(d[:, 0]), rel=1e-12)


def test_equal_differences_on_four_samples_are_not_significant():
    """Four samples whose differences are all equal: p = 1/16 exactly, so no head passes alpha 0.05 -- in
    agreement with the note that 4 samples are too few."""
    target = np.full((4, 1, 2), 1.5)
    control = np.ones((4, 1, 2))
    got = stats.significance(target, control, alpha=0.05)
    assert got["heads"] == [] and got["note"].startswith("too few samples")
    assert got["p_adjusted"] == [[pytest.approx(1 / 16), pytest.approx(1 / 16)]]
