"""A small results folder whose report is kept as golden text (tests/golden_report/): the report's text and
numbers must not change when its drawing or pairing gets faster.

    PYTHONPATH=src python tests/report_golden.py OUT   # writes the folder, reports it, copies md and json to OUT

Twelve results: one model and question at five lengths, a second model and a second
question at two lengths each, a second method at one length, one result at needle depth 0.1, a third model with
a 3 x 4 head grid (the others 6 x 10), and per-sample scores beside the first (bootstrap).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from retrieval_heads.io import atomic_write_json, atomic_write_jsonl
from retrieval_heads.results import make_record, result_path

GOLDEN = Path(__file__).resolve().parent / "golden_report"


def write_set(root: Path) -> Path:
    g = torch.Generator().manual_seed(7)
    runs = [("summed_attention", "m1", "inc_state", t, 0.5, (6, 10)) for t in (256, 512, 1024, 2048, 4096)]
    runs += [("summed_attention", "m2", "inc_state", t, 0.5, (6, 10)) for t in (256, 1024)]
    runs += [("summed_attention", "m1", "hq_state", t, 0.5, (6, 10)) for t in (256, 1024)]
    runs += [("query_focused", "m1", "inc_state", 1024, 0.5, (6, 10)), ("summed_attention", "m1", "inc_state", 1024,
                                                                          0.1, (6, 10)),
             ("summed_attention", "m3", "inc_year", 512, 0.5, (3, 4))]
    for i, (method, model, question, tokens, depth, (L, H)) in enumerate(runs):
        per_sample = torch.rand(3, L, H, generator=g, dtype=torch.float64)
        rec = make_record(method=method, model_key=model, model_name=f"org/{model}", question=question,
                          question_prompt=question, total_tokens=tokens, needle_position=depth,
                          scores=per_sample.sum(0), samples_processed=3, seed=0, dtype="float32")
        path = result_path(root, method, model, question, tokens, depth)
        if i == 0:
            atomic_write_jsonl(path.with_suffix(".samples.jsonl"),
                               [{"index": j, "scores": s.tolist()} for j, s in enumerate(per_sample)])
        atomic_write_json(path, rec)
    return root


def texts(folder: Path, root: Path) -> dict[str, str]:
    """report.md and report.json of a report folder, the results folder's path written as RESULTS."""
    return {name: (folder / name).read_text().replace(str(root), "RESULTS") for name in ("report.md", "report.json")}


if __name__ == "__main__":
    import tempfile

    from retrieval_heads.cli import main

    out = Path(sys.argv[1])
    root = write_set(Path(tempfile.mkdtemp()) / "results")
    assert main(["report", str(root), "--resamples", "50"]) == 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts(root / "report", root).items():
        (out / name).write_text(text)
