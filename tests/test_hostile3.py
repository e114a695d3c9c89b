"""A fifth round of hostile input: a result ablated in another model, an output naming another result, paths
no system call can take (too long, loops of links), chat templates that fail, a tokenizer larger than the
model's vocabulary, answers that run past a model's last position, a relative XDG_CACHE_HOME and a depth of
-0.0. The whole list of cases tried is in docs/reliability.md ("Fifth hostile pass").

Fast: results are built with ``results.make_record``; tiny random models are saved with SmolLM2's tokenizer
and the CLI runs in process.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from conftest import cli, one_line
from retrieval_heads.errors import UserError
from retrieval_heads.io import atomic_write_json
from retrieval_heads.results import make_provenance, make_record, result_path
from test_guards import put


def tokenizer_folder(d, config):
    """A model folder holding ``config`` and SmolLM2's tokenizer files, no weights: enough for sweep's check
    of each model before the lock (config and tokenizer)."""
    from retrieval_heads.models import smollm2_path

    d.mkdir(parents=True)
    for f in smollm2_path().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, d / f.name)
    config.save_pretrained(d)
    return d


def result_of(folder, out, tokens=256):
    """A valid result made, as its provenance says, by the model in ``folder`` (2 x 4 heads)."""
    from retrieval_heads.models import model_identity

    rec = make_record(method="summed_attention", model_key="tiny", model_name=str(folder), question="inc_state",
                      question_prompt="Q", total_tokens=tokens, needle_position=0.5,
                      scores=torch.rand(2, 4, generator=torch.Generator().manual_seed(0)), samples_processed=1,
                      seed=0, dtype="float32", provenance=make_provenance(model_identity(str(folder))))
    path = result_path(out, "summed_attention", "tiny", "inc_state", tokens)
    atomic_write_json(path, rec)
    return path


# --- a result never passes for another model's --------------------------------------------------------------


def test_ablate_refuses_a_model_other_than_the_one_that_made_the_result(tmp_path, capfd, monkeypatch):
    """``ablate R --model OTHER`` with the same head grid removed R's heads from OTHER and filed the curve as
    R's model (model_key and model_name of R): refused before loading. A copy of the folder is the same
    model (same weights' SHA-256) and passes."""
    monkeypatch.setenv("RETRIEVAL_HEADS_CACHE", str(tmp_path / "cache"))  # the weights-hash cache
    a, b = tmp_path / "a", tmp_path / "b"  # the check runs before loading: a config and weights' bytes suffice
    for folder, weights in ((a, b"weights of a"), (b, b"weights of b")):
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(weights)
    path = result_of(a, tmp_path / "res")
    out = tmp_path / "curve.json"
    line = one_line(*cli(capfd, "ablate", path, "--model", b, "--k", 0, 1, "--draws", 0, "--out", out)[::2],
                    f"{path} was made by another model than {b}: weights sha256 ")
    assert "pass the model that made it with --model" in line and not out.exists()
    import retrieval_heads.ablation as ablation

    def loaded(*a, **k):
        raise UserError("would load")

    monkeypatch.setattr(ablation, "load_model", loaded)
    shutil.copytree(a, tmp_path / "copy")
    one_line(*cli(capfd, "ablate", path, "--model", tmp_path / "copy", "--k", 0, 1, "--draws", 0, "--out", out)[::2],
             "would load")
    # where the weights are unknown, the source decides; null fields are not compared
    from retrieval_heads.ablation import other_model

    rec = json.loads(path.read_text())
    rec["provenance"]["model"].update(weights_sha256=None)
    assert "source" in other_model(rec, {"source": "/elsewhere", "revision": None, "weights_sha256": "f" * 64})
    rec["provenance"]["model"].update(source=None)
    assert other_model(rec, {"source": "/elsewhere", "revision": None, "weights_sha256": "f" * 64}) is None


# --- an output never replaces a result ----------------------------------------------------------------------


def test_an_export_or_ablation_never_replaces_another_result(tmp_path, capfd):
    """``export A --out B`` or ``ablate A --out B`` where B is another experiment's result (or its samples or
    attention file) replaced it with a head list or a curve: the result was lost. Refused, B intact; any
    other existing file may still be replaced."""
    a = put(tmp_path / "res", tokens=256)
    b = put(tmp_path / "res", tokens=320, seed=1)
    samples, attention = b.with_suffix(".samples.jsonl"), b.with_suffix(".attention.npz")
    samples.write_text("{}\n")
    attention.write_bytes(b"PK")
    before = {p: p.read_bytes() for p in (b, samples, attention)}
    for target, what in ((b, "a result"), (samples, "a samples file"), (attention, "an attention file")):
        for argv in (["export", a, "--format", "qrhead", "--out", target], ["ablate", a, "--k", 0, "--out", target]):
            if argv[0] == "ablate" and target.suffix != ".json":
                continue  # refused for its suffix already
            one_line(*cli(capfd, *argv)[::2], f"--out {target} holds {what}; an output never replaces one")
    assert {p: p.read_bytes() for p in before} == before
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    rc, _, err = cli(capfd, "export", a, "--format", "qrhead", "--out", other)
    assert rc == 0 and other.read_text().count("-") == 8, err


# --- paths no system call can take --------------------------------------------------------------------------


def test_paths_too_long_or_looping_are_one_line_everywhere(tmp_path, capfd):
    """A 300-character name, a path over PATH_MAX and a loop of symbolic links gave OSError or RuntimeError
    ("Symlink loop") tracebacks wherever ``Path.is_dir`` or ``Path.resolve`` first met them (detect's and
    sweep's model, report's folders, export's and ablate's --out, ablate's RESULT and dataset)."""
    path = put(tmp_path / "res")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    paths = {"long name": tmp_path / ("x" * 300), "long path": tmp_path / "/".join(["d" * 200] * 25),
             "loop": tmp_path / "loop", "under a loop": tmp_path / "loop" / "x"}
    for kind, p in paths.items():
        reason = "a loop of symbolic links" if "loop" in kind else "File name too long"
        for argv in (["detect", "--model", p, "--output-dir", tmp_path / "o"],
                     ["sweep", "--models", p, "--output-dir", tmp_path / "o"],
                     ["report", tmp_path / "res", "--out", p],
                     ["export", path, "--format", "qrhead", "--out", p],
                     ["ablate", path, "--k", 0, "--out", f"{p}.json"],
                     ["ablate", path, "--k", 0, "--dataset", p, "--model", "smollm2"]):
            rc, _, err = cli(capfd, *argv)
            if rc == 2 and "cannot use the path" not in err:  # already refused with a line of its own
                one_line(rc, err)
                continue
            line = one_line(rc, err, "cannot use the path ")
            assert line.endswith(reason) and len(line) < 400, (kind, argv, line)
    assert sorted(os.listdir(tmp_path)) == ["loop", "res"]


# --- model files that do not fit ----------------------------------------------------------------------------

TEMPLATES = {
    "raises": ('{{ raise_exception("boom") }}', "the model's chat template fails: TemplateError: boom"),
    "escapes the sandbox": ("{{ ''.__class__.__mro__ }}", "fails: SecurityError: access to attribute '__class__'"),
    "too big a range": ("{% for i in range(10**9) %}x{% endfor %}", "fails: OverflowError: Range too big"),
    "malformed": ("{% if %}", "fails: TemplateSyntaxError: "),
    "drops the message": ("hello", "does not hold the user's message exactly once"),
    "repeats it": ("{{ messages[0]['content'] }}{{ messages[0]['content'] }}", "exactly once"),
}


def test_a_chat_template_that_fails_is_one_line(tmp_path, capfd):
    """A model folder's chat template (jinja, run in transformers' sandbox) that raises, breaks the sandbox's
    rules, or does not hold the user's message once gave a jinja2 traceback or a ValueError from unpacking;
    no code ever ran (the sandbox), but the line must say what is wrong."""
    from transformers import AutoTokenizer

    from retrieval_heads.data.prompt import PromptFormat
    from retrieval_heads.models import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    assert PromptFormat(tok).chat  # the reference: SmolLM2's own template frames a prompt
    for name, (template, msg) in TEMPLATES.items():
        tok.chat_template = template
        with pytest.raises(UserError, match=re.escape(msg)):
            PromptFormat(tok)
    from transformers import LlamaConfig

    folder = tokenizer_folder(tmp_path / "m", LlamaConfig(vocab_size=49152, num_hidden_layers=1,
                                                                 max_position_embeddings=512))
    (folder / "chat_template.jinja").write_text(TEMPLATES["raises"][0])
    one_line(*cli(capfd, "sweep", "--models", folder, "--tokens", 256, "--samples", 1, "--output-dir",
                  tmp_path / "o")[::2], TEMPLATES["raises"][1])
    assert not (tmp_path / "o").exists()


def test_a_tokenizer_larger_than_the_models_vocabulary_is_one_line(tmp_path, capfd):
    """config.json of a model with a 2-token vocabulary beside SmolLM2's 49,152-token tokenizer: the first
    forward pass raised ``IndexError: index out of range in self``. Refused when the model is checked (sweep
    before the lock) or loaded (detect)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=2, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=1, bos_token_id=0)
    folder = tokenizer_folder(tmp_path / "m", config)
    LlamaForCausalLM(config).save_pretrained(folder)
    msg = f"the tokenizer of '{folder}' has 49152 tokens but the model's embeddings only 2"
    for argv in (["sweep", "--models", folder, "--questions", "inc_state", "--tokens", 256, "--samples", 1],
                 ["detect", "--model", folder, "--question", "inc_state", "--tokens", 256, "--samples", 1]):
        one_line(*cli(capfd, *argv, "--output-dir", tmp_path / "o")[::2], msg)
        assert not (tmp_path / "o").exists()


def test_answers_stop_at_the_models_last_position(smollm2_tokenizer):
    """GPT-2's position embedding ends at n_positions: a prompt near it, answered greedily, indexed past it
    (an IndexError traceback after the scores were computed). Decoding stops at the last position (as
    transformers' generate stops at its max length); ablate, which teacher-forces the gold answer after the
    answer, checks the room before any pass."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from retrieval_heads.ablation import check_room
    from retrieval_heads.data.prompt import PromptSample
    from retrieval_heads.generation import greedy_decode
    from retrieval_heads.models import LoadedModel

    torch.manual_seed(0)
    P, N = 40, 37
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=P)).eval()
    answers, _ = greedy_decode(model, torch.randint(0, 64, (2, N)), 50, lambda ids, tok: False)
    assert [len(a) for a in answers] == [P - N + 1] * 2  # fed at positions N .. P-1, one more predicted
    lm = LoadedModel(model, smollm2_tokenizer, "g", "g")
    prompt = PromptSample(list(range(N)), 2, 5, N - 3, "q", "Delaware")
    with pytest.raises(UserError, match=f"a {N}-token prompt leaves no room for the answers \\(12 tokens with "
                                        f"--max-new-tokens\\) and the gold answer within the {P} positions of g"):
        check_room(lm, [prompt], 12)
    check_room(lm, [PromptSample(list(range(20)), 2, 5, 17, "q", "Delaware")], 12)  # 20 + 12 + gold fit


