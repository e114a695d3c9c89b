"""How stable a head ranking is: across lengths, models and methods, and over resampled samples.

All numbers are plain Python floats and ints (JSON-ready); a correlation that is undefined (a constant
score grid) is ``None``.

- :func:`compare`: Spearman and Kendall (tau-b) correlation of two full score grids, and the Jaccard
  overlap of their top-k head sets (top-k taken from each result's own ranking).
- :func:`length_pairs`, :func:`model_pairs`, :func:`method_pairs`, :func:`depth_pairs`: :func:`compare` over
  every pair that differs in exactly that one factor (results at other needle depths are other groups: their
  question is shown as ``question @depth``, :attr:`Experiment.question_label`); in a group of more than 12
  results, neighbouring ones only (:func:`pairs_of`).
- :func:`movement`: for each (method, model, question), the rank of every length's top heads at every length.
- :func:`top1_counts`: how often each head is the top head, per length.
- :func:`bootstrap_ranks`: percentile intervals of each head's rank when the samples are resampled with
  replacement; :func:`bootstrap_reference` is the slow loop it is tested against.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from itertools import combinations

import numpy as np
from scipy import stats

from ..results import parse_head, ranking
from .collect import Experiment

TOP_K = (10, 50)


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def _correlation(fn, x: np.ndarray, y: np.ndarray) -> float | None:
    if x.max() == x.min() or y.max() == y.min():  # not np.ptp: max - min overflows for scores near +-1.7e308
        return None
    return float(fn(x, y).statistic)


def compare(a: Experiment, b: Experiment, top_k: tuple[int, ...] = TOP_K, kendall: bool = True) -> dict:
    """Rank agreement of two results over the same head grid (without Kendall's tau where ``kendall`` is
    False: the properties section does not show it)."""
    x, y = a.scores.ravel(), b.scores.ravel()  # (L*H,)
    out = {"spearman": _correlation(stats.spearmanr, x, y)}
    if kendall:
        out["kendall"] = _correlation(stats.kendalltau, x, y)
    ra, rb = a.ranked, b.ranked
    for k in top_k:
        out[f"jaccard_{k}"] = jaccard(ra[:k], rb[:k])
    return out


ALL_PAIRS_UP_TO = 12  # a group of more results compares neighbours only (530 lengths: 529 pairs, not 140,185)


def pairs_of(members: list[Experiment], vary_of) -> list[tuple[Experiment, Experiment]]:
    """Every pair of a group of at most :data:`ALL_PAIRS_UP_TO` results; above that, each result and the next
    one in order of ``vary_of`` (neighbouring lengths, depths ...), so that a report on hundreds of lengths
    takes seconds, not the hours of all pairs."""
    if len(members) <= ALL_PAIRS_UP_TO:
        return list(combinations(members, 2))
    ordered = sorted(members, key=vary_of)
    return list(zip(ordered, ordered[1:]))


def _pairs(exps: list[Experiment], group_of, vary_of, bounded: list[str] | None = None) -> tuple[list[dict], list[str]]:
    groups: dict[tuple, list[Experiment]] = defaultdict(list)
    for e in exps:
        groups[group_of(e)].append(e)
    rows, mismatched = [], defaultdict(int)
    for g, members in groups.items():
        if len(members) > ALL_PAIRS_UP_TO and bounded is not None:
            bounded.append(f"{' · '.join(map(str, g))}: {len(members)} results, so only neighbouring ones are "
                           f"compared ({len(members) - 1} pairs of {len(members) * (len(members) - 1) // 2}; all "
                           f"pairs up to {ALL_PAIRS_UP_TO})")
        for a, b in pairs_of(members, vary_of):
            if a.shape != b.shape:
                mismatched[(vary_of(a), vary_of(b), a.shape, b.shape)] += 1
                continue
            rows.append({"group": list(g), "a": vary_of(a), "b": vary_of(b), **compare(a, b)})
    skipped = [f"{a} vs {b}: head grids {sa[0]}x{sa[1]} and {sb[0]}x{sb[1]} differ, {n} pair(s) not compared"
               for (a, b, sa, sb), n in mismatched.items()]
    return rows, skipped


def length_pairs(exps: list[Experiment], bounded: list[str] | None = None) -> list[dict]:
    """Every pair of lengths of one (method, model, question, depth) (:func:`pairs_of`: neighbouring lengths
    only above 12 lengths, each such group noted in ``bounded``)."""
    return _pairs(exps, lambda e: (e.method, e.model, e.question_label), lambda e: e.tokens, bounded)[0]


def model_pairs(exps: list[Experiment]) -> tuple[list[dict], list[str]]:
    """Every pair of models on one (method, question, tokens) whose head grids have the same shape."""
    notes: list[str] = []
    rows, skipped = _pairs(exps, lambda e: (e.method, e.question_label, e.tokens), lambda e: e.model, notes)
    return rows, skipped + notes


def method_pairs(exps: list[Experiment]) -> tuple[list[dict], list[str]]:
    """Every pair of methods on one experiment (model, question, tokens)."""
    notes: list[str] = []
    rows, skipped = _pairs(exps, lambda e: (e.model, e.question_label, e.tokens), lambda e: e.method, notes)
    return rows, skipped + notes


def depth_pairs(exps: list[Experiment]) -> list[dict]:
    """Every pair of needle depths of one (method, model, question, tokens)."""
    return _pairs(exps, lambda e: (e.method, e.model, e.question, e.tokens), lambda e: e.depth)[0]


def movement(exps: list[Experiment], top: int = 5) -> list[dict]:
    """For each (method, model, question, depth) with two or more lengths: the union of each length's top heads,
    with the head's rank at every length (1 = best). Heads are listed by their best rank, then mean rank."""
    groups: dict[tuple, list[Experiment]] = defaultdict(list)
    for e in exps:
        groups[(e.method, e.model, e.question, e.depth)].append(e)
    out = []
    for (method, model, question, depth), members in groups.items():
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda e: e.tokens)
        rank_at = {e.tokens: {h: i + 1 for i, h in enumerate(e.ranked)} for e in members}
        heads = []
        for e in members:
            heads += [h for h in e.ranked[:top] if h not in heads]
        rows = []
        for h in heads:
            ranks = {str(t): rank_at[t][h] for t in rank_at}
            rows.append({"head": h, "ranks": ranks,
                         "top_at": [t for t in rank_at if rank_at[t][h] <= top]})
        rows.sort(key=lambda r: (min(r["ranks"].values()), float(np.mean(list(r["ranks"].values())))))
        out.append({"method": method, "model": model, "question": question, "depth": depth,
                    "question_label": members[0].question_label, "tokens": [e.tokens for e in members], "top": top, "heads": rows})
    return out


