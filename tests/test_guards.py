"""Guards against a third round of hostile input: the results-dir lock held by every writer, results of
other weights or head grids under one model key, attention files that lie about their size, extreme scores,
full disks, leftovers of killed processes, bad strings and sizes, and things that would hang.

Fast tests build results with ``results.make_record`` (no model); those that run a model are marked slow.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

from conftest import cli, one_line
from retrieval_heads.errors import UserError
from retrieval_heads.io import atomic_write_json
from retrieval_heads.lock import LOCK_NAME, results_lock, writing_into
from retrieval_heads.results import make_provenance, make_record, result_path


def put(root, *, model="m", tokens=256, layers=2, heads=4, seed=0, identity=None, extra=None, scores=None,
        method="summed_attention", question="inc_state"):
    """A result where detect would write it; scores from ``seed`` unless given."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(layers, heads, generator=g, dtype=torch.float64) if scores is None else torch.tensor(scores, dtype=torch.float64)
    rec = make_record(method=method, model_key=model, model_name=f"org/{model}", question=question,
                      question_prompt=question, total_tokens=tokens, needle_position=0.5, scores=grid,
                      samples_processed=4, seed=0, dtype="float32", extra=extra,
                      provenance=make_provenance(identity))
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


def test_detect_holds_the_lock_and_writers_share_theirs(tmp_path, capfd):
    out = tmp_path / "res"
    path = put(out)
    with results_lock(out, "detect"):  # what detect holds while it runs
        one_line(*cli(capfd, "report", out)[::2], f"another detect (pid {os.getpid()}) is running on {out}")
        with pytest.raises(UserError, match=f"another detect \\(pid {os.getpid()}\\)"):
            with results_lock(out, "sweep"):
                pass
    target = out / "summed_attention" / "x.txt"
    with writing_into(target), writing_into(out / "summed_attention" / "y.txt"):  # two exports at once: fine
        with pytest.raises(UserError, match=f"another retrieval-heads command \\(pid \\?\\) is running on {out}"):
            with results_lock(out, "sweep"):
                pass
        rc, _, err = cli(capfd, "detect", "--output-dir", out, "--tokens", 256, "--samples", 1)
        one_line(rc, err, f"running on {out}")
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
