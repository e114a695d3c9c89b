"""Identity: a result is never mistaken for another. Non-causal models are refused; local folders and datasets
never take a built-in name; every result records what produced it (``provenance``) and a sweep resumes only
over results of the same model, weights and settings; a result or samples file edited with its checksum
recomputed is rejected (report, export, ablate) or recomputed (sweep); an output never replaces an input.

Everything runs on a tiny random Llama saved with SmolLM2's tokenizer in a folder named ``smollm2`` (like the
built-in key), through the real CLI in process or the sweep's own functions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil

import pytest
import torch

from conftest import cli, one_line, save_tiny
from retrieval_heads import models, results
from retrieval_heads.errors import UserError
from retrieval_heads.sweep import Unit, make_grid, run_sweep, unit_status

Q, T = "inc_state", 256
GOOD = {"needle": "The company is incorporated in the State of Delaware.", "question":
        "In what state is the company incorporated?", "answer": "Delaware",
        "haystack": "The quarterly report covers revenue, costs and the outlook for the next year. " * 60}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder named like the built-in key, the model loaded from it)."""
    d = save_tiny(tmp_path_factory.mktemp("models") / "smollm2")
    return d, models.load_model(str(d))


def sweep(tiny, out, **grid):
    lines = []
    g = make_grid(**{"models": [str(tiny[0])], "questions": [Q], "tokens": [T], "samples": 2, **grid})
    s = run_sweep(g, out, load=lambda m, **kw: tiny[1], progress=False, echo=lines.append)
    return s, lines


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """One sweep result with its samples file."""
    out = tmp_path_factory.mktemp("reference")
    s, _ = sweep(tiny, out, save_samples=True)
    assert len(s.done) == 1
    return s.done[0]


def rewrite(path, edit):
    """Apply ``edit`` to the result at ``path`` and recompute its checksum, as a careful forger would."""
    rec = json.loads(path.read_text())
    edit(rec)
    rec["checksum"] = results._checksum(rec)
    path.write_text(json.dumps(rec, indent=2))


# --- non-causal models -----------------------------------------------------------------------------------


def test_non_causal_bert_is_refused_by_detect_and_sweep(tmp_path, capfd):
    """A BERT LM head with is_decoder false attends both ways: refused before any work, one line, exit 2."""
    from transformers import BertConfig, BertLMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    d = tmp_path / "bert"
    d.mkdir()
    for f in models.smollm2_path().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, d / f.name)
    BertLMHeadModel(BertConfig(vocab_size=49152, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=512)).save_pretrained(d)
    assert (d / "model.safetensors").exists()
    msg = "does not attend causally (model_type 'bert' with is_decoder false is a bidirectional encoder)"
    for args in (["detect", "--model", d, "--tokens", 256, "--samples", 1],
                 ["sweep", "--models", d, "--questions", Q, "--tokens", 256, "--samples", 1, "--no-progress"]):
        rc, out, err = cli(capfd, *args, "--output-dir", tmp_path / "out")
        one_line(rc, err, msg)
        assert not (tmp_path / "out").exists()


def test_non_causal_configs():
    import transformers as t

    assert models.non_causal_reason(t.LlamaConfig()) is None
    assert models.non_causal_reason(t.GPT2Config()) is None
    assert models.non_causal_reason(t.BertConfig(is_decoder=True)) is None  # a BERT decoder is causal
    assert "bidirectional encoder" in models.non_causal_reason(t.RobertaConfig())
    assert "encoder-decoder" in models.non_causal_reason(t.BartConfig())
    assert "attends bidirectionally" in models.non_causal_reason(t.XLNetConfig())
    assert "causal false" in models.non_causal_reason(t.XLMConfig())
    assert "use_bidirectional_attention" in models.non_causal_reason(
        t.Gemma3TextConfig(use_bidirectional_attention=True))


# --- names -----------------------------------------------------------------------------------------------