def top1_counts(exps: list[Experiment]) -> list[dict]:
    """Per method: for each head that is the top head somewhere, in how many experiments of each length."""
    out = []
    for method in sorted({e.method for e in exps}):
        mine = [e for e in exps if e.method == method]
        lengths = sorted({e.tokens for e in mine})
        of_length = {t: sum(e.tokens == t for e in mine) for t in lengths}
        counts: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for e in mine:
            counts[e.ranked[0]][e.tokens] += 1
        rows = [{"head": h, "by_tokens": {str(t): c[t] for t in lengths}, "total": sum(c.values())}
                for h, c in counts.items()]
        rows.sort(key=lambda r: (-r["total"], r["head"]))
        out.append({"method": method, "experiments": len(mine),
                    "experiments_by_tokens": {str(t): n for t, n in of_length.items()}, "heads": rows})
    return out


BOOTSTRAP_BYTES = 4 << 30  # what the bootstrap of one result may hold at once


def check_bootstrap_size(resamples: int, samples: int, heads: int) -> None:
    """UserError when ``resamples`` bootstrap rankings of ``heads`` heads over ``samples`` samples would hold
    more than :data:`BOOTSTRAP_BYTES` (totals, order and ranks of B x N, weights of B x S, 8 bytes each): a
    result of a large head grid with --resamples near its maximum asked for tens of GiB (a MemoryError
    traceback, or the machine's memory). The line names the largest --resamples that fits."""
    from ..errors import UserError

    per = (3 * heads + samples) * 8
    if resamples * per > BOOTSTRAP_BYTES:
        raise UserError(f"--resamples {resamples} over {samples} samples of {heads} heads needs about "
                        f"{resamples * per / 2 ** 30:.0f} GiB; use --resamples {max(1, BOOTSTRAP_BYTES // per)} "
                        "or fewer")


