"""End to end on the embedded SmolLM2: the probe equals the seed's full version; result files' format."""

import json
import subprocess
import sys

import pytest
import torch

from retrieval_heads import detect
from retrieval_heads.data.prompt import PromptFormat
from retrieval_heads.data.samples import synthetic_samples
from reference import eager_head_scores, summed_attention_scores
from retrieval_heads.methods.summed_attention import SummedAttention
from retrieval_heads.results import CORE_FIELDS, load_result, parse_head, validate


def test_probe_equals_the_original_loop_on_smollm2(smollm2):
    p = synthetic_samples(PromptFormat(smollm2.tokenizer), ["inc_state"], 384, 1, 0.5, 0)[0]["inc_state"]
    ids = torch.tensor([p.input_ids])
    fast = SummedAttention().score_batch(smollm2.model, [p])[0]  # (L, H)
    seed = eager_head_scores(smollm2.model, ids, p.needle_start, p.needle_end)
    assert fast.shape == (30, 9) and len(seed) == 270
    worst = max(abs(fast[layer, head].item() - seed[f"L{layer}H{head}"]) for layer in range(30) for head in range(9))
    assert worst < 1e-5
    assert torch.allclose(fast, summed_attention_scores(smollm2.model, [p])[0], atol=1e-5)
    assert fast.max() > 0.05  # some head does look at the needle


def test_detect_writes_seed_format(smollm2, tmp_path):
    res = detect(smollm2, question="hq_state", tokens=512, samples=2, output_dir=tmp_path, save_samples=True)
    path = tmp_path / "summed_attention" / "smollm2_hq_state_512.json"
    assert res.path == path
    rec = json.loads(path.read_text())
    assert list(rec)[: len(CORE_FIELDS)] == list(CORE_FIELDS)
    assert rec["method"] == "summed_attention" and rec["model_key"] == "smollm2"
    assert rec["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert rec["question_prompt"] == "In what state is the company headquartered?"
    assert rec["total_tokens"] == 512 and rec["needle_position"] == 0.5 and rec["samples_processed"] == 2
    assert len(rec["head_rankings"]) == 270 and len(rec["top_50_heads"]) == 50
    assert [r["rank"] for r in rec["head_rankings"]] == list(range(1, 271))
    scores = [r["score"] for r in rec["head_rankings"]]
    assert scores == sorted(scores, reverse=True)
    assert rec["top_50_heads"] == [r["head"] for r in rec["head_rankings"][:50]]
    top = rec["head_rankings"][0]
    layer, head = parse_head(top["head"])
    assert top["score"] == pytest.approx(res.scores[layer, head].item(), abs=1e-6)
    validate(rec)
    rows = [json.loads(line) for line in path.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row, p in zip(rows, res.prompts):
        assert row["input_ids"] == p.input_ids and len(row["input_ids"]) <= 512
        assert (row["needle_start"], row["needle_end"]) == (p.needle_start, p.needle_end)
        assert len(row["scores"]) == 30 and len(row["scores"][0]) == 9
        assert all(0.0 <= x <= 1.0 + 1e-6 for r in row["scores"] for x in r)  # a mass per sample
    summed = torch.tensor([r["scores"] for r in rows]).sum(0)
    assert torch.allclose(summed, torch.tensor(rec["scores"], dtype=torch.float32), atol=1e-5)


def test_same_seed_same_json(smollm2, tmp_path):
    a = detect(smollm2, question="inc_year", tokens=400, samples=2, output_dir=tmp_path / "a").record
    b = detect(smollm2, question="inc_year", tokens=400, samples=2, output_dir=tmp_path / "b").record
    c = detect(smollm2, question="inc_year", tokens=400, samples=2, seed=1).record
    strip = lambda r: {k: v for k, v in r.items() if k != "timestamp"}  # noqa: E731
    assert strip(a) == strip(b)
    assert a["scores"] != c["scores"]
    assert (tmp_path / "a/summed_attention/smollm2_inc_year_400.json").read_text().replace(a["timestamp"], "") == \
        (tmp_path / "b/summed_attention/smollm2_inc_year_400.json").read_text().replace(b["timestamp"], "")


def test_batching_gives_identical_scores(smollm2):
    one = detect(smollm2, question="inc_state", tokens=384, samples=3, batch_size=1)
    three = detect(smollm2, question="inc_state", tokens=384, samples=3, batch_size=3)
    assert torch.allclose(one.sample_scores, three.sample_scores, atol=1e-5)


def test_edited_result_fails_validation(smollm2, tmp_path):
    res = detect(smollm2, question="inc_state", tokens=384, samples=1, output_dir=tmp_path)
    rec = json.loads(res.path.read_text())
    rec["head_rankings"][0]["score"] += 1
    res.path.write_text(json.dumps(rec))
    with pytest.raises(Exception, match="checksum mismatch"):
        load_result(res.path)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "retrieval_heads", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_cli_detect_end_to_end(tmp_path):
    r = run_cli("detect", "--question", "inc_state", "--tokens", "384", "--samples", "1", "--output-dir",
                str(tmp_path), "--top", "3")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "rank" in r.stdout
    rec = load_result(tmp_path / "summed_attention" / "smollm2_inc_state_384.json")
    assert rec["top_50_heads"][0] in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["--question", "inc_stat"], "unknown question 'inc_stat' (did you mean 'inc_state'?)"),
    (["--model", "smollm"], "unknown model key 'smollm'"),
    (["--model", "./no/such/dir"], "model path ./no/such/dir does not exist"),
    (["--tokens", "64"], "--tokens 64 is too small"),
    (["--tokens", "9000"], "--tokens 9000 exceeds the 8192 positions"),
    (["--needle-position", "1.5"], "--needle-position must lie in [0, 1]"),
    (["--samples", "0"], "--samples must be positive"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--tokens", "many"], "argument --tokens: invalid int value"),
])
@pytest.mark.slow
def test_cli_bad_input_one_line_exit_2(tmp_path, args, msg):
    r = run_cli("detect", *args, "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_malformed_dataset_names_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"needle": "a", "haystack": "b", "question": "q", "answer": "a"}\n{oops\n')
    r = run_cli("detect", "--dataset", str(data), "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 2 and "bad.jsonl:2: malformed JSON" in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_defaults_are_the_library_defaults():
    """`retrieval-heads detect` with no flags runs the same experiment as `detect(lm)`: the passkey task on the
    answer span with answers (bench/results/default_task.md); a filing question keeps the seed's experiment
    (512 tokens, 16 samples, needle span); a grid keeps its own sample count (its units are long prompts)."""
    import inspect

    from retrieval_heads import experiments, sweep
    from retrieval_heads.cli import parse
    from retrieval_heads.defaults import Settings, settings_for

    args = parse(["detect"])
    lib = inspect.signature(experiments.detect).parameters
    assert args.question == lib["question"].default == "passkey"
    assert (args.tokens, args.samples, args.span, args.answers) == (None,) * 4  # taken from the question
    assert (lib["tokens"].default, lib["samples"].default, lib["span"].default, lib["answers"].default) == (None,) * 4
    assert settings_for("passkey", dataset=False) == Settings(1024, 8, "answer", True)
    assert settings_for("niah_uuid", dataset=False) == Settings(1024, 8, "answer", True)
    assert settings_for("inc_state", dataset=False) == Settings(512, 16, "needle", False)
    assert settings_for("passkey", dataset=True) == Settings(512, 16, "needle", False)  # a dataset: the seed's
    assert sweep.Grid.__dataclass_fields__["samples"].default == 6
