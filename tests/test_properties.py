"""The properties section of the report, against numbers worked out by hand on a small fabricated sweep."""

import json

import pytest
import torch

from retrieval_heads.report.collect import collect
from retrieval_heads.report.properties import section
from retrieval_heads.results import file_name, make_record

A = torch.arange(12, dtype=torch.float64).view(3, 4) / 10  # L0H0 lowest ... L2H3 highest (1.1)


def write(root, method, tokens, scores, significant=None):
    added = None if significant is None else {"significance": {"heads": [{"head": h} for h in significant]}}
    rec = make_record(method=method, model_key="tiny", model_name="tiny", question="inc_state", question_prompt="q",
                      total_tokens=tokens, needle_position=0.5, scores=scores, samples_processed=4, seed=0,
                      dtype="float32", added=added)
    path = root / method / file_name("tiny", "inc_state", tokens, 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


def fabricated(root):
    """Three summed_attention results (256 and 512 tokens on the needle span, 256 on the answer span) and one
    retrieval_score result; per-sample rows with baselines for the first; an ablation curve."""
    a = write(root, "summed_attention", 256, A, ["L2H3", "L2H2", "L0H1"])  # 3 of 12 heads beat the control
    write(root, "summed_attention", 512, 1.2 - A, [])  # the reverse order: Spearman -1
    c = write(root, "summed_attention+answer", 256, 2 * A)  # the same order: Spearman 1
    write(root, "retrieval_score", 256, torch.tensor([[0.0, 0.05, 0.2, 0.1], [0.3, 0.0, 0.0, 0.11],
                                                      [0.0, 0.0, 0.5, 0.0]], dtype=torch.float64))
    rows = []
    for i in range(4):  # scores A / 4 each (they add up to the result's); lift 3 for L0H1 on samples 0, 1 and
        s = A / 4  # L1H2 on sample 3, else 2 (0 for L0H0, whose score is 0)
        lift = torch.full((3, 4), 2.0, dtype=torch.float64)
        if i < 2:
            lift[0, 1] = 3.0
        if i == 3:
            lift[1, 2] = 3.0
        base = torch.where(s > 0, s / lift, torch.full_like(s, 0.5))
        rows.append({"index": i, "scores": s.tolist(), "baseline": base.tolist()})
    a.with_suffix(".samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c.with_suffix(".samples.jsonl").write_text(json.dumps({"index": 0, "scores": torch.ones(3, 4).tolist()}) + "\n")
    curve = {"model_key": "tiny", "question": "inc_state", "total_tokens": 256, "samples": 4, "ks": [0, 2],
             "controls": ["matched", "random"], "top": [],
             "summary": [{"k": 0, "top_accuracy": 0.75, "top_logprob": -1.0,
                          **{f"{c}_{m}_{s}": v for c in ("matched", "random")
                             for m, v in (("accuracy", 0.75), ("logprob", -1.0)) for s in ("min", "median", "max")}},
                         {"k": 2, "top_accuracy": 0.0, "top_logprob": -4.0,
                          "matched_accuracy_min": 0.25, "matched_accuracy_median": 0.5, "matched_accuracy_max": 0.75,
                          "matched_logprob_min": -2.5, "matched_logprob_median": -2.0, "matched_logprob_max": -1.5,
                          "random_accuracy_min": 0.5, "random_accuracy_median": 0.75, "random_accuracy_max": 0.75,
                          "random_logprob_min": -1.5, "random_logprob_median": -1.2, "random_logprob_max": -1.0}],
             "tests": [{"k": 2, "control": "matched", "metric": "logprob", "p_holm": 0.0625},
                       {"k": 2, "control": "random", "metric": "logprob", "p_holm": 0.0625}],
             "conclusion": "not shown: ..."}
    (a.parent / "tiny_inc_state_256.ablation.json").write_text(json.dumps(curve))


def test_properties_by_hand(tmp_path):
    fabricated(tmp_path)
    blocks, data = section(collect(tmp_path))
    sparse = {(r["method"], r["tokens"]): r for r in data["sparse"]}
    assert sparse[("summed_attention", 256)]["beating_control"] == 3
    assert sparse[("summed_attention", 256)]["beating_control_share"] == 0.25
    assert sparse[("summed_attention", 512)]["beating_control_share"] == 0.0
    assert sparse[("summed_attention+answer", 256)]["beating_control"] is None  # no significance block
    assert sparse[("retrieval_score", 256)]["retrieval_score_above_0.1_share"] == pytest.approx(4 / 12, abs=1e-4)
    assert sparse[("summed_attention", 256)]["retrieval_score_above_0.1_share"] is None
    by = {m["dimension"]: m for m in data["consistent"]["by_dimension"]}
    # 256/512 differ in length, needle/answer in span; 512-needle vs 256-answer in both, so not compared
    assert set(by) == {"tokens", "span"} and by["tokens"]["pairs"] == by["span"]["pairs"] == 1
    # reversed order: the top 10 of one and of the other share 12 - 4 heads out of 12
    assert by["tokens"]["jaccard_10_mean"] == pytest.approx(8 / 12, abs=1e-4) and by["tokens"]["spearman_mean"] == -1
    assert by["span"]["jaccard_10_mean"] == 1 and by["span"]["spearman_mean"] == 1
    [act] = data["dynamic"]["results"]
    assert act["samples"] == 4 and act["heads_active_on_any"] == 2 and act["heads_active_on_half"] == 1
    assert act["most_active"][:2] == [{"head": "L0H1", "share": 0.5}, {"head": "L1H2", "share": 0.25}]
    assert act["top_heads"][0] == {"head": "L2H3", "share": 0.0}
    missing = " ".join(data["dynamic"]["missing"])
    assert "summed_attention/tiny_inc_state_512.json`: no samples file" in missing
    assert "no per-sample chance baselines" in missing and missing.count("`") == 6  # 3 results lack it
    [curve] = data["causal"]
    assert curve["controls"] == ["matched", "random"] and curve["rows"][1]["matched_logprob"] == [-2.5, -2.0, -1.5]
    assert curve["rows"][1]["matched_p_holm"] == 0.0625 and curve["rows"][1]["top_accuracy"] == 0.0
    text = "\n".join(str(b) for b in blocks)
    assert "Consistent" in text and "-2 [-2.5, -1.5]" in text and "Conclusion: not shown" in text
