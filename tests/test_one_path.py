"""One path from samples to result records: ``detect`` and the sweep build their records with one function.

- ``detect`` and a one-unit sweep of the same settings write the same bytes (result JSON, samples file,
  attention file), the timestamp frozen;
- ``detect``, and a sweep of a unit of several questions, write what they wrote before they shared that path:
  the golden files in ``tests/records_golden/`` (written by this file's ``--write`` on the code before the
  change; the fields that name the machine are normalized: see :func:`normal`).

The model is a tiny random Llama with SmolLM2's tokenizer, saved to a folder (real prompts, fast passes).

Regenerate the golden files (only when a change of the records is intended, and say so in the commit):
``PYTHONPATH=src python tests/test_one_path.py --write``.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import save_tiny  # noqa: E402

pytestmark = pytest.mark.slow  # about 10 s: a model saved and loaded, and 16 runs on it

GOLDEN = Path(__file__).parent / "records_golden"
TOKENS, SAMPLES = 260, 2

# name -> (question, detect's settings); a one-unit sweep of the same settings must write the same bytes
CASES = {
    # a span-measuring method alone: one probed pass per sample
    "span": ("inc_state", dict(method="summed_attention")),
    # every span kind, ranked by lift, with the samples and attention files
    "span_files": ("inc_state", dict(method="summed_attention", span="needle,answer", rank_by="lift",
                                     save_samples=True, save_attention=2)),
    # several methods and the answers: one shared context pass per sample
    "methods": ("hq_state", dict(method="summed_attention,query_focused,retrieval_score,qrhead",
                                 span="needle,answer", answers=True, save_samples=True, save_attention=2)),
    # a long-context task: its own answer budget
    "task": ("passkey", dict(method="summed_attention,query_focused", span="answer", answers=True,
                             save_samples=True)),
}
# detect's settings that the sweep has no flag for (the sweep takes their defaults)
DETECT_ONLY = {
    "success": ("inc_year", dict(method="summed_attention,query_focused", success_only=True, alpha=0.2,
                                 save_samples=True)),
}
# a unit of several questions (filing questions sharing a context, and a task): the sweep's own
SWEEP_UNIT = dict(questions="inc_state,hq_state,passkey", method="summed_attention,query_focused",
                  span="needle,answer", answers=True, save_samples=True, save_attention=2)

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


class Frozen(datetime):
    @classmethod
    def now(cls, tz=None):
        return NOW


def tiny_model(folder: Path):
    from retrieval_heads.models import load_model

    path = save_tiny(folder / "tiny")
    return str(path), load_model(str(path))


def run_detect(lm, question: str, settings: dict, out: Path) -> dict[str, bytes]:
    from retrieval_heads.experiments import detect

    detect(lm, question=question, tokens=TOKENS, samples=SAMPLES, output_dir=out, **settings)
    return files(out)


def run_sweep_of(path: str, lm, out: Path, **settings) -> dict[str, bytes]:
    from retrieval_heads.sweep import make_grid, run_sweep

    grid = make_grid(models=path, tokens=TOKENS, samples=SAMPLES, **settings)
    s = run_sweep(grid, out, load=lambda m, **kw: lm, progress=False, echo=lambda s: None, check_models=False)
    assert len(s.done) == grid.size
    return files(out)


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def normal(name: str, data: bytes):
    """A file's content without what names the machine: the model folder's path (the result's model name and
    provenance) and the package versions, and so the checksum (and the attention file's copy of it)."""
    if name.endswith(".json"):
        rec = json.loads(data)
        rec["model_name"] = rec["provenance"]["model"]["source"] = "TINY"
        rec["provenance"]["versions"] = {}
        rec["checksum"] = None
        return rec
    if name.endswith(".npz"):
        import io

        with np.load(io.BytesIO(data)) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes())
        meta["result_checksum"] = None
        return meta, {k: v.tolist() for k, v in arrays.items()}
    return data.decode()


def golden_runs(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every run the golden files hold: detect for each case, and the sweep of a unit of several questions."""
    path, lm = tiny_model(folder)
    runs = {name: run_detect(lm, q, s, folder / name) for name, (q, s) in {**CASES, **DETECT_ONLY}.items()}
    runs["sweep_unit"] = run_sweep_of(path, lm, folder / "sweep_unit", **SWEEP_UNIT)
    return runs


def write_golden(folder: Path) -> None:
    import shutil

    shutil.rmtree(GOLDEN, ignore_errors=True)
    for run, got in golden_runs(folder).items():
        for name, data in got.items():
            target = GOLDEN / run / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


@pytest.fixture
def frozen(monkeypatch):
    import retrieval_heads.results as results

    monkeypatch.setattr(results, "datetime", Frozen)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("case", list(CASES))
def test_detect_is_a_one_unit_sweep(case, tiny, frozen, tmp_path):
    path, lm = tiny
    question, settings = CASES[case]
    det = run_detect(lm, question, settings, tmp_path / "detect")
    swp = run_sweep_of(path, lm, tmp_path / "sweep", questions=question, **settings)
    assert list(det) == list(swp) and len(det) >= 1
    for name in det:
        assert det[name] == swp[name], name


@pytest.mark.parametrize("run", [*CASES, *DETECT_ONLY, "sweep_unit"])
def test_records_are_the_golden_ones(run, tiny, frozen, tmp_path):
    path, lm = tiny
    if run == "sweep_unit":
        got = run_sweep_of(path, lm, tmp_path / run, **SWEEP_UNIT)
    else:
        question, settings = {**CASES, **DETECT_ONLY}[run]
        got = run_detect(lm, question, settings, tmp_path / run)
    want = {str(p.relative_to(GOLDEN / run)): p.read_bytes() for p in sorted((GOLDEN / run).rglob("*"))
            if p.is_file()}
    assert list(got) == list(want)
    for name in got:
        assert normal(name, got[name]) == normal(name, want[name]), name


def test_a_sweep_that_decodes_a_tasks_answers_resumes(tiny, tmp_path):
    """A task decodes its own answer budget (passkey: 38 tokens), and its result records that budget: a rerun
    compares it with the budget the sweep decodes for the task, not with the grid's default of 12 (which
    stopped every rerun with "made with max_new_tokens 38 (this sweep: 12)")."""
    from retrieval_heads.sweep import make_grid, run_sweep

    path, lm = tiny
    for extra, budget in (({}, 38), ({"max_new_tokens": 5}, 5)):
        out = tmp_path / str(budget)
        grid = make_grid(models=path, questions="passkey,inc_state", tokens=TOKENS, samples=1, answers=True,
                         method="query_focused", **extra)
        first = run_sweep(grid, out, load=lambda m, **kw: lm, progress=False, echo=lambda s: None, check_models=False)
        again = run_sweep(grid, out, load=lambda m, **kw: pytest.fail("nothing to load"), progress=False,
                          echo=lambda s: None, check_models=False)
        assert len(first.done) == len(again.skipped) == 2 and not again.done and not again.recomputed
        recorded = {p.name: json.loads(p.read_text())["extra"]["max_new_tokens"] for p in first.done}
        assert recorded == {"tiny_passkey_260.json": budget, "tiny_inc_state_260.json": extra.get("max_new_tokens", 12)}


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    import retrieval_heads.results as results

    results.datetime = Frozen
    with tempfile.TemporaryDirectory() as d:
        write_golden(Path(d))
    print(f"wrote {GOLDEN}")
