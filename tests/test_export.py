"""Exports, each loaded back in its own format and checked against the result it came from."""

import contextlib
import csv
import io
import json
from types import SimpleNamespace

import pytest
import torch

from retrieval_heads.data.prompt import PromptSample
from retrieval_heads.experiments import write_result
from retrieval_heads.export import kv_view
from retrieval_heads.results import make_record

L, H, KV, S = 4, 6, 2, 3  # group size 3: query heads 0-2 read KV head 0, heads 3-5 read KV head 1


@pytest.fixture
def result(tmp_path):
    """A result with per-sample scores (some negative, as query_focused can give) and its samples file."""
    g = torch.Generator().manual_seed(5)
    sample_scores = torch.rand(S, L, H, generator=g) - 0.2  # (S, L, H)
    record = make_record(method="query_focused", model_key="m", model_name="m", question="inc_state",
                         question_prompt="q", total_tokens=64, needle_position=0.5, scores=sample_scores.sum(0),
                         samples_processed=S, seed=0, dtype="float32", extra={"num_key_value_heads": KV})
    prompts = [PromptSample([1, 2, 3], 0, 1, 2, "q", "a") for _ in range(S)]
    path = write_result(tmp_path, record, prompts, sample_scores, save_samples=True)
    return path, record, sample_scores


def run_cli(*args):
    """``retrieval-heads export ARGS`` in this process (the CLI's own entry, ``cli.main``): exit code and
    what it printed. (The one-line error contract through a real process is tested on detect and sweep.)"""
    from retrieval_heads.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["export", *map(str, args)])
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def export_to(path, fmt, out, *extra):
    r = run_cli(str(path), "--format", fmt, "--out", str(out), *extra)
    assert r.returncode == 0, r.stderr
    return out


def test_wu_json_holds_per_sample_scores(result, tmp_path):
    path, record, sample_scores = result
    data = json.loads(export_to(path, "wu", tmp_path / "wu.json").read_text())
    assert len(data) == L * H
    for layer in range(L):
        for head in range(H):
            got = torch.tensor(data[f"{layer}-{head}"], dtype=torch.float64)
            assert torch.allclose(got, sample_scores[:, layer, head].double(), atol=1e-7)


def test_wu_needs_the_samples_file(result, tmp_path):
    path, _, _ = result
    path.with_suffix(".samples.jsonl").unlink()
    r = run_cli(str(path), "--format", "wu", "--out", str(tmp_path / "wu.json"))
    assert r.returncode == 2 and "rerun detect with --save-samples" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "wu.json").exists()


def test_qrhead_head_set_is_the_top_k(result):
    path, record, _ = result
    r = run_cli(str(path), "--format", "qrhead", "--k", "5")
    assert r.returncode == 0, r.stderr
    heads = [tuple(map(int, h.split("-"))) for h in r.stdout.strip().split(",")]
    assert len(heads) == 5
    scores = torch.tensor(record["scores"])
    best = sorted(((float(scores[l, h]), l, h) for l in range(L) for h in range(H)), key=lambda t: (-t[0], t[1], t[2]))
    assert heads == [(l, h) for _, l, h in best[:5]]


def test_kv_view_aggregates_each_gqa_group(result, tmp_path):
    path, record, _ = result
    view = json.loads(export_to(path, "kv", tmp_path / "kv.json").read_text())
    scores = torch.tensor(record["scores"], dtype=torch.float64)
    assert view["group_size"] == 3 and view["groups"] == {"0": [0, 1, 2], "1": [3, 4, 5]}
    for layer in range(L):
        for j in range(KV):
            members = [scores[layer, h] for h in range(H) if h // 3 == j]
            assert view["mean"][layer][j] == pytest.approx(float(sum(members) / 3), abs=1e-6)
            assert view["max"][layer][j] == pytest.approx(float(max(members)), abs=1e-6)


def test_duo_tsv_is_layers_by_kv_heads_in_unit_range(result, tmp_path):
    path, record, _ = result
    out = export_to(path, "duo", tmp_path / "duo.tsv")
    with open(out, newline="") as f:
        rows = [[float(x) for x in row] for row in csv.reader(f, delimiter="\t")]
    assert len(rows) == L and all(len(r) == KV for r in rows)
    flat = [x for r in rows for x in r]
    assert min(flat) >= 0 and max(flat) == 1.0
    mx = torch.tensor(kv_view(record)["max"]).clamp(min=0)
    assert torch.allclose(torch.tensor(rows), mx / mx.max(), atol=1e-6)


@pytest.mark.parametrize("args,msg", [
    (["--format", "duo", "--kv-heads", "4"], "--kv-heads 4 does not divide the 6 query heads"),
    (["--format", "onnx"], "unknown format 'onnx'"),
    (["--format", "qrhead", "--k", "0"], "--k must be positive"),
])
def test_bad_input_one_line(result, args, msg):
    path, _, _ = result
    r = run_cli(str(path), *args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_kv_heads_from_option_when_the_result_has_none(tmp_path):
    record = make_record(method="summed_attention", model_key="m", model_name="m", question="inc_state",
                         question_prompt="q", total_tokens=64, needle_position=0.5, scores=torch.rand(L, H),
                         samples_processed=1, seed=0, dtype="float32")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    r = run_cli(str(path), "--format", "kv")
    assert r.returncode == 2 and "pass --kv-heads" in r.stderr
    r = run_cli(str(path), "--format", "kv", "--kv-heads", "3")
    assert r.returncode == 0 and json.loads(r.stdout)["group_size"] == 2