# --- environment and names ----------------------------------------------------------------------------------


def test_a_relative_xdg_cache_home_is_ignored(tmp_path, monkeypatch):
    """XDG_CACHE_HOME=cache (relative) put the model cache, a 500 MB conversion, under whatever folder the
    command ran in; the XDG spec says a relative path is invalid and is to be ignored."""
    from retrieval_heads.modelcache import user_cache_base

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "cache")
    assert user_cache_base() == str(tmp_path / ".cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_base() == str(tmp_path / "xdg")


def test_a_depth_of_minus_zero_is_filed_as_zero():
    """``--needle-position -0.0`` (it lies in [0, 1]) was filed as ``..._d-0.00.json``, a name no reader parses,
    beside the depth-0 result of the same experiment."""
    from retrieval_heads.results import file_name, parse_file_name

    assert file_name("m", "q", 256, -0.0) == file_name("m", "q", 256, 0.0) == "m_q_256_d0.00.json"
    assert parse_file_name(file_name("m", "q", 256, -0.0)) == ("m_q", 256, 0.0)



# --- a result's key against what made it ---------------------------------------------------------------------

CLAIMS = {  # (model_key, provenance identity, dataset file or None): the contradiction's line
    "builtin_key_other_source": ("smollm2", {"source": "/data/tiny"}, None,
                                 "model_key 'smollm2' is a built-in model, but provenance.model.source is '/data/tiny'"),
    "builtin_source_other_key": ("tiny", {"source": "instruct"}, None,
                                 "provenance.model.source is the built-in model 'instruct', but model_key is 'tiny'"),
    "builtin_question_from_a_dataset": ("tiny", None, "mine.jsonl", "question 'inc_state' is a built-in question, "
                                        "but provenance.dataset says its samples came from 'mine.jsonl'"),
}


@pytest.mark.parametrize("claim", list(CLAIMS))
def test_a_result_claiming_a_builtin_model_or_question_it_was_not_made_with_passes_nowhere(claim, tmp_path, capfd):
    """Fields edited, checksum recomputed and the file renamed to match: a tiny model's result keyed
    ``smollm2``, or a dataset's result keyed as a built-in question, passed for that experiment in report,
    export and ablate (which rebuilds the built-in question's samples for it). Its provenance says otherwise."""
    key, identity, data_file, msg = CLAIMS[claim]
    data = None
    if data_file:
        data = tmp_path / data_file
        data.write_text("{}\n")
    rec = make_record(method="summed_attention", model_key=key, model_name="x", question="inc_state",
                      question_prompt="Q", total_tokens=256, needle_position=0.5, scores=torch.rand(2, 4),
                      samples_processed=1, seed=0, dtype="float32", provenance=make_provenance(identity, data))
    path = result_path(tmp_path / "res", "summed_attention", key, "inc_state", 256)
    atomic_write_json(path, rec)
    for argv in (["report", tmp_path / "res", "--out", tmp_path / "rep"],
                 ["export", path, "--format", "qrhead", "--out", tmp_path / "x.txt"],
                 ["ablate", path, "--k", 0, "--out", tmp_path / "a.json"]):
        one_line(*cli(capfd, *argv)[::2], f"{path}: {msg}")
    assert sorted(os.listdir(tmp_path)) == sorted(["res"] + ([data_file] if data_file else []))
    rec = make_record(method="summed_attention", model_key=key, model_name="x", question="inc_state",
                      question_prompt="Q", total_tokens=256, needle_position=0.5, scores=torch.rand(2, 4),
                      samples_processed=1, seed=0, dtype="float32", provenance=make_provenance(None))
    atomic_write_json(path, rec)  # unknown provenance fields: nothing to contradict
    rc, _, err = cli(capfd, "export", path, "--format", "qrhead")
    assert rc == 0, err


def test_a_linked_folder_in_a_results_folder_is_named_not_left_out(tmp_path, capfd):
    """``report`` reads ``*.json`` below the results folder without following links to folders: the results of
    a linked method folder were left out without a word (all of them: "no result files"; some: a report
    without them). One line names the link; a linked result file is read."""
    put(tmp_path / "elsewhere", tokens=320)
    a = put(tmp_path / "res", tokens=256)
    (tmp_path / "res" / "other").symlink_to(tmp_path / "elsewhere" / "summed_attention")
    one_line(*cli(capfd, "report", tmp_path / "res", "--out", tmp_path / "rep")[::2],
             f"{tmp_path / 'res' / 'other'} is a symbolic link to a folder; the report does not read results")
    assert not (tmp_path / "rep").exists()
    (tmp_path / "res" / "other").unlink()
    (tmp_path / "res" / "summed_attention" / "m_inc_state_320.json").symlink_to(
        tmp_path / "elsewhere" / "summed_attention" / "m_inc_state_320.json")
    rc, out, err = cli(capfd, "report", tmp_path / "res", "--out", tmp_path / "rep")
    assert rc == 0 and "read 2 result(s)" in out and a.exists(), err


# --- SIGTERM ------------------------------------------------------------------------------------------------

TERM_AT_RENAME = """
import os, signal, sys
from retrieval_heads import io as rio
from retrieval_heads.cli import main

class Os:  # SIGTERM to itself when the first temp file is written and synced, before its rename
    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        os.kill(os.getpid(), signal.SIGTERM)
        return os.replace(src, dst)

rio.os = Os()
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # starts other processes
def test_sigterm_mid_write_leaves_nothing_partial_and_keeps_earlier_outputs(tmp_path):
    """``kill PID`` (SIGTERM, what schedulers send) killed a command at once, like SIGKILL: its temp file or
    temp report folder and the lock's pid note stayed until a later run of the same target. It now unwinds as
    Ctrl-C does (exit 143, one line): temp files go, earlier outputs stay."""
    import subprocess
    import sys

    path = put(tmp_path / "res")
    out = tmp_path / "heads.txt"
    out.write_text("earlier export\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for argv in (["export", path, "--format", "qrhead", "--out", out],
                 ["report", tmp_path / "res", "--out", tmp_path / "rep"]):
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        proc = subprocess.run([sys.executable, "-c", TERM_AT_RENAME, *map(str, argv)], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 143 and proc.stderr.strip() == "error: interrupted; finished results are kept", \
            (argv, proc.returncode, proc.stderr[-2000:])
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, argv
        assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")], argv


def test_a_result_without_its_seed_or_dtype_is_not_taken_by_a_sweep():
    """A sweep compared only the settings a result records: a seed-1 result with its ``seed`` (or ``dtype``)
    field deleted and its checksum recomputed was taken as done by a sweep of seed 0. Every result made with
    provenance records both, so a missing one is a mismatch; ``rank_by`` (recorded with the chance fields
    only) is compared where present."""
    from retrieval_heads.sweep import make_grid
    from retrieval_heads.sweep.plan import _settings_mismatch

    record = {"samples_processed": 2, "needle_position": 0.5, "seed": 0, "dtype": "float32"}
    grid = make_grid(samples=2)
    assert _settings_mismatch(record, grid) is None
    for k in ("seed", "dtype"):
        assert _settings_mismatch({x: v for x, v in record.items() if x != k}, grid) == \
            f"{k} 'missing' (this sweep: {getattr(grid, k)!r})"


def test_a_results_folder_named_in_other_bytes_than_utf8_reports(tmp_path, capfd):
    """A result in a folder whose name is not UTF-8 (bytes 0xff 0xfe, as a Latin-1 system writes them): the
    report, which shows each file's path, stopped with ``UnicodeEncodeError: surrogates not allowed``
    when writing report.md. Such bytes are now written as ``\\udcff``."""
    src = put(tmp_path / "elsewhere")
    folder = tmp_path / "res" / os.fsdecode(b"run-\xff\xfe")
    folder.mkdir(parents=True)
    shutil.copy(src, folder / src.name)
    rc, _, err = cli(capfd, "report", tmp_path / "res", "--out", tmp_path / "rep")
    assert rc == 0, err
    assert "run-\\udcff\\udcfe/m_inc_state_256.json" in (tmp_path / "rep" / "report.md").read_text()
    assert "run-\\udcff\\udcfe" in (tmp_path / "rep" / "report.html").read_text()


def test_a_byte_order_mark_is_not_data(tmp_path, capfd):
    """A UTF-8 byte-order mark, as Windows editors write one, at the start of a result, a samples file, a
    dataset or a grid file (JSON or TOML) was refused (``Unexpected UTF-8 BOM``; TOML: ``Invalid statement``,
    not naming it). It is dropped; anything else stays as strict as before."""
    from retrieval_heads.data.dataset import load_jsonl
    from retrieval_heads.io import JSONError, parse_json
    from retrieval_heads.sweep.grid import load_grid_file

    bom = b"\xef\xbb\xbf"
    assert parse_json(bom + b'{"a": 1}') == parse_json('\ufeff{"a": 1}') == {"a": 1}
    with pytest.raises(JSONError):
        parse_json(b'{"a": 1}' + bom)  # only a leading one
    path = put(tmp_path / "res")
    path.write_bytes(bom + path.read_bytes())
    rc, out, err = cli(capfd, "export", path, "--format", "qrhead")
    assert rc == 0 and out.count("-") == 8, err
    record = {"needle": "The company is incorporated in Delaware.", "question": "Where?", "answer": "Delaware",
              "haystack": "Words. " * 20}
    (tmp_path / "d.jsonl").write_bytes(bom + (json.dumps(record) + "\n").encode())
    assert load_jsonl(tmp_path / "d.jsonl")[0].answer == "Delaware"
    (tmp_path / "g.toml").write_bytes(bom + b'models = ["smollm2"]\ntokens = [256]\n')
    (tmp_path / "g.json").write_bytes(bom + b'{"models": ["smollm2"], "tokens": [256]}')
    assert load_grid_file(tmp_path / "g.toml") == load_grid_file(tmp_path / "g.json") == \
        {"models": ["smollm2"], "tokens": [256]}


def test_a_folder_where_a_sweep_writes_a_result_is_found_before_any_work(tmp_path):
    """``OUT/summed_attention/m_q_256.json/`` a folder: the sweep counted the result as corrupt, computed it,
    and only then failed to write it (``Is a directory``). The lock, which knows every file the sweep may
    write, now names it before anything is computed, and leaves no note."""
    from retrieval_heads.lock import results_lock

    out = tmp_path / "res"
    target = out / "summed_attention" / "m_q_256.json"
    target.mkdir(parents=True)
    own = [target, target.with_suffix(".samples.jsonl")]
    with pytest.raises(UserError, match=f"^{re.escape(str(target))} is a folder where a result file goes"):
        with results_lock(out, "sweep", own):
            pass
    assert sorted(p.name for p in out.rglob("*")) == ["m_q_256.json", "summed_attention"]
    target.rmdir()
    with results_lock(out, "sweep", own):  # the reference: a missing file is fine
        pass


@pytest.mark.slow  # two ablations on a tiny model, a few seconds
def test_an_ablation_on_a_dataset_names_the_dataset(tmp_path):
    """``ablate R --dataset D`` measured on D's samples whatever R was made from (a synthetic result, or
    another dataset's), and the curve did not say which file: it passed for an ablation on R's own samples.
    The record now names the file and its SHA-256, as it records the seed of synthetic samples."""
    import hashlib

    from conftest import tiny_smol_lm
    from retrieval_heads.ablation import ablate

    lm = tiny_smol_lm(layers=2, positions=1024)
    record = make_record(method="summed_attention", model_key="tiny", model_name="tiny", question="inc_state",
                         question_prompt="Q", total_tokens=300, needle_position=0.5,
                         scores=torch.rand(2, 4, generator=torch.Generator().manual_seed(0)), samples_processed=1,
                         seed=0, dtype="float32")
    data = tmp_path / "held_out.jsonl"
    data.write_text(json.dumps({"needle": "The company is incorporated in the State of Delaware.", "question":
                                "In what state is the company incorporated?", "answer": "Delaware",
                                "haystack": "The report covers revenue and costs. " * 60}) + "\n")
    got = ablate(record, lm, ks=(0, 1), random_seeds=0, dataset=data, max_new_tokens=2).record
    assert got["dataset"] == {"file": "held_out.jsonl", "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    assert "dataset" not in ablate(record, lm, ks=(0,), random_seeds=0, max_new_tokens=2).record


@pytest.mark.parametrize("impl", ["evilorg/evil-kernel", "kernels-community/flash-attn2", "flash_attention_2"])
def test_a_config_naming_a_hub_kernel_runs_no_code_unasked(impl, tmp_path, capfd):
    """config.json's ``attn_implementation`` naming a hub kernel (``org/kernel``), or ``flash_attention_2``
    (transformers fetches ``kernels-community/flash-attn2`` where the package is missing): transformers
    downloaded and loaded native code from the hub without --trust-remote-code (online, from publishers the
    hub trusts; offline, from the local cache with no publisher check at all). Refused before any file is
    loaded unless --trust-remote-code; torch's own implementations pass."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, num_hidden_layers=1, max_position_embeddings=512)
    folder = tokenizer_folder(tmp_path / "m", config)
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(saved, attn_implementation=impl)))
    msg = f"the config.json of '{folder}' asks for attention implementation '{impl}', whose code comes from the hub"
    for argv in (["sweep", "--models", folder, "--questions", "inc_state", "--tokens", 256, "--samples", 1],
                 ["detect", "--model", folder, "--question", "inc_state", "--tokens", 256, "--samples", 1]):
        one_line(*cli(capfd, *argv, "--output-dir", tmp_path / "o")[::2], msg)
        assert not (tmp_path / "o").exists()
    from retrieval_heads.hf import check_attention_code

    config._attn_implementation = impl
    check_attention_code("m", config, trust_remote_code=True)  # asked for: allowed
    for ok in ("eager", "sdpa", None):
        config._attn_implementation = ok
        check_attention_code("m", config, trust_remote_code=False)


