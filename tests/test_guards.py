"""Guards against a third round of hostile input: the results-dir lock held by every writer, results of
other weights or head grids under one model key, attention files that lie about their size, extreme scores,
full disks, leftovers of killed processes, bad strings and sizes, and things that would hang.

Fast tests build results with ``results.make_record`` (no model); those that run a model are marked slow.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, one_line
from retrieval_heads.errors import UserError
from retrieval_heads.io import atomic_write_json
from retrieval_heads.lock import LOCK_NAME, results_lock, writing_into
from retrieval_heads.results import make_provenance, make_record, result_path


def put(root, *, model="m", tokens=256, layers=2, heads=4, seed=0, identity=None, extra=None, scores=None,
        method="summed_attention", question="inc_state", added=None):
    """A result where detect would write it; scores from ``seed`` unless given."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(layers, heads, generator=g, dtype=torch.float64) if scores is None else \
        torch.tensor(scores, dtype=torch.float64)
    rec = make_record(method=method, model_key=model, model_name=f"org/{model}", question=question,
                      question_prompt=question, total_tokens=tokens, needle_position=0.5, scores=grid,
                      samples_processed=4, seed=0, dtype="float32", extra=extra,
                      provenance=make_provenance(identity), added=added)
    path = result_path(root, method, model, question, tokens)
    atomic_write_json(path, rec)
    return path


def files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# --- the results-dir lock ------------------------------------------------------------------------------------


def test_every_writer_refuses_a_results_dir_a_sweep_holds(tmp_path, capfd):
    """While a sweep holds OUT, detect, export, ablate and report into OUT stop with one line naming the sweep's
    pid, before loading anything, and write nothing."""
    out = tmp_path / "res"
    path = put(out)
    before = files(out)
    busy = f"another sweep (pid {os.getpid()}) is running on {out}"
    with results_lock(out, "sweep"):
        for argv in (["detect", "--output-dir", out, "--tokens", 256, "--samples", 1],
                     ["export", path, "--format", "qrhead", "--out", out / "summed_attention" / "x.txt"],
                     ["export", path, "--format", "qrhead", "--out", out / "x.txt"],
                     ["ablate", path],
                     ["report", out]):
            one_line(*cli(capfd, *argv)[::2], busy)
            assert files(out) == sorted(before + [LOCK_NAME]), argv
    assert files(out) == before


def test_detect_holds_the_lock_and_writers_take_their_folders(tmp_path, capfd):
    out = tmp_path / "res"
    path = put(out)
    with results_lock(out, "detect"):  # what detect holds while it runs
        one_line(*cli(capfd, "report", out)[::2], f"another detect (pid {os.getpid()}) is running on {out}")
        with pytest.raises(UserError, match=f"another detect \\(pid {os.getpid()}\\)"):
            with results_lock(out, "sweep"):
                pass
    target = out / "summed_attention" / "x.txt"
    with writing_into(target), writing_into(out / "other" / "y.txt"):  # two folders of OUT at once: fine
        with pytest.raises(UserError, match=f"another retrieval-heads command \\(pid \\?\\) is running on {out}"):
            with results_lock(out, "sweep"):
                pass
        rc, _, err = cli(capfd, "detect", "--output-dir", out, "--tokens", 256, "--samples", 1)
        one_line(rc, err, f"running on {out}")
        with pytest.raises(UserError, match=f"running on {target.parent}"):  # one folder: one writer at a time
            with writing_into(out / "summed_attention" / "y.txt"):
                pass
    rc, _, err = cli(capfd, "export", path, "--format", "qrhead", "--out", target)
    assert rc == 0 and target.read_text().count("-") == 8, err  # all 8 heads


def test_a_full_disk_at_the_lock_note_is_one_line_and_leaves_no_empty_note(tmp_path, monkeypatch):
    out = tmp_path / "res"
    out.mkdir()
    real_write = os.write

    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(LOCK_NAME):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(UserError, match=f"cannot write {out / LOCK_NAME}: No space left on device"):
        with results_lock(out, "sweep"):
            pass
    monkeypatch.undo()
    assert files(out) == []
    with results_lock(tmp_path / "new" / "res", "sweep"):  # folders it made go too
        pass
    assert not (tmp_path / "new").exists()


