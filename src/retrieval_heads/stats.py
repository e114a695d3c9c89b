"""Statistics for telling a retrieval head from a diffuse one: lift over chance, a paired test against a control
span, multiple-testing correction, and the one-line verdict. Pure functions on arrays; nothing here runs a model.

- **Lift**: a head's score divided by its chance baseline, the score it would get by spreading its attention
  evenly over the keys its query can see. 1.0 = chance; 8.0 = eight times the needle's share of the keys.
- **Test**: per head, a one-sided Wilcoxon signed-rank test, paired over samples, of the head's per-sample lift
  on the target span against its lift on the control span (:func:`signed_rank_greater`). Differences within
  float32 precision count as zero and are dropped (Wilcoxon's own treatment of zeros); the null distribution
  is exact for up to 50 non-zero differences (with tied magnitudes, the exact distribution conditional on the
  ties: every sign pattern of the observed average ranks), else the normal approximation. An exact p is never
  below 2**-n, the chance of the one sign pattern where all n differences are positive.
- **Correction**: Benjamini-Hochberg over all heads (:func:`benjamini_hochberg`; :func:`holm` is here too).

>>> signed_rank_greater(np.array([[0.3], [0.1], [0.2]]), np.zeros((3, 1)))[0].round(4).tolist()
[0.125]
>>> benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.2])).round(4).tolist()
[0.04, 0.0533, 0.0533, 0.2]
"""

from __future__ import annotations

import math

import numpy as np

TEST = "Wilcoxon signed-rank, one-sided (target > control), paired over samples, on per-sample lifts"
CORRECTION = "Benjamini-Hochberg over all heads"
DEFAULT_ALPHA = 0.05
EXACT_UP_TO = 50  # non-zero differences (tied or not); beyond, the normal approximation
REL_TOL = 1e-5  # |difference| within this share of max(1, |target|, |control|) counts as zero


