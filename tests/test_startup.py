"""The commands that run no model import neither torch nor transformers: every ``--help`` (``detect --help``
too: its flags, allowed values and defaults come from :mod:`retrieval_heads.spec`), ``report`` and ``export``
(a fresh interpreter, checked through ``sys.modules``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from retrieval_heads.data.prompt import PromptSample
from retrieval_heads.experiments import write_result
from retrieval_heads.results import make_record

HEAVY = ("torch", "transformers")


def run_fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_help_report_and_export_do_not_import_torch(tmp_path):
    L, H, S = 3, 4, 2
    g = torch.Generator().manual_seed(1)
    sample_scores = torch.rand(S, L, H, generator=g)  # (S, L, H)
    record = make_record(method="summed_attention", model_key="m", model_name="m", question="inc_state",
                         question_prompt="q", total_tokens=64, needle_position=0.5, scores=sample_scores.sum(0),
                         samples_processed=S, seed=0, dtype="float32")
    prompts = [PromptSample([1, 2, 3], 0, 1, 2, "q", "a") for _ in range(S)]
    path = write_result(tmp_path / "res", record, prompts, sample_scores, save_samples=True)
    got = run_fresh(f"""
        import contextlib, io, json, sys
        from retrieval_heads.cli import main
        heavy = {HEAVY!r}
        out = {{}}
        for args in (["--help"], ["report", "--help"], ["export", "--help"],
                     ["export", {str(path)!r}, "--format", "wu", "--out", {str(tmp_path / "wu.json")!r}],
                     ["report", {str(tmp_path / "res")!r}, "--out", {str(tmp_path / "report")!r},
                      "--resamples", "20"]):
            with contextlib.redirect_stdout(io.StringIO()):
                rc = main(args)
            out[" ".join(args[:2])] = [rc, [m for m in heavy if m in sys.modules]]
        print(json.dumps(out))
    """)
    assert len(got) == 5
    for args, (rc, imported) in got.items():
        assert rc == 0, args
        assert imported == [], f"{args} imported {imported}"
    wu = json.loads((tmp_path / "wu.json").read_text())
    assert wu["1-2"] == pytest.approx(sample_scores[:, 1, 2].double().tolist(), abs=1e-7)
    assert (tmp_path / "report" / "report.md").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("command", [[], ["detect"], ["sweep"], ["report"], ["ablate"], ["export"]])
def test_entry_point_help_does_not_import_torch(command):
    """``retrieval-heads [COMMAND] --help`` as a user runs it (``python -m retrieval_heads``), torch not even
    importable by accident: a meta-path finder refuses it."""
    got = run_fresh(f"""
        import contextlib, io, json, runpy, sys

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("refused: " + name)

        sys.meta_path.insert(0, Refuse())
        sys.argv = ["retrieval-heads", *{command!r}, "--help"]
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                runpy.run_module("retrieval_heads", run_name="__main__")
        except SystemExit as e:
            code = e.code
        heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
        print(json.dumps({{"code": code, "heavy": heavy, "usage": out.getvalue().startswith("usage: ")}}))
    """)
    assert got == {"code": 0, "heavy": [], "usage": True}


def test_builtin_method_names_are_the_registrys():
    """``results`` names the built-in methods without importing them (for ``report``): the same names."""
    from retrieval_heads.methods import METHODS
    from retrieval_heads.results import BUILTIN_METHODS, method_names

    assert tuple(METHODS.names()[:len(BUILTIN_METHODS)]) == BUILTIN_METHODS
    assert method_names() is METHODS