# --- one model key, one model ---------------------------------------------------------------------------------

A = {"source": "org/tiny-a", "revision": None, "weights_sha256": "a" * 64}
B = {"source": "org/tiny-b", "revision": None, "weights_sha256": "b" * 64}


def test_results_of_other_weights_under_one_key_are_refused(tmp_path, capfd):
    """Two results keyed ``tiny`` from different weights would be compared between lengths as one model."""
    out = tmp_path / "res"
    a = put(out, model="tiny", tokens=256, identity=A)
    b = put(out, model="tiny", tokens=320, identity=B, seed=1)
    line = one_line(*cli(capfd, "report", out)[::2], "are both model 'tiny' but were made with different weights")
    assert str(a) in line and str(b) in line and "org/tiny-a vs org/tiny-b" in line
    assert not (out / "report").exists()
    put(out, model="tiny", tokens=320, identity=dict(A, source=None), seed=1)  # unknown fields are not compared
    rc, _, err = cli(capfd, "report", out)
    assert rc == 0, err


def test_results_with_other_head_grids_under_one_key_are_one_line(tmp_path, capfd):
    out = tmp_path / "res"
    a = put(out, model="tiny", tokens=256, layers=2, heads=4)
    b = put(out, model="tiny", tokens=320, layers=3, heads=4)
    line = one_line(*cli(capfd, "report", out)[::2], "have different head grids (2x4 and 3x4 layers x heads)")
    assert str(a) in line and str(b) in line and not (out / "report").exists()


# --- attention files that lie about their size ----------------------------------------------------------------


def attention_bytes(record, tokenizer, length=16, heads=2):
    """A valid attention file for ``record`` (its samples_processed prompts of ``length`` tokens)."""
    from retrieval_heads.attention import pack
    from retrieval_heads.data.prompt import PromptSample

    S = record["samples_processed"]
    prompts = [PromptSample(list(range(100, 100 + length)), 2, 5, length - 3, "q", "") for _ in range(S)]
    g = torch.Generator().manual_seed(1)
    return pack(record, prompts, [torch.rand(heads, length, generator=g) for _ in range(S)], tokenizer)


def with_member(data: bytes, name: str, member: bytes) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as z, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as w:
        for info in z.infolist():
            w.writestr(info, member if info.filename == name else z.read(info))
    return buf.getvalue()