def lift(score: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """score / baseline elementwise; 0 where the baseline is 0 (the span is out of the query's sight, so the
    score is 0 too)."""
    score, baseline = np.asarray(score, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    out = np.zeros(np.broadcast(score, baseline).shape)
    np.divide(score, baseline, out=out, where=baseline > 0)
    return out


def paired_differences(target: np.ndarray, control: np.ndarray) -> np.ndarray:
    """target - control (S, K), with differences within float32 precision set to exactly 0."""
    t, c = np.asarray(target, dtype=np.float64), np.asarray(control, dtype=np.float64)
    d = t - c
    scale = np.maximum(1.0, np.maximum(np.abs(t), np.abs(c)))
    d[np.abs(d) <= REL_TOL * scale] = 0.0
    return d


def signed_rank_greater(target: np.ndarray, control: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Wilcoxon signed-rank p-values, per column, that target exceeds control.

    target, control (S, K): S paired samples of K heads. Zero differences are dropped (``zero_method="wilcox"``);
    a column with none left gets p = 1. Returns (p (K,), number of non-zero differences (K,)).

    Up to :data:`EXACT_UP_TO` differences the p-value is exact: without tied magnitudes the same as
    ``scipy.stats.wilcoxon(x, alternative="greater", zero_method="wilcox", method="exact")``; with ties, the
    exact distribution conditional on them (the share of the 2**n sign patterns of the observed average ranks
    whose positive-rank sum reaches the observed one; scipy falls back to the normal approximation there, which
    can fall below 2**-n). Beyond, ``method="approx"`` (the normal approximation with the tie correction, no
    continuity correction). Computed here in numpy: importing scipy.stats and calling it once per head took
    longer than a short ``detect`` (tested equal to scipy and to the enumeration of sign patterns).
    """
    d = paired_differences(target, control)  # (S, K)
    S, K = d.shape
    p = np.ones(K)
    used = np.zeros(K, dtype=np.int64)
    for k in range(K):
        x = d[:, k][d[:, k] != 0]
        used[k] = n = x.size
        if n == 0:
            continue
        ranks, tie_sizes = _average_ranks(np.abs(x))
        r_plus = float(ranks[x > 0].sum())
        if n <= EXACT_UP_TO and tie_sizes.size == 0:
            p[k] = _exact_sf(n, math.floor(r_plus))
        elif n <= EXACT_UP_TO:
            p[k] = _exact_tied_sf(ranks, r_plus)
        else:
            var = (n * (n + 1.0) * (2.0 * n + 1.0) - float((tie_sizes**3 - tie_sizes).sum()) / 2) / 24
            z = (r_plus - n * (n + 1.0) * 0.25) / math.sqrt(var)
            p[k] = 0.5 * math.erfc(z / math.sqrt(2.0))  # the standard normal's upper tail at z
    return p, used


def _average_ranks(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks 1..n of ``a`` (ties get their average rank) and the sizes of its groups of ties (> 1), float64."""
    order = np.argsort(a, kind="stable")
    s = a[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each run of equal values
    sizes = np.diff(np.r_[starts, s.size])
    avg = starts + (sizes + 1) / 2.0  # the mean of ranks starts+1 .. starts+sizes
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(avg, sizes)
    return ranks, sizes[sizes > 1].astype(np.float64)


_PMF: dict[int, np.ndarray] = {}


def _exact_sf(n: int, k: int) -> float:
    """P(W+ >= k) for n differences without ties: W+ is the sum of a random subset of the ranks 1..n."""
    if n not in _PMF:
        counts = np.zeros(n * (n + 1) // 2 + 1, dtype=np.int64)  # counts[w]: subsets of 1..i summing to w
        counts[0] = 1
        for i in range(1, n + 1):
            counts[i:] = counts[i:] + counts[:-i].copy()
        _PMF[n] = counts / 2.0**n
    pmf = _PMF[n]
    if k <= n * (n + 1) / 4:  # sum the shorter tail, as scipy does
        return float(pmf[max(k, 0):].sum())
    return float(1.0 - pmf[:k].sum())


def _exact_tied_sf(ranks: np.ndarray, r_plus: float) -> float:
    """P(W+ >= r_plus) over the 2**n equally likely sign patterns of the given (average, so half-integer) ranks:
    the exact null distribution conditional on the ties. Counts sums of doubled ranks, which are integers."""
    twice = np.rint(2.0 * ranks).astype(np.int64)  # (n,)
    counts = np.zeros(int(twice.sum()) + 1, dtype=np.int64)  # counts[w]: sign patterns with 2 * W+ = w
    counts[0] = 1
    for r in twice:
        counts[r:] = counts[r:] + counts[:-r].copy()
    observed = int(round(2.0 * r_plus))
    return float(counts[observed:].sum() / 2.0**twice.size)


def min_attainable_p(n: int) -> float:
    """The smallest one-sided p-value the exact signed-rank test can give with n paired samples: 2**-n (all n
    differences positive); 1.0 with none."""
    return 0.5**n if n > 0 else 1.0


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (step-up; ``q_(i) = min_{j>=i} p_(j) m / j``, at most 1). A head is
    significant at level alpha when its adjusted p is <= alpha (false discovery rate <= alpha)."""
    p = np.asarray(p, dtype=np.float64)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (``max_{j<=i} (m - j + 1) p_(j)``, at most 1): family-wise error."""
    p = np.asarray(p, dtype=np.float64)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (m - np.arange(m))
    out = np.empty(m)
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def significance(target: np.ndarray, control: np.ndarray, alpha: float = DEFAULT_ALPHA) -> dict:
    """The significance block of a result: per head, target vs control over samples, corrected over heads.

    target, control (S, L, H): per-sample values of every head (here: lifts on the target and the control
    span). Returns a JSON-ready dict: ``test``, ``correction``, ``alpha``, ``samples``, ``min_attainable_p``,
    ``heads`` (the significant heads, by adjusted p: head, p, p_adjusted, lift means), ``p_adjusted`` ([L][H])
    and ``note`` (a sentence when too few samples let no head reach alpha, or when none does).
    """
    target, control = np.asarray(target, dtype=np.float64), np.asarray(control, dtype=np.float64)
    S, L, H = target.shape
    p, used = signed_rank_greater(target.reshape(S, L * H), control.reshape(S, L * H))
    q = benjamini_hochberg(p)
    floor = min_attainable_p(S)
    sig = [k for k in np.argsort(q, kind="stable") if q[k] <= alpha]
    t_mean = target.reshape(S, L * H).mean(0) if S else np.zeros(L * H)
    c_mean = control.reshape(S, L * H).mean(0) if S else np.zeros(L * H)
    heads = [{"head": head_label(int(k) // H, int(k) % H), "p": _r(p[k]), "p_adjusted": _r(q[k]),
              "target_mean": _r(t_mean[k]), "control_mean": _r(c_mean[k])} for k in sig]
    if floor > alpha:
        note = (f"too few samples: with {S} sample(s) the smallest attainable one-sided p is "
                f"1/{2 ** S} = {floor:.4g} > alpha {alpha:g}; no head can be significant (use at least "
                f"{max(1, math.ceil(-math.log2(alpha)))} samples, more for many heads)")
    elif not heads:
        note = f"no head beats the control at alpha {alpha:g} ({S} samples, {L * H} heads)"
    else:
        note = ""
    return {"test": TEST, "correction": CORRECTION, "alpha": alpha, "samples": S,
            "min_attainable_p": _r(floor), "heads": heads,
            "p_adjusted": [[_r(x) for x in row] for row in q.reshape(L, H)], "note": note}


def _r(x: float) -> float:
    """Six significant digits: small p-values keep their size (round(x, 6) would make 1e-8 zero)."""
    return float(f"{float(x):.6g}")


def verdict(significant: int, alpha: float, samples: int, top_lift: float | None, top_head: str | None,
            n_correct: int | None = None, n_answered: int | None = None, too_few: bool = False) -> str:
    """One line for people: how many heads beat the control, the top lift, and the accuracy when known.

    >>> verdict(7, 0.05, 8, 8.1, "L12H3", 5, 8)
    '7 heads beat the control at alpha 0.05; top lift 8.1x (L12H3); accuracy 5/8'
    >>> verdict(6, 0.05, 16, 1.07, "L0H4", 4, 16)
    '6 heads beat the control at alpha 0.05; top lift 1.1x (L0H4); accuracy 4/16: they favour the span over the control but stay near chance (top lift under 2x)'
    >>> verdict(0, 0.05, 4, 1.3, "L0H4", 1, 8, too_few=True)
    'no head beats the control on these 4 samples (too few samples for alpha 0.05); top lift 1.3x (L0H4); accuracy 1/8: the model may not be retrieving at this length'
    """
    acc = f"; accuracy {n_correct}/{n_answered}" if n_correct is not None and n_answered else ""
    near = top_lift is not None and round(top_lift, 1) < 2  # as shown: "2.0x" is never "under 2x"
    top = f"; top lift {top_lift:.1f}x ({top_head})" if top_lift is not None and top_head else ""
    if significant:
        heads = "head beats" if significant == 1 else "heads beat"
        tail = ""
        if near:  # beating the control is not retrieving (docs/statistics.md)
            tail = f": {'it favours' if significant == 1 else 'they favour'} the span over the control but stay" \
                   f"{'s' if significant == 1 else ''} near chance (top lift under 2x)"
        return f"{significant} {heads} the control at alpha {alpha:g}{top}{acc}{tail}"
    why = f" (too few samples for alpha {alpha:g})" if too_few else ""
    weak = (n_correct is not None and bool(n_answered) and 2 * n_correct < n_answered) or near
    tail = ": the model may not be retrieving at this length" if weak else ""
    return f"no head beats the control on these {samples} samples{why}{top}{acc}{tail}"