def bootstrap_ranks(per_sample: np.ndarray, resamples: int = 1000, seed: int = 0,
                    layers: list[int] | None = None) -> np.ndarray:
    """Ranks (B, L*H) of every head in each of ``resamples`` bootstrap resamples of the samples.

    per_sample (S, L, H). Resample b draws S sample indices with replacement, sums their scores and ranks
    the heads 1..L*H, best first, ties broken by (layer, head) as in :func:`retrieval_heads.results.ranking`.
    ``layers``: a hybrid's attention layers; the other layers' heads rank after all of them.
    """
    S, L, H = per_sample.shape
    check_bootstrap_size(resamples, S, L * H)
    X = per_sample.reshape(S, -1)  # (S, N)
    idx = np.random.default_rng(seed).integers(0, S, size=(resamples, S))  # (B, S)
    weights = np.zeros((resamples, S))  # (B, S): how often each sample was drawn
    np.add.at(weights, (np.arange(resamples)[:, None], idx), 1.0)
    totals = weights @ X  # (B, N)
    if layers is not None:
        silent = [layer for layer in range(L) if layer not in set(layers)]
        grid = totals.reshape(resamples, L, H)  # (B, L, H)
        grid[:, silent] = -np.inf  # ranked after every attention head
        totals = grid.reshape(resamples, L * H)  # (B, N)
    order = np.argsort(-totals, axis=1, kind="stable")  # (B, N): flat index = layer * H + head
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(1, X.shape[1] + 1), order.shape), axis=1)
    return ranks


def bootstrap_reference(per_sample: np.ndarray, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """The same as :func:`bootstrap_ranks`, one resample at a time through ``results.ranking``."""
    import torch

    S, L, H = per_sample.shape
    idx = np.random.default_rng(seed).integers(0, S, size=(resamples, S))
    out = np.zeros((resamples, L * H), dtype=np.int64)
    for b in range(resamples):
        total = sum(per_sample[i] for i in idx[b])  # (L, H)
        for r, (name, _) in enumerate(ranking(torch.tensor(total)), 1):
            layer, head = parse_head(name)
            out[b, layer * H + head] = r
    return out


def rank_intervals(exp: Experiment, per_sample: np.ndarray, top: int = 20, resamples: int = 1000,
                   seed: int = 0) -> list[dict]:
    """The 2.5 / 50 / 97.5 percentile bootstrap rank of the result's top heads, and how often each is first."""
    H = exp.shape[1]
    ranks = bootstrap_ranks(per_sample, resamples, seed, exp.record.get("attention_layers"))  # (B, N)
    lo, mid, hi = np.percentile(ranks, [2.5, 50, 97.5], axis=0)  # (N,) each
    rows = []
    for r, entry in enumerate(exp.record["head_rankings"][:top], 1):
        layer, head = parse_head(entry["head"])
        j = layer * H + head
        rows.append({"head": entry["head"], "rank": r, "score": entry["score"], "median": float(mid[j]),
                     "lo": float(lo[j]), "hi": float(hi[j]), "share_first": float((ranks[:, j] == 1).mean())})
    return rows
