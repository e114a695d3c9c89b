"""``--save-attention K``: the stored rows equal the probe's (and the eager reference's) within their
quantisation step; the file names its result's top heads, spans and tokens; hostile files are refused."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from conftest import tiny_smol_lm
from retrieval_heads import attention as A
from reference import reference_rows
from retrieval_heads.attention_capture import capture_rows
from retrieval_heads.cli import main
from retrieval_heads.errors import UserError
from retrieval_heads.experiments import detect
from retrieval_heads.methods.retrieval_score import gold_span
from retrieval_heads.results import parse_head


@pytest.fixture(scope="module")
def tiny_lm():
    """A tiny random Llama with SmolLM2's tokenizer (real prompts, fast passes)."""
    return tiny_smol_lm()


def check_against_reference(lm, res, k):
    """Every stored row equals the eager reference's row within half its quantisation step."""
    saved = A.load(A.attention_path(res.path))
    assert saved.heads == res.record["top_50_heads"][:k]  # the result's own final ranking
    assert saved.samples == len(res.prompts)
    for s, p in enumerate(res.prompts):
        ids = torch.tensor([p.input_ids])
        ref = reference_rows(lm.model, ids)  # L x (1, H, 1, N)
        assert saved.sample_ids(s).tolist() == p.input_ids
        assert list(saved.spans[s, :2]) == [p.needle_start, p.needle_end]
        gold = gold_span(lm.tokenizer, p)
        assert list(saved.spans[s, 2:]) == (list(gold) if gold else [-1, -1])
        assert "".join(saved.vocab[int(i)] for i in p.input_ids) == lm.tokenizer.decode(p.input_ids)
        for j, name in enumerate(saved.heads):
            layer, head = parse_head(name)
            want = ref[layer][0, head, 0].numpy()  # (N,)
            step = float(saved.scale[s, j])
            assert step == pytest.approx(want.max() / 255, rel=1e-5)
            assert np.abs(saved.row(s, j) - want).max() <= step / 2 + 1e-6
    return saved


def test_stored_rows_equal_the_probe_within_their_step(tiny_lm, tmp_path):
    out = detect(tiny_lm, question="hq_state", tokens=300, samples=3, batch_size=2, output_dir=tmp_path,
                 method="summed_attention,query_focused", save_attention=4, save_samples=True)
    for name, res in out.items():
        assert res.path.exists() and A.attention_path(res.path).exists()
        assert A.attention_path(res.path).read_bytes() == res.attention
        saved = check_against_reference(tiny_lm, res, 4)
        assert saved.meta["result_checksum"] == res.record["checksum"] and saved.meta["method"] == name
        assert A.check_matches(saved, res.record) is None
    # the two methods rank differently, and each file holds its own top heads
    assert out["summed_attention"].record["top_50_heads"][:4] != out["query_focused"].record["top_50_heads"][:4]
    # summed_attention: the stored rows' needle mass is the sample's score, within the rows' rounding
    res = out["summed_attention"]
    saved = A.load(A.attention_path(res.path))
    for s, p in enumerate(res.prompts):
        for j, name in enumerate(saved.heads):
            layer, head = parse_head(name)
            mass = float(saved.row(s, j)[p.needle_start:p.needle_end].sum())
            bound = (p.needle_end - p.needle_start) * float(saved.scale[s, j]) / 2 + 1e-5
            assert abs(mass - float(res.sample_scores[s, layer, head])) <= bound


def test_capture_rows_equal_the_scoring_probe(tiny_lm):
    """The extra pass sees the very rows the scoring pass saw: needle mass equals the per-sample score (1e-6)."""
    res = detect(tiny_lm, question="inc_state", tokens=300, samples=2)
    heads = [parse_head(h) for h in res.record["top_50_heads"][:6]]
    rows = capture_rows(tiny_lm, res.prompts, heads, batch_size=1)
    for s, p in enumerate(res.prompts):
        assert rows[s].shape == (6, len(p.input_ids))
        for j, (layer, head) in enumerate(heads):
            assert float(rows[s][j, p.needle_start:p.needle_end].sum()) == pytest.approx(
                float(res.sample_scores[s, layer, head]), abs=1e-6)
            assert float(rows[s][j].sum()) == pytest.approx(1.0, abs=1e-5)


def test_quantisation_step_bound():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(500, 0.05), size=(3, 4))  # (3, 4, 500) peaky rows
    p[0, 0] = 0.0
    q, s = A.quantize(p)
    assert q.dtype == np.uint8 and q.shape == p.shape and s.shape == (3, 4)
    assert s[0, 0] == 0 and not q[0, 0].any()
    assert (q.max(-1)[s > 0] == 255).all()
    err = np.abs(A.dequantize(q, s) - p)
    assert (err <= s[..., None] / 2 + 1e-7).all()
    assert (err.max(-1)[s > 0] > 0).any()  # a real bound, not an exact copy


def test_same_rows_same_bytes(tiny_lm, tmp_path):
    a = detect(tiny_lm, question="inc_year", tokens=260, samples=2, save_attention=3)
    b = detect(tiny_lm, question="inc_year", tokens=260, samples=2, save_attention=3)
    assert a.attention == b.attention


def test_file_size_within_the_budget(tiny_lm):
    """The README's budget: at most (K + 4) bytes per prompt position (codes and id) plus the token table
    (12 bytes and the text per distinct token) plus 4 KB of headers, whatever the rows' compressibility."""
    res = detect(tiny_lm, question="inc_state", tokens=1000, samples=2, save_attention=5)
    saved = A.loads(res.attention)
    T, V = len(saved.ids), len(saved.vocab)
    text = sum(len(t.encode()) for t in saved.vocab.values())
    assert len(res.attention) <= (5 + 4) * T + 12 * V + text + 4096


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)
    return buf.getvalue()