def test_attention_files_that_lie_about_their_size_are_one_line(tmp_path, smollm2_tokenizer, capfd):
    import io
    import json
    import zipfile

    from retrieval_heads.attention import attention_path, loads

    path = put(tmp_path / "res", tokens=16)
    record = json.loads(path.read_text())
    good = attention_bytes(record, smollm2_tokenizer)
    assert loads(good, "f", record).samples == 4  # the reference: a valid file loads
    # a header claiming (3, 2**40) bytes over a few real ones: refused before anything is allocated
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": (3, 2 ** 40)})
    with pytest.raises(UserError, match="not a valid attention file .*claims shape \\(3, 1099511627776\\)"):
        loads(with_member(good, "rows.npy", head.getvalue() + b"\0" * 64), "f")
    # a flipped deflate stream (0xFF: a reserved block type): zlib's error becomes the line
    raw = bytearray(good)
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        info = z.getinfo("rows.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start] = 0xFF
    with pytest.raises(UserError, match="not a valid attention file \\(Error -3 while decompressing"):
        loads(bytes(raw), "f")
    # prompts far longer than the result's: refused against the result before reading (the report stops)
    from retrieval_heads.report.collect import collect
    from retrieval_heads.report.explorer import payload

    attention_path(path).write_bytes(attention_bytes(record, smollm2_tokenizer, length=1000))
    with pytest.raises(UserError, match="not a valid attention file \\(4000 tokens, more than the result's 4 "
                                        "samples of 16 tokens\\)"):
        payload(collect(tmp_path / "res"))


# --- finite but extreme scores --------------------------------------------------------------------------------

BIG = 1.7e308  # finite; the sum (or difference) of two overflows


def test_extreme_finite_scores_report_and_export_as_valid_json(tmp_path, capfd):
    from retrieval_heads.io import parse_json

    out = tmp_path / "res"
    a = put(out, scores=[[BIG, BIG, 0, 1], [2, 3, 4, 5]], extra={"num_key_value_heads": 2})
    put(out, tokens=320, scores=[[BIG, -BIG, 0, 1], [2, 3, 4, -BIG]])
    rc, _, err = cli(capfd, "export", a, "--format", "kv", "--out", tmp_path / "kv.json")
    assert rc == 0, err
    view = parse_json((tmp_path / "kv.json").read_bytes())  # the strict reader: Infinity would be refused
    assert view["mean"] == [[BIG, 0.5], [2.5, 4.5]] and view["max"] == [[BIG, 1.0], [3.0, 5.0]]
    rc, _, err = cli(capfd, "report", out, "--resamples", 10)
    assert rc == 0 and err == "", err
    data = parse_json((out / "report" / "report.json").read_bytes())
    assert isinstance(data["length_pairs"][0]["spearman"], float)  # the pair is compared, not skipped


# --- the model cache -------------------------------------------------------------------------------------------


def test_a_truncated_cached_model_is_converted_again(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from retrieval_heads import models
    from retrieval_heads.modelcache import safetensors_problem

    monkeypatch.setenv("RETRIEVAL_HEADS_CACHE", str(tmp_path))
    target = tmp_path / models.CONVERTED
    target.mkdir()
    (target / "config.json").write_text("{}")
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(target / "model.safetensors"))
    whole = (target / "model.safetensors").read_bytes()
    assert safetensors_problem(target / "model.safetensors") is None
    converted = []
    monkeypatch.setattr(models, "_convert", lambda t: converted.append(t))
    assert models.smollm2_path() == target and converted == []  # whole: used as it is
    (target / "model.safetensors").write_bytes(whole[:-100])
    assert safetensors_problem(target / "model.safetensors") == f"{len(whole) - 100} bytes where its tensors need " \
                                                                f"{len(whole)} (truncated?)"
    assert models.smollm2_path() == target and converted == [target]  # truncated: converted again


def test_a_full_cache_disk_during_conversion_is_one_line(tmp_path):
    from safetensors import SafetensorError

    from retrieval_heads.models import _cache_errors

    with pytest.raises(UserError, match=f"^cannot write the model cache {tmp_path}: No space left on device \\(set "):
        with _cache_errors(tmp_path):  # what safetensors raises when a save_pretrained runs out of space
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')


def test_an_empty_home_never_means_the_root_cache(monkeypatch):
    import pwd

    from retrieval_heads.models import cache_dir

    monkeypatch.delenv("RETRIEVAL_HEADS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for home in ("", "/"):
        monkeypatch.setenv("HOME", home)
        assert cache_dir() == Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "retrieval-heads" != \
            Path("/.cache/retrieval-heads")
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: type("P", (), {"pw_dir": "/"}))
    with pytest.raises(UserError, match="HOME is empty or /, so there is no user cache folder; set "
                                        "RETRIEVAL_HEADS_CACHE"):
        cache_dir()


def test_a_fifo_at_the_hash_cache_is_not_read(tmp_path, monkeypatch):
    import threading

    from retrieval_heads import models

    monkeypatch.setenv("RETRIEVAL_HEADS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    os.mkfifo(tmp_path / "cache" / models.HASH_CACHE)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"abc")
    got = []
    worker = threading.Thread(target=lambda: got.append(models._file_sha256(weights)), daemon=True)
    worker.start()
    worker.join(10)  # a blocking read of the FIFO would never return
    assert got == ["ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"]  # sha256("abc")


# --- strings that are not text, and things that would hang -------------------------------------------------------


def test_a_lone_surrogate_in_a_dataset_names_its_field(tmp_path):
    from retrieval_heads.data.dataset import load_jsonl

    data = tmp_path / "d.jsonl"
    good = '{"needle": "It is incorporated in Delaware.", "haystack": "x", "question": "q?", "answer": "Delaware"}'
    for field, line in (("needle", good.replace("in Delaware", "in Dela\\ud800ware")),
                        ("haystack", good.replace('"x"', '["y", "x\\udfff"]')),
                        ("answer", good.replace('"Delaware"}', '"Dela\\ud800"}'))):
        data.write_text(good + "\n" + line + "\n")
        with pytest.raises(UserError, match=f"^{data}:2: field '{field}' holds a lone surrogate "):
            load_jsonl(data, warn=lambda m: None)
    data.write_text(good.replace("in Delaware", "in Dela\\u00e9ware \\ud83d\\ude00") + "\n")  # a pair is text
    assert load_jsonl(data)[0].needle == "It is incorporated in Delaéware 😀."


def test_many_needle_positions_are_checked_in_linear_time():
    import time

    from retrieval_heads.sweep import check_depths

    depths = [i / 100_000 for i in range(80_000)]
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="must lie in \\[0, 1\\], got 1.5"):
        check_depths(depths + [1.5])
    with pytest.raises(UserError, match="depth 0.5 is given twice"):
        check_depths(depths + [0.5])
    assert check_depths(depths) == tuple(depths)
    assert time.perf_counter() - t0 < 5  # the quadratic check took minutes


def test_a_ray_address_that_accepts_but_never_answers_fails_fast():
    import socket
    import threading
    import time

    from retrieval_heads.sweep.ray import reachable

    def serve(answer: bytes | None):
        server = socket.create_server(("127.0.0.1", 0))
        def run():
            conn, _ = server.accept()
            conn.recv(64)
            if answer is not None:
                conn.sendall(answer)
            time.sleep(2)
            conn.close()
        threading.Thread(target=run, daemon=True).start()
        return f"127.0.0.1:{server.getsockname()[1]}"

    t0 = time.perf_counter()
    with pytest.raises(UserError, match="accepted a connection but did not answer within 0.3 s"):
        reachable(serve(None), timeout=0.3)
    assert time.perf_counter() - t0 < 2
    with pytest.raises(UserError, match="answered, but not as a Ray head"):
        reachable(serve(b"HTTP/1.1 400 Bad Request\r\n\r\n"), timeout=2)
    reachable(serve(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])), timeout=2)  # an HTTP/2 server's SETTINGS frame: a gRPC head