def test_a_bootstrap_too_large_for_memory_is_one_line(tmp_path, capfd):
    """A result of a 300 x 300 head grid with a samples file and ``report --resamples 100000`` (the option's
    maximum) asked numpy for 3 x 67 GiB at once: a MemoryError traceback, or, on a larger machine, its whole
    memory. Checked before anything is allocated; the line names the largest --resamples that fits."""
    import numpy as np

    from retrieval_heads.report.stability import bootstrap_ranks

    with pytest.raises(UserError, match="^--resamples 100000 over 2 samples of 90000 heads needs about 201 GiB; "
                                        "use --resamples 1988 or fewer$"):
        bootstrap_ranks(np.zeros((2, 300, 300)), 100_000)
    assert bootstrap_ranks(np.zeros((2, 3, 4)), 10_000).shape == (10_000, 12)  # a small grid: allowed
    path = put(tmp_path / "res", layers=100, heads=100, scores=np.zeros((100, 100)))
    path.with_suffix(".samples.jsonl").write_text(
        "".join(json.dumps({"scores": np.zeros((100, 100)).tolist()}) + "\n" for _ in range(4)))
    one_line(*cli(capfd, "report", tmp_path / "res", "--out", tmp_path / "rep", "--resamples", 100_000)[::2],
             "--resamples 100000 over 4 samples of 10000 heads needs about 22 GiB; use --resamples 17893 or fewer")
    assert not (tmp_path / "rep").exists()


def test_end_of_sequence_ids_of_odd_types_are_not_ids():
    """generation_config.json (the model folder's own file, which transformers does not type-check) with
    ``"eos_token_id": [[1, 2]]`` made ``detect --answers`` end in ``TypeError: unhashable type: 'list'``.
    Only whole numbers count as end-of-sequence ids."""
    from types import SimpleNamespace

    from retrieval_heads.generation import eos_ids

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[[1, 2], 7, True, "x"]),
                            config=SimpleNamespace(eos_token_id=3))
    assert eos_ids(model, SimpleNamespace(eos_token_id=None)) == {3, 7}
