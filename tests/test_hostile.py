"""Hostile files and folders: a result renamed to another experiment's name, a samples file of another run,
a method folder that is a link to elsewhere, and FIFOs or devices where a file is read.

Everything runs on a tiny random Llama saved with SmolLM2's tokenizer, through the real CLI in process.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import cli, one_line, save_tiny
from retrieval_heads import io as rio, models, results
from retrieval_heads.errors import UserError
from retrieval_heads.sweep import make_grid, run_sweep

QS, TS = ["inc_state", "hq_state"], [256, 320]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = save_tiny(tmp_path_factory.mktemp("models") / "tiny")
    return d, models.load_model(str(d))


def sweep(tiny, out, **kw):
    lines = []
    g = make_grid(models=[str(tiny[0])], questions=QS, tokens=TS, samples=2, save_samples=True, **kw)
    s = run_sweep(g, out, load=lambda m, **k: tiny[1], progress=False, echo=lines.append)
    return s, lines


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """A sweep folder of 2 questions x 2 lengths, with samples files."""
    out = tmp_path_factory.mktemp("reference")
    s, _ = sweep(tiny, out)
    assert len(s.done) == 4
    return out


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# (from, to): a result (with its samples file) copied over another experiment's name
RENAMES = {"other_length": ("tiny_inc_state_256", "tiny_inc_state_320"),
           "other_question": ("tiny_hq_state_256", "tiny_inc_state_256")}


@pytest.mark.parametrize("rename", list(RENAMES))
def test_a_result_under_another_experiments_name_passes_nowhere(rename, tiny, reference, tmp_path, capfd):
    """Valid, unedited, checksum intact, but filed under another experiment's name: sweep stops without
    trusting or replacing it, report, export and ablate stop with one line naming the file."""
    src, dst = RENAMES[rename]
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    folder = out / "summed_attention"
    for ext in (".json", ".samples.jsonl"):
        shutil.copy(folder / f"{src}{ext}", folder / f"{dst}{ext}")
    path = folder / f"{dst}.json"
    before = tree(out)
    with pytest.raises(UserError, match="the file name names another experiment than its fields"):
        results.load_result(path)
    with pytest.raises(UserError, match=f"{dst}.json: the file name names another experiment.*move it away"):
        sweep(tiny, out)
    for args in (["report", out, "--out", tmp_path / "rep", "--resamples", 10],
                 ["export", path, "--format", "qrhead"],
                 ["export", path, "--format", "wu"],
                 ["ablate", path, "--model", tiny[0], "--k", 0, "--random-seeds", 0, "--out", tmp_path / "a.json"]):
        rc, stdout, err = cli(capfd, *args)
        line = one_line(rc, err, "names another experiment than its fields")
        assert str(path) in line and f"summed_attention/{src}.json" in line and stdout == "", args
    assert not (tmp_path / "rep").exists() and not (tmp_path / "a.json").exists()
    assert tree(out) == before  # nothing replaced, nothing added (the lock note is gone)


def test_result_in_another_methods_folder_and_user_names(tiny, reference, tmp_path, capfd):
    """A result in the folder of another method is refused; a name of the user's own shape (best.json) or a
    folder not named like a method is accepted."""
    src = reference / "summed_attention" / "tiny_inc_state_256.json"
    wrong = tmp_path / "w" / "query_focused" / src.name
    wrong.parent.mkdir(parents=True)
    shutil.copy(src, wrong)
    rc, _, err = cli(capfd, "export", wrong, "--format", "qrhead")
    one_line(rc, err, "lies in the folder of method 'query_focused'")
    rc, _, err = cli(capfd, "report", tmp_path / "w", "--out", tmp_path / "rep")
    one_line(rc, err, "lies in the folder of method 'query_focused'")
    mine = tmp_path / "mine" / "best.json"
    mine.parent.mkdir()
    shutil.copy(src, mine)
    want = cli(capfd, "export", src, "--format", "qrhead")
    assert want[0] == 0 and cli(capfd, "export", mine, "--format", "qrhead") == want


def test_export_wu_refuses_a_samples_file_of_another_run(tiny, reference, tmp_path, capfd):
    """A samples file of the right shape and row count but of another experiment (left over, copied)."""
    folder = reference / "summed_attention"
    path = tmp_path / "best.json"
    shutil.copy(folder / "tiny_inc_state_256.json", path)
    shutil.copy(folder / "tiny_inc_state_256.samples.jsonl", results.samples_path(path))
    rc, good, _ = cli(capfd, "export", path, "--format", "wu")
    assert rc == 0 and len(json.loads(good)["0-0"]) == 2
    shutil.copy(folder / "tiny_hq_state_320.samples.jsonl", results.samples_path(path))
    rc, stdout, err = cli(capfd, "export", path, "--format", "wu", "--out", tmp_path / "wu.json")
    one_line(rc, err, "does not add up to its result's scores")
    assert stdout == "" and not (tmp_path / "wu.json").exists()


@pytest.mark.parametrize("command", ["sweep", "detect"])
def test_a_method_folder_that_is_a_link_is_never_written_through(command, tiny, tmp_path, capfd):
    """OUT/summed_attention -> elsewhere: refused before any work (no progress bar), nothing lands there."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / ".x.json.rh-abcdefgh.tmp").write_text("not the sweep's")  # its clean-up must not reach here
    os.symlink(elsewhere, out / "summed_attention")
    args = (["sweep", "--models", tiny[0], "--questions", "inc_state", "--tokens", 256, "--no-progress"]
            if command == "sweep" else ["detect", "--model", tiny[0], "--question", "inc_state", "--tokens", 256])
    rc, stdout, err = cli(capfd, *args, "--samples", 1, "--output-dir", out)
    one_line(rc, err, f"{out / 'summed_attention'} is a symbolic link")
    assert sorted(p.name for p in elsewhere.iterdir()) == [".x.json.rh-abcdefgh.tmp"]
    assert sorted(p.name for p in out.iterdir()) == ["summed_attention"]
    with pytest.raises(UserError, match="is a symbolic link"):
        from retrieval_heads.experiments import write_result

        write_result(out, {"method": "summed_attention", "model_key": "m", "question": "q", "total_tokens": 256,
                           "needle_position": 0.5},
                     [], None, False)  # the one writer of detect and sweep checks again