def test_local_folder_and_dataset_never_take_builtin_names(tiny, tmp_path, capfd):
    """A folder named ``smollm2`` files as ``smollm2+local``; ``inc_state.jsonl`` as question
    ``inc_state+dataset``: neither replaces nor passes for the built-in experiment."""
    assert models.resolve(str(tiny[0]))[0] == "smollm2+local"
    assert models.resolve("smollm2")[0] == "smollm2"
    out = tmp_path / "out"
    rc, _, err = cli(capfd, "detect", "--model", tiny[0], "--question", Q, "--tokens", T, "--samples", 1,
                     "--output-dir", out)
    assert rc == 0, err
    synthetic = out / "summed_attention" / f"smollm2+local_{Q}_{T}.json"
    before = synthetic.read_bytes()
    data = tmp_path / f"{Q}.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    rc, _, err = cli(capfd, "detect", "--model", tiny[0], "--dataset", data, "--tokens", T, "--samples", 1,
                     "--output-dir", out)
    assert rc == 0, err
    assert synthetic.read_bytes() == before
    rec = results.load_result(out / "summed_attention" / f"smollm2+local_{Q}+dataset_{T}.json")
    assert rec["question"] == f"{Q}+dataset" and rec["model_key"] == "smollm2+local"
    assert rec["provenance"]["dataset"] == {"file": data.name, "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}


def test_two_models_filed_alike_in_one_grid(tiny, tmp_path):
    other = save_tiny(tmp_path / "elsewhere" / "smollm2", seed=1)
    with pytest.raises(UserError, match="would both be filed as 'smollm2\\+local'"):
        make_grid(models=[str(tiny[0]), str(other)], questions=[Q], tokens=[T])


# --- provenance and resume -------------------------------------------------------------------------------


def test_provenance_names_the_model_weights_and_versions(tiny, reference):
    import transformers

    rec = results.load_result(reference)
    f = tiny[0] / "model.safetensors"
    weights = hashlib.sha256(f"model.safetensors\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    assert rec["provenance"] == {
        "model": {"source": str(tiny[0].resolve()), "revision": None, "weights_sha256": weights.hexdigest()},
        "dataset": None,
        "versions": {"retrieval-heads": "0.1.0", "torch": torch.__version__, "transformers": transformers.__version__},
    }
    assert list(rec)[-2:] == ["provenance", "checksum"]
    rec["provenance"]["model"]["source"] = "/elsewhere"  # the checksum covers it
    with pytest.raises(UserError, match="checksum mismatch"):
        results.validate(rec)


def test_weights_hash_is_cached_by_path_size_and_mtime(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_HEADS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_hashes", {})
    d = tmp_path / "m"
    shutil.copytree(tiny[0], d)
    real = models.weights_sha256(d)
    store = tmp_path / "cache" / models.HASH_CACHE
    cached = json.loads(store.read_text())
    assert len(cached) == 1
    ((key, digest),) = cached.items()
    f = d / "model.safetensors"
    assert key == f"{f.resolve()}|{f.stat().st_size}|{f.stat().st_mtime_ns}"
    assert digest == hashlib.sha256(f.read_bytes()).hexdigest()
    store.write_text(json.dumps({key: "0" * 64}))  # a planted entry is used: the file is not read again
    monkeypatch.setattr(models, "_hashes", {})
    assert models.weights_sha256(d) != real
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1000))  # a touched file is hashed again
    monkeypatch.setattr(models, "_hashes", {})
    assert models.weights_sha256(d) == real


def test_resume_accepts_only_the_same_model_identity(tiny, reference, tmp_path):
    """Another folder of the same name, or new weights in the same folder, stop the sweep with one line;
    other package versions do not."""
    out = tmp_path / "out"
    (out / "summed_attention").mkdir(parents=True)
    path = out / "summed_attention" / reference.name
    shutil.copy(reference, path)
    s, _ = sweep(tiny, out)
    assert [p.name for p in s.skipped] == [reference.name]

    other = save_tiny(tmp_path / "elsewhere" / "smollm2", seed=1)
    other_lm = models.load_model(str(other))
    g = make_grid(models=[str(other)], questions=[Q], tokens=[T], samples=2)
    with pytest.raises(UserError, match="was made with another model source: .*smollm2"):
        run_sweep(g, out, load=lambda m, **kw: other_lm, progress=False, echo=lambda s: None)

    moved = tmp_path / "moved" / "smollm2"  # new weights where the old ones were
    shutil.copytree(tiny[0], moved)
    rewrite(path, lambda r: r["provenance"]["model"].update(source=str(moved.resolve())))
    save_tiny(moved, seed=2)
    g = make_grid(models=[str(moved)], questions=[Q], tokens=[T], samples=2)
    with pytest.raises(UserError, match="was made with another model weights sha256"):
        run_sweep(g, out, load=lambda m, **kw: other_lm, progress=False, echo=lambda s: None)

    shutil.copy(reference, path)
    rewrite(path, lambda r: r["provenance"]["versions"].update(torch="0.0", transformers="0.0"))
    s, _ = sweep(tiny, out)
    assert [p.name for p in s.skipped] == [reference.name]  # versions are for audit only

    rewrite(path, lambda r: r.pop("provenance"))
    with pytest.raises(UserError, match="was made with no recorded provenance"):
        sweep(tiny, out)


