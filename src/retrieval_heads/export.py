"""A result in the formats other tools read.

- ``wu``: Wu et al.'s Retrieval_Head / HeadKV score file, JSON ``{"L-H": [score of sample 1, ...]}`` with
  ``L-H`` = ``layer-head`` (0-based), one score per sample in sample order; needs the result's
  ``.samples.jsonl`` (``detect --save-samples``).
- ``qrhead``: QRHead's head-set string, the top-k heads best first: ``"L-H,L-H,..."``.
- ``kv``: the KV-head view for grouped-query attention. Query head ``h`` reads KV head ``h // G`` with
  ``G = num_heads / num_kv_heads`` (transformers' ``repeat_kv`` layout: KV head ``j`` serves query heads
  ``j*G .. j*G + G - 1``). JSON with the ``mean`` and the ``max`` of each group's query-head scores as
  ``[layer][kv_head]`` grids, plus the mapping.
- ``duo``: a DuoAttention-style TSV, one row per layer and one tab-separated column per KV head, values in
  [0, 1]: each KV head's ``max`` over its query heads, negative scores clipped to 0, divided by the largest
  value of the table (so the strongest KV head is 1; all 0 if no score is positive).

The number of KV heads is the result's ``extra.num_key_value_heads`` (recorded by ``detect``) unless given.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import ParamError, UserError
from .results import parse_head, read_sample_scores, samples_path, scores_array

FORMATS = ("wu", "qrhead", "duo", "kv")


def head_key(name: str) -> str:
    """``L3H5`` -> ``3-5``."""
    layer, head = parse_head(name)
    return f"{layer}-{head}"


def load_sample_scores(result_path: str | Path, record: dict) -> np.ndarray:
    """(S, L, H) per-sample scores from the result's .samples.jsonl."""
    path = samples_path(result_path)
    if not path.is_file():
        raise UserError(f"{path} not found: the wu format needs per-sample scores; rerun detect with --save-samples")
    t = read_sample_scores(path, (record["num_layers"], record["num_heads"]))
    if t.shape[0] != record["samples_processed"]:
        raise UserError(f"{path} does not match its result ({tuple(t.shape)} scores)")
    total = scores_array(record)  # (L, H): the rows add up to it (or average to it), else they are another run's
    atol = 1e-5 * max(1.0, float(np.abs(total).max()))
    if not any(np.allclose(agg, total, rtol=1e-5, atol=atol) for agg in (t.sum(0), t.mean(0))):
        raise UserError(f"{path} does not add up to its result's scores (another run's samples file?)")
    return t


def wu(record: dict, sample_scores: np.ndarray) -> dict[str, list[float]]:
    """{"L-H": [per-sample scores]}, heads in (layer, head) order."""
    S, L, H = sample_scores.shape
    return {f"{layer}-{head}": [float(sample_scores[s, layer, head]) for s in range(S)]
            for layer in range(L) for head in range(H)}


def qrhead(record: dict, k: int) -> str:
    if k <= 0:
        raise ParamError("k", f" must be positive, got {k}")
    return ",".join(head_key(r["head"]) for r in record["head_rankings"][:k])


def kv_groups(record: dict, kv_heads: int | None) -> int:
    """The number of KV heads: ``kv_heads`` if given, else the result's; checked against the query heads."""
    n = kv_heads if kv_heads is not None else record.get("extra", {}).get("num_key_value_heads")
    if n is None:
        raise UserError("the result does not record num_key_value_heads; pass --kv-heads")
    H = record["num_heads"]
    if n <= 0 or H % n:
        raise ParamError("kv_heads", f" {n} does not divide the {H} query heads")
    return n


def kv_view(record: dict, kv_heads: int | None = None) -> dict:
    """Mean and max of each GQA group's query-head scores, (L, KV) grids."""
    n = kv_groups(record, kv_heads)
    scores = scores_array(record)  # (L, H)
    L, H = scores.shape
    G = H // n
    grouped = scores.reshape(L, n, G)  # (L, KV, G): query head h = j * G + g reads KV head j
    with np.errstate(over="ignore"):
        mean = grouped.mean(-1)  # (L, KV)
    over = ~np.isfinite(mean)  # a sum past the largest float (scores near +-1.7e308): each term divided first
    mean[over] = (grouped / G).sum(-1)[over]
    return {
        "num_layers": L, "num_heads": H, "num_key_value_heads": n, "group_size": G,
        **({"attention_layers": record["attention_layers"]} if "attention_layers" in record else {}),
        "mapping": "query head h reads KV head h // group_size",
        "groups": {str(j): list(range(j * G, (j + 1) * G)) for j in range(n)},
        "mean": [[round(float(x), 6) for x in row] for row in mean],
        "max": [[round(float(x), 6) for x in row] for row in grouped.max(-1)],
    }


def duo(record: dict, kv_heads: int | None = None) -> str:
    """Tab-separated (L rows x KV columns) values in [0, 1], see the module docstring."""
    view = kv_view(record, kv_heads)
    m = np.clip(np.asarray(view["max"], dtype=np.float64), 0, None)  # (L, KV)
    top = float(m.max())
    m = m / top if top > 0 else m
    return "".join("\t".join(f"{float(x):.6f}" for x in row) + "\n" for row in m)


def render(fmt: str, record: dict, result_path: str | Path, k: int = 20, kv_heads: int | None = None) -> str:
    """The export as text, ready to write."""
    if fmt == "wu":
        return json.dumps(wu(record, load_sample_scores(result_path, record))) + "\n"
    if fmt == "qrhead":
        return qrhead(record, k) + "\n"
    if fmt == "kv":
        return json.dumps(kv_view(record, kv_heads), indent=2, allow_nan=False) + "\n"
    if fmt == "duo":
        return duo(record, kv_heads)
    raise UserError(f"unknown format {fmt!r}; choose from: {', '.join(FORMATS)}")