def test_fifos_and_devices_are_refused_before_reading(tiny, reference, tmp_path, capfd):
    """A FIFO would block the reader and /dev/zero fill the memory: samples file (report, export), result
    (export), dataset (detect) and grid file (sweep) are refused as not regular files, at once."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    folder = out / "summed_attention"
    sam = folder / "tiny_inc_state_256.samples.jsonl"
    sam.unlink()
    os.mkfifo(sam)
    rc, _, err = cli(capfd, "report", out, "--out", tmp_path / "rep", "--resamples", 10)
    one_line(rc, err, f"cannot read samples file {sam}: not a regular file")
    sam.unlink()
    os.symlink("/dev/zero", sam)
    rc, _, err = cli(capfd, "report", out, "--out", tmp_path / "rep", "--resamples", 10)
    one_line(rc, err, "not a regular file")
    fifo = tmp_path / "r_1.json"
    os.mkfifo(fifo)
    rc, _, err = cli(capfd, "export", fifo, "--format", "kv")
    one_line(rc, err, f"cannot read result {fifo}: not a regular file")
    rc, _, err = cli(capfd, "detect", "--model", tiny[0], "--tokens", 256, "--samples", 1, "--dataset", "/dev/zero",
                     "--output-dir", tmp_path / "d")
    one_line(rc, err, "cannot read dataset /dev/zero: not a regular file")
    rc, _, err = cli(capfd, "sweep", "--models", tiny[0], "--config", fifo, "--output-dir", tmp_path / "s")
    one_line(rc, err, f"cannot read grid file {fifo}: not a regular file")
    assert not (tmp_path / "rep").exists() and not (tmp_path / "d").exists() and not (tmp_path / "s").exists()
    with pytest.raises(OSError, match="not a regular file"):
        rio.read_regular("/dev/null")
    assert rio.read_regular(folder / "tiny_hq_state_256.json") == (folder / "tiny_hq_state_256.json").read_bytes()


def _other_family(d):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_embd=64, n_layer=2, n_head=4, n_positions=512)).save_pretrained(d / "g")
    shutil.copy(d / "g" / "model.safetensors", d / "model.safetensors")


def _layer_dropped(d):
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "layers.1." not in k}, d / "model.safetensors", metadata={"format": "pt"})


def _config_more_layers(d):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))


WEIGHTS = {"other_family": (_other_family, "lm_head.weight"), "layer_dropped": (_layer_dropped, "model.layers.1."),
           "config_more_layers": (_config_more_layers, "model.layers.2.")}


@pytest.mark.parametrize("damage", list(WEIGHTS))
def test_weights_that_do_not_fill_the_configs_model_are_refused(damage, tiny, tmp_path, capfd):
    """transformers fills missing tensors with random numbers; a random model's heads must not be scored as
    the folder's model (detect and sweep)."""
    edit, example = WEIGHTS[damage]
    d = tmp_path / "m"
    shutil.copytree(tiny[0], d)
    edit(d)
    for args in (["detect", "--model", d, "--tokens", 256, "--samples", 1, "--output-dir", tmp_path / "o"],
                 ["sweep", "--models", d, "--questions", "inc_state", "--tokens", 256, "--samples", 1,
                  "--output-dir", tmp_path / "o", "--no-progress"]):
        rc, stdout, err = cli(capfd, *args)
        line = one_line(rc, err, "weights and config.json do not belong together")
        assert example in line, line
    assert not (tmp_path / "o").exists()