# --- hostile results ---------------------------------------------------------------------------------------


def _swap_first_two(r):
    a, b = r["head_rankings"][0], r["head_rankings"][1]
    r["head_rankings"][0], r["head_rankings"][1] = dict(b, rank=1), dict(a, rank=2)
    r["top_50_heads"] = [x["head"] for x in r["head_rankings"][:50]]


HOSTILE = {
    "five_rows_of_scores": (lambda r: r["scores"].extend([[0.0] * 4] * 3), "scores are not 2 x 4"),
    "a_short_row": (lambda r: r["scores"][1].pop(), "scores are not 2 x 4"),
    "layers_not_the_grid": (lambda r: r.update(num_layers=5), "scores are not 5 x 4"),
    "non_finite_score": (lambda r: r["scores"][0].__setitem__(0, math.inf), "non-standard JSON constant Infinity"),
    "rankings_out_of_order": (_swap_first_two, "not sorted by score"),
    "ranking_score_not_the_grids": (lambda r: r["head_rankings"][5].update(score=r["head_rankings"][5]["score"] + 1),
                                    "the scores grid"),
    "rank_numbers": (lambda r: r["head_rankings"][3].update(rank=7), "has rank 7, expected 4"),
    "a_head_twice": (lambda r: r["head_rankings"][-1].update(head=r["head_rankings"][0]["head"]), "repeats one"),
    "a_head_outside_the_grid": (lambda r: r["head_rankings"][-1].update(head="L9H0"), "not a head of the 2 x 4"),
    "a_head_missing": (lambda r: r["head_rankings"].pop(), "does not hold all 8 heads"),
    "top_50_not_the_first": (lambda r: r["top_50_heads"].reverse(), "top_50_heads"),
    "total_tokens_a_string": (lambda r: r.update(total_tokens="256"), "total_tokens: not a positive"),
    "samples_processed_zero": (lambda r: r.update(samples_processed=0), "samples_processed: not a positive"),
    "needle_position_outside": (lambda r: r.update(needle_position=1.5), "needle_position: not a number in [0, 1]"),
    "needle_position_a_bool": (lambda r: r.update(needle_position=True), "needle_position: not a number"),
    "kv_heads_a_string": (lambda r: r["extra"].update(num_key_value_heads="2"), "num_key_value_heads"),
    "provenance_not_an_object": (lambda r: r.update(provenance="trusted"), "provenance"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_result_is_rejected_everywhere_and_recomputed_by_sweep(name, tiny, reference, tmp_path, capfd):
    """Edited with its checksum recomputed: report, export and ablate stop with one line; a sweep recomputes
    it to the original."""
    edit, msg = HOSTILE[name]
    out = tmp_path / "out"
    (out / "summed_attention").mkdir(parents=True)
    path = out / "summed_attention" / reference.name
    shutil.copy(reference, path)
    rewrite(path, edit)
    with pytest.raises(UserError, match=msg.replace("[", "\\[").replace("]", "\\]").replace("+", "\\+")):
        results.load_result(path)
    for args in (["report", out, "--out", tmp_path / "rep", "--resamples", 10],
                 ["export", path, "--format", "kv"],
                 ["ablate", path, "--k", 0, "--random-seeds", 0]):
        rc, stdout, err = cli(capfd, *args)
        line = one_line(rc, err, msg)
        assert str(path) in line and stdout == "", args
    assert not (tmp_path / "rep").exists()
    s, lines = sweep(tiny, out)
    assert [p.name for p in s.recomputed] == [reference.name], lines
    assert any(x.startswith("recomputed ") and msg in x for x in lines), lines
    drop = ("timestamp",)
    assert {k: v for k, v in json.loads(path.read_text()).items() if k not in drop} == \
        {k: v for k, v in json.loads(reference.read_text()).items() if k not in drop}


@pytest.mark.parametrize("damage", ["truncated_mid_line", "a_row_dropped", "other_rows"])
def test_samples_file_that_does_not_belong_is_recomputed(damage, tiny, reference, tmp_path):
    out = tmp_path / "out"
    (out / "summed_attention").mkdir(parents=True)
    path = out / "summed_attention" / reference.name
    shutil.copy(reference, path)
    src = results.samples_path(reference).read_text()
    rows = src.splitlines()
    text = {"truncated_mid_line": src[: len(src) - 40],
            "a_row_dropped": rows[0] + "\n",
            "other_rows": "\n".join(rows[:1] * 2) + "\n"}[damage]
    results.samples_path(path).write_text(text)
    g = make_grid(models=[str(tiny[0])], questions=[Q], tokens=[T], samples=2, save_samples=True)
    st = unit_status(out, g, Unit(str(tiny[0]), T, (Q,)))
    e = ("summed_attention", Q)
    assert st.state[e] == "corrupt" and st.reason[e].startswith("samples file"), st.reason
    s, _ = sweep(tiny, out, save_samples=True)
    assert [p.name for p in s.recomputed] == [reference.name]
    assert results.samples_path(path).read_text() == src


# --- outputs never replace inputs ----------------------------------------------------------------------------


def test_export_and_ablate_never_write_over_their_inputs(reference, tmp_path, capfd):
    d = tmp_path / "r"
    d.mkdir()
    path = d / reference.name
    shutil.copy(reference, path)
    shutil.copy(results.samples_path(reference), results.samples_path(path))
    link = d / "link.json"
    link.symlink_to(path)
    data = tmp_path / "data.json"  # JSONL under a .json name: --out could name it
    data.write_text(json.dumps(GOOD) + "\n")
    files = {p: p.read_bytes() for p in (path, results.samples_path(path), data)}
    cases = [
        (["export", path, "--format", "kv", "--out", path], "is an input"),
        (["export", path, "--format", "wu", "--out", results.samples_path(path)], "is an input"),
        (["export", path, "--format", "kv", "--out", link], "is an input"),
        (["ablate", path, "--k", 0, "--out", path], "is an input"),
        (["ablate", path, "--k", 0, "--out", results.samples_path(path)], "must name a .json file"),
        (["ablate", path, "--k", 0, "--out", d / "curve.png"], "must name a .json file"),
        (["ablate", path, "--k", 0, "--out", link], "is an input"),
        (["ablate", path, "--k", 0, "--dataset", data, "--out", data], "is an input"),
    ]
    for args, msg in cases:
        rc, _, err = cli(capfd, *args)
        one_line(rc, err, msg)
    assert {p: p.read_bytes() for p in files} == files
    assert sorted(p.name for p in d.iterdir()) == sorted(["link.json", path.name, results.samples_path(path).name])


def test_ablate_plot_beside_its_json(tiny, reference, tmp_path, capfd):
    """The plot is the JSON's stem + .png: it never replaces the JSON (nor the result)."""
    path = tmp_path / reference.name
    shutil.copy(reference, path)
    rc, _, err = cli(capfd, "ablate", path, "--k", 0, "--random-seeds", 0, "--samples", 1, "--max-new-tokens", 2,
                     "--model", tiny[0],
                     "--out", tmp_path / "curve.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "curve.json").read_text())["summary"][0]["k"] == 0
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results.load_result(path)


def test_report_out_holding_results_is_refused(reference, tmp_path, capfd):
    """A report folder inside the results folder that holds results would silently leave them out."""
    out = tmp_path / "results"
    (out / "summed_attention").mkdir(parents=True)
    shutil.copy(reference, out / "summed_attention" / reference.name)
    for target in (out / "summed_attention", out / "summed_attention" / reference.name):
        rc, _, err = cli(capfd, "report", out, "--out", target, "--resamples", 10)
        one_line(rc, err, "which the report would leave out; choose another --out")
    assert sorted(p.name for p in (out / "summed_attention").iterdir()) == [reference.name]