def _npy(arr) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array(b, np.asarray(arr), allow_pickle=True)
    return b.getvalue()


def test_hostile_attention_files_are_one_clear_error(tiny_lm, tmp_path):
    good = detect(tiny_lm, question="inc_state", tokens=260, samples=2, save_attention=2).attention
    A.loads(good)  # the untouched file reads
    m = _members(good)
    n = len(A.loads(good).ids)
    cases = {
        "truncated": good[: len(good) // 2],
        "not a zip": b"\x93NUMPY not a zip",
        "pickled object array": _zip({**m, "meta.npy": _npy(np.array([{"x": 1}], dtype=object))}),
        "extra member": _zip({**m, "evil.npy": _npy(np.zeros(1))}),
        "missing member": _zip({k: v for k, v in m.items() if k != "spans.npy"}),
        "wrong dtype": _zip({**m, "rows.npy": _npy(np.zeros((2, n), dtype=np.float64))}),
        "bad offsets": _zip({**m, "offsets.npy": _npy(np.array([0, 5, 3], dtype=np.int64))}),
        "needle past the prompt": _zip({**m, "spans.npy": _npy(np.array([[0, 10**6, -1, -1]] * 2, dtype=np.int64))}),
        "id without text": _zip({**m, "ids.npy": _npy(np.full(n, 49151, dtype=np.int32))}),
        "text not utf-8": _zip({**m, "vocab_text.npy": _npy(np.full(
            np.load(io.BytesIO(m["vocab_text.npy"])).size, 0xFF, dtype=np.uint8))}),
        "meta not json": _zip({**m, "meta.npy": _npy(np.frombuffer(b"{nope", dtype=np.uint8))}),
    }
    for why, data in cases.items():
        with pytest.raises(UserError) as e:
            A.loads(data, "X.attention.npz")
        assert str(e.value).startswith("X.attention.npz"), why
        assert "\n" not in str(e.value), why


def test_check_matches_binds_the_file_to_its_result(tiny_lm):
    a = detect(tiny_lm, question="inc_state", tokens=260, samples=2, save_attention=2)
    b = detect(tiny_lm, question="inc_state", tokens=260, samples=2, seed=1, save_attention=2)
    saved = A.loads(a.attention)
    assert A.check_matches(saved, a.record) is None
    assert "checksum" in A.check_matches(saved, b.record)


def test_cli_bad_save_attention_is_one_line(capsys, tmp_path):
    rc = main(["detect", "--save-attention", "-1", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err == "error: --save-attention must be 0 (off) or a number of heads, got -1\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_smollm2_stored_rows_equal_the_probe(smollm2, tmp_path):
    res = detect(smollm2, question="hq_state", tokens=512, samples=2, output_dir=tmp_path, save_attention=5)
    saved = check_against_reference(smollm2, res, 5)
    assert saved.rows.shape == (5, sum(len(p.input_ids) for p in res.prompts))


def test_sweep_saves_attention_and_resumes(tiny_lm, tmp_path):
    from dataclasses import replace

    from retrieval_heads.sweep import make_grid, run_sweep

    from retrieval_heads.models import model_identity

    # the grid names the embedded model; the tiny one stands in for it, identity included (resume checks it)
    lm = replace(tiny_lm, key="smollm2", identity=model_identity("smollm2"))
    grid = make_grid(models=["smollm2"], questions=["inc_state", "hq_state"], tokens=[260], samples=2,
                     save_attention=3)
    s = run_sweep(grid, tmp_path, load=lambda *a, **k: lm, progress=False, echo=lambda line: None,
                  check_models=False)
    assert len(s.done) == 2
    for path in s.done:
        saved = A.load(A.attention_path(path))
        record = __import__("json").loads(path.read_text())
        assert A.check_matches(saved, record) is None and saved.heads == record["top_50_heads"][:3]
        for smp in range(2):  # rows equal the probe's on the same prompt within their step
            ids = saved.sample_ids(smp).tolist()
            ref = reference_rows(lm.model, torch.tensor([ids]))
            for j, name in enumerate(saved.heads):
                layer, head = parse_head(name)
                assert np.abs(saved.row(smp, j) - ref[layer][0, head, 0].numpy()).max() <= saved.scale[smp, j] / 2 + 1e-6
    A.attention_path(s.done[1]).unlink()  # a result without its attention file is redone
    lines: list[str] = []
    s2 = run_sweep(grid, tmp_path, load=lambda *a, **k: lm, progress=False, echo=lines.append, check_models=False)
    assert s2.done == [s.done[1]] and A.attention_path(s.done[1]).exists()
    assert sum(line.startswith("skipped") for line in lines) == 1
    with pytest.raises(UserError, match="^save_attention must be 0"):
        make_grid(models=["smollm2"], tokens=[260], save_attention=-2)


def test_ray_payload_carries_the_attention_file(tiny_lm):
    """The Ray engine's worker sends the attention file back with the record (no Ray needed: the worker is a
    plain class), byte for byte the local engine's."""
    from retrieval_heads.sweep.ray import ModelWorker
    from retrieval_heads.sweep import Unit, compute_unit, make_grid

    grid = make_grid(models=["smollm2"], questions=["inc_state", "hq_state"], tokens=[260], samples=2,
                     save_attention=2)
    unit = Unit("smollm2", 260, grid.questions)
    worker = ModelWorker("smollm2", grid)
    worker.lm = tiny_lm
    payloads, _ = worker.compute(unit, [("summed_attention", "hq_state")])
    local = {r.record["question"]: r for r in compute_unit(tiny_lm, unit, grid)}
    assert len(payloads) == 1 and payloads[0].result().attention == local["hq_state"].attention is not None