# --- what a killed writer leaves ----------------------------------------------------------------------------------


def test_a_killed_exports_temp_file_is_removed_by_the_next_export(tmp_path, capfd):
    out = tmp_path / "res"
    path = put(out)
    target = tmp_path / "x.txt"
    stale = tmp_path / ".x.txt.rh-k2x_9a0b.tmp"  # what io.atomic_write_bytes leaves when killed before its rename
    stale.write_text("half")
    mine = [tmp_path / ".notes.tmp", tmp_path / ".y.txt.rh-k2x_9a0b.tmp"]  # a user's file; another target's temp
    for p in mine:
        p.write_text("keep")
    rc, _, err = cli(capfd, "export", path, "--format", "qrhead", "--out", target)
    assert rc == 0, err
    assert not stale.exists() and all(p.read_text() == "keep" for p in mine)


def test_a_report_folder_is_never_missing(tmp_path, monkeypatch):
    """The earlier report and the new one swap names in one step: a kill at any point leaves a report at its
    name. Where the swap is not offered and a kill leaves the folder moved aside, the next run restores it."""
    import importlib

    from retrieval_heads.leftovers import folder_temps, recover_folder

    build = importlib.import_module("retrieval_heads.report.build")  # the module (the package exports a function)

    def report(folder, text):
        folder.mkdir()
        (folder / "report.html").write_text(text)
        return folder

    out = report(tmp_path / "report", "earlier")
    new = report(tmp_path / ".report.abcd1234.tmp", "new")
    real_replace = os.replace

    def killed_after_moving_aside(src, dst):  # a SIGKILL right after the earlier report is moved aside
        real_replace(src, dst)
        if ".old." in str(dst):
            raise KeyboardInterrupt

    monkeypatch.setattr(build.os, "replace", killed_after_moving_aside)
    monkeypatch.setattr(build.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed just after the swap, before the earlier copy is removed
        build._move_into_place(new, out)
    monkeypatch.undo()
    assert (out / "report.html").read_text() == "new"
    assert recover_folder(out) is False and sorted(os.listdir(tmp_path)) == ["report"]
    # the fallback's kill: the earlier report moved aside, the folder missing; the next run puts it back
    aside = tmp_path / ".report.old.zz_9y8x7.tmp"
    real_replace(out, aside)
    report(tmp_path / ".report.qq_1w2e3.tmp", "half")
    assert folder_temps(out) == ([tmp_path / ".report.qq_1w2e3.tmp"], [aside])
    assert recover_folder(out) is True
    assert (out / "report.html").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["report"]


# --- result fields that go into report.md ------------------------------------------------------------------------


def test_markup_in_result_fields_never_reaches_the_report(tmp_path):
    from retrieval_heads.report.collect import collect
    from retrieval_heads.report.tables import retrieval_row

    lift = [[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]]
    good = {"alpha": 0.05, "heads": [{"head": "L0H3"}, {"head": "L0H2"}]}
    cases = [(dict(n_correct='<img src=x onerror=alert(1)>', n_answered=4), good,
              "extra.n_correct is not a whole number >= 0 (<img src=x onerror=alert(1)>)"),
             (dict(n_correct=3, n_answered=True), good, "extra.n_answered is not a whole number >= 0 (True)"),
             (dict(n_correct=3, n_answered=4), {"alpha": 0.05, "heads": [{"head": "<b>L0H3</b>"}]},
              "significance names '<b>L0H3</b>', not a head of its 2x4 grid"),
             (dict(n_correct=3, n_answered=4), {"alpha": 0.05, "heads": [{"head": "L7H0"}]},
              "significance names 'L7H0', not a head of its 2x4 grid")]
    for i, (extra, sig, msg) in enumerate(cases):
        root = tmp_path / str(i)
        path = put(root, extra=extra, added={"lift": lift, "significance": sig})
        e = collect(root).experiments[0]
        with pytest.raises(UserError) as err:
            retrieval_row(e)
        assert str(err.value) == f"{path}: {msg}"
    root = tmp_path / "fine"
    put(root, extra=dict(n_correct=3, n_answered=4), added={"lift": lift, "significance": good})
    row = retrieval_row(collect(root).experiments[0])
    assert (row["n_correct"], row["n_answered"], row["significant"]) == (3, 4, ["L0H3", "L0H2"])


# --- bounds and checks before any work ---------------------------------------------------------------------------


def test_sizes_seeds_and_depths_are_refused_before_any_work(tmp_path, capfd):
    """Each refused before a model loads (a loaded model would take seconds; these return at once), and
    nothing is written."""
    import time

    out = tmp_path / "o"
    path = put(tmp_path / "res")
    cases = [(["detect", "--samples", 2 ** 63], "--samples must be at most 100000, got 9223372036854775808"),
             (["detect", "--seed", -1], "--seed must be >= 0, got -1"),
             (["detect", "--needle-position", "1e-300"], "needle_position: 1e-300 has no short decimal form"),
             (["sweep", "--models", "smollm2", "--samples", 2 ** 63], "--samples must be at most 100000"),
             (["sweep", "--models", "smollm2", "--seed", -1], "--seed must be >= 0, got -1"),
             (["ablate", path, "--k", 0, 2, "--draws", 2 ** 63],
              "--draws must lie in [0, 1000], got 9223372036854775808"),
             (["ablate", path, "--k", 0, 2, "--samples", 2 ** 63], "--samples must be at most 100000"),
             (["ablate", path, "--k", 0, 2, "--seed", -1], "--seed must be >= 0, got -1")]
    for argv, msg in cases:
        t0 = time.perf_counter()
        one_line(*cli(capfd, *argv, *(["--output-dir", out] if argv[0] in ("detect", "sweep") else []))[::2], msg)
        assert time.perf_counter() - t0 < 5 and not out.exists(), argv
    assert files(tmp_path / "res") == ["summed_attention", "summed_attention/m_inc_state_256.json"]


def test_a_json_grid_with_a_key_given_twice_is_refused(tmp_path):
    from retrieval_heads.sweep import load_grid_file

    grid = tmp_path / "g.json"
    grid.write_text('{"models": ["smollm2"], "tokens": [256], "samples": 2, "samples": 20}')
    with pytest.raises(UserError, match=f'^grid file {grid}: malformed JSON \\(key "samples" is given twice\\)$'):
        load_grid_file(grid)
    grid.write_text('{"models": ["smollm2"], "tokens": [256], "samples": 2}')
    assert load_grid_file(grid)["samples"] == 2


def test_stability_on_many_lengths_compares_neighbours(tmp_path):
    """Up to 12 lengths, every pair; above, each length with the next one (and a note), with the very
    numbers all pairs give for those pairs."""
    from itertools import combinations

    from retrieval_heads.report import stability
    from retrieval_heads.report.collect import collect

    for n in (12, 13):
        root = tmp_path / str(n)
        for i in range(n):
            put(root, tokens=256 + 10 * (n - i), seed=i)  # written longest first: the order is the lengths'
        exps = collect(root).experiments
        notes: list[str] = []
        rows = stability.length_pairs(exps, notes)
        every = {(a.tokens, b.tokens): stability.compare(a, b) for a, b in combinations(exps, 2)}
        if n == 12:
            assert len(rows) == 66 and notes == []
        else:
            assert [(r["a"], r["b"]) for r in rows] == [(256 + 10 * i, 266 + 10 * i) for i in range(1, 13)]
            assert notes == ["summed_attention · m · inc_state: 13 results, so only neighbouring ones are compared "
                             "(12 pairs of 78; all pairs up to 12)"]
        for r in rows:
            assert {k: r[k] for k in every[(r["a"], r["b"])]} == every[(r["a"], r["b"])]


@pytest.mark.slow  # loads a (tiny) model through the CLI
def test_a_model_folder_without_tokenizer_files_says_so(tmp_path, capfd):
    from conftest import tiny_model

    folder = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(folder)  # config and weights, no tokenizer files
    msg = f"error: the tokenizer of '{folder}' encodes text to no tokens: its folder lacks the tokenizer files"
    for argv in (["detect", "--model", folder, "--tokens", 200, "--samples", 1],
                 ["sweep", "--models", folder, "--questions", "inc_state", "--tokens", 200, "--samples", 1]):
        one_line(*cli(capfd, *argv, "--output-dir", tmp_path / "o")[::2], msg)
        assert not (tmp_path / "o").exists()


def test_a_killed_detects_temp_files_are_removed_by_the_next_write(tmp_path):
    import json

    from retrieval_heads.experiments import write_result

    path = put(tmp_path)
    record = json.loads(path.read_text())
    stale = [path.parent / f".{path.name}.rh-k2x_9a0b.tmp", path.parent / f".{path.stem}.attention.npz.rh-aaaa1111.tmp"]
    keep = path.parent / ".other_inc_state_256.json.rh-k2x_9a0b.tmp"
    for p in stale + [keep]:
        p.write_text("half")
    assert write_result(tmp_path, record, [], torch.zeros(0), False, attention=b"x") == path
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, keep.name, f"{path.stem}.attention.npz"])
