"""The fault and bad-input matrix (docs/reliability.md): kills at every stage of a sweep, corrupt results, full
and unwritable disks, bad input through the CLI, determinism, and what is never executed.

Everything runs on a tiny random Llama saved with SmolLM2's tokenizer (vocab 49152, 512 positions), so a
sweep of 2 questions x 2 lengths x 2 samples takes well under a second; the cost is the Python start of
each subprocess. Faults are injected by a wrapper script that patches one function of the package and
then runs the real CLI: the kill lands at a chosen point, deterministically.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from retrieval_heads import io as rio
from retrieval_heads.errors import UserError
from retrieval_heads.sweep import Unit, compute_unit, make_grid, run_sweep, unit_status

QUESTIONS = ["inc_state", "hq_state"]
TOKENS = [256, 320]
INTERRUPTED = "error: interrupted; finished results are kept"

# Runs the CLI with one fault injected. FAULT_AT: load (after the weights are read, before load_model
# returns), compute (the second unit, after its first sample), write (the third result file: temp file
# written and synced, not yet renamed). FAULT: KILL or INT (a signal to itself) or ENOSPC (the disk is full).
WRAPPER = textwrap.dedent("""
    import errno, os, signal, sys
    from retrieval_heads import io as rio, models, prefill
    from retrieval_heads.cli import main

    at, fault = os.environ["FAULT_AT"], os.environ["FAULT"]

    def fire():
        if fault == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.kill(os.getpid(), getattr(signal, "SIG" + fault))

    if at == "load":
        real_load = models.load_model

        def load_model(*a, **k):
            lm = real_load(*a, **k)
            fire()
            return lm

        models.load_model = load_model
    elif at == "compute":
        real_score, calls = prefill.score_shared, []

        def score_shared(model, groups, questions, batch_size=1, on_batch=None):
            calls.append(1)

            def batch_done(k):
                on_batch(k)
                if len(calls) == 2:
                    fire()

            return real_score(model, groups, questions, batch_size, batch_done)

        prefill.score_shared = score_shared
    elif at == "write":
        class OsWithFault:
            replaced = 0

            def __getattr__(self, name):
                return getattr(os, name)

            def fsync(self, fd):
                if fault == "ENOSPC" and self.replaced == 2:
                    fire()
                return os.fsync(fd)

            def replace(self, src, dst):
                if fault != "ENOSPC" and self.replaced == 2:
                    fire()
                self.replaced += 1
                return os.replace(src, dst)

        rio.os = OsWithFault()
    sys.exit(main(sys.argv[1:]))
""")

# Runs the CLI once per argv of a JSON list, in one process (one Python start for many cases); stdout and
# stderr are captured at the file-descriptor level, so nothing printed by any library escapes.
DRIVER = textwrap.dedent("""
    import json, os, sys, tempfile, traceback
    from retrieval_heads.cli import main

    results = []
    for argv in json.load(open(sys.argv[1])):
        with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
            sys.stdout.flush(); sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(so.fileno(), 1); os.dup2(se.fileno(), 2)
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code
            except BaseException:
                traceback.print_exc()
                rc = 1
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os.dup2(saved[0], 1); os.dup2(saved[1], 2)
                os.close(saved[0]); os.close(saved[1])
            so.seek(0); se.seek(0)
            results.append(dict(rc=rc, stdout=so.read().decode(), stderr=se.read().decode()))
    print(json.dumps(results))
""")


# Imports the package, torch and transformers once, then forks one child per job (the jobs run at once):
# each child points its stdout/stderr at files, sets its env and runs WRAPPER or DRIVER as a fresh process
# would. Prints {job name: exit code (-9 for SIGKILL)}.
LAUNCHER = textwrap.dedent("""
    import json, os, sys, traceback
    import torch, transformers
    from transformers.models.llama import modeling_llama
    import retrieval_heads.cli, retrieval_heads.sweep, retrieval_heads.experiments, retrieval_heads.prefill

    pids = {}
    for job in json.load(open(sys.argv[1])):
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
                f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
                os.close(f)
            os.environ.update(job["env"])
            sys.argv = ["-c", *job["argv"]]
            try:
                exec(compile(SCRIPTS[job["script"]], job["script"], "exec"), {"__name__": "__main__"})
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        pids[pid] = job["name"]
    codes = {}
    while pids:
        pid, status = os.wait()
        codes[pids.pop(pid)] = os.waitstatus_to_exitcode(status)
    print(json.dumps(codes))
""").replace("SCRIPTS", repr({"wrapper": WRAPPER, "driver": DRIVER}))


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def results(out):
    """{file name: record without its timestamp} of every result JSON under ``out``."""
    return {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "timestamp"}
            for p in sorted((out / "summed_attention").glob("*.json"))}


def sweep_args(model, out):
    return ["sweep", "--models", str(model), "--questions", *QUESTIONS, "--tokens", *map(str, TOKENS),
            "--samples", "2", "--output-dir", str(out), "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama directory with SmolLM2's tokenizer, and the model loaded from it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from retrieval_heads.models import load_model, smollm2_path

    d = tmp_path_factory.mktemp("models") / "tiny"
    d.mkdir()
    for f in smollm2_path().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, d / f.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d, load_model(str(d))


@pytest.fixture(scope="module")
def grid(tiny):
    return make_grid(models=[str(tiny[0])], questions=QUESTIONS, tokens=TOKENS, samples=2)


@pytest.fixture(scope="module")
def reference(tiny, grid, tmp_path_factory):
    """An uninterrupted sweep."""
    out = tmp_path_factory.mktemp("reference")
    s = run_sweep(grid, out, load=lambda m, **kw: tiny[1], progress=False, echo=lambda s: None)
    assert len(s.done) == 4 and not s.skipped
    return out


def resume(tiny, grid, out):
    lines = []
    s = run_sweep(grid, out, load=lambda m, **kw: tiny[1], progress=False, echo=lines.append)
    return s, lines


# --- the CLI cases, run in one driver process -----------------------------------------------------------

GOOD = {"needle": "The company is incorporated in the State of Delaware.", "question":
        "In what state is the company incorporated?", "answer": "Delaware",
        "haystack": "The quarterly report covers revenue, costs and the outlook for the next year. " * 60}


def bad_input_cases(model, d):
    """(argv, the message its one error line must hold); files made under ``d``."""
    from transformers import ViTConfig

    vit = d / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(vit)

    def jsonl(name, lines):
        p = d / name
        p.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
        return p

    missing = jsonl("missing.jsonl", [json.dumps({k: v for k, v in GOOD.items() if k != "answer"})])
    empty = jsonl("empty.jsonl", [json.dumps(GOOD), json.dumps(dict(GOOD, needle=""))])
    latin = jsonl("latin.jsonl", [json.dumps(GOOD), json.dumps(GOOD).replace("Delaware", "D\u00e9laware")
                                  .encode("latin-1")])
    malformed = jsonl("malformed.jsonl", [json.dumps(GOOD), json.dumps(GOOD), "{oops"])
    nothing = d / "nothing.toml"
    nothing.write_text("questions = []\nsamples = 2\n")
    detect = ["detect", "--model", model]
    sweep = ["sweep", "--models", model]
    return [
        (["detect", "--model", "smollm3"], "unknown model key 'smollm3' (did you mean 'smollm2'?)"),
        (["detect", "--model", d / "nowhere"], "does not exist"),
        (["detect", "--model", vit], "is not a causal language model (model_type 'vit')"),
        (["sweep", "--models", vit], "is not a causal language model (model_type 'vit')"),
        (detect + ["--question", "ceo"], "unknown question 'ceo'"),
        (detect + ["--method", "summed"], "unknown method 'summed'"),
        (sweep + ["--method", "summed"], "unknown method 'summed'"),
        (detect + ["--tokens", "64"], "--tokens 64 is too small"),
        (sweep + ["--tokens", "256", "64"], "--tokens 64 is too small"),
        (detect + ["--tokens", "600"], f"--tokens 600 exceeds the 512 positions of {model}"),
        (sweep + ["--tokens", "256", "600"], f"--tokens 600 exceeds the 512 positions of {model}"),
        (detect + ["--needle-position", "-0.1"], "--needle-position must lie in [0, 1]"),
        (detect + ["--needle-position", "nan"], "--needle-position must lie in [0, 1]"),
        (sweep + ["--needle-position", "1.01"], "--needle-position must lie in [0, 1]"),
        (detect + ["--samples", "0"], "--samples must be positive"),
        (sweep + ["--samples", "-2"], "--samples must be positive"),
        (detect + ["--dataset", malformed], "malformed.jsonl:3: malformed JSON"),
        (detect + ["--dataset", missing], "missing.jsonl:1: missing field"),
        (detect + ["--dataset", empty], "empty.jsonl:2: field 'needle' is empty"),
        (detect + ["--dataset", latin], "latin.jsonl:2: not valid UTF-8"),
        (detect + ["--dataset", d / "none.jsonl"], "none.jsonl does not exist"),
        (["sweep", "--config", nothing], "names nothing"),
        (sweep + ["--questions"], "--questions needs at least one value"),
    ]


def unwritable_cases(model, d):
    """An output dir that cannot be created (its parent is a file: fails for root too) or, for other users,
    a read-only one."""
    blocker = d / "a_file"
    blocker.write_text("")
    bad = [blocker / "out"]
    if os.geteuid() != 0:
        ro = d / "ro"
        ro.mkdir(mode=0o555)
        bad.append(ro / "out")
    cases = []
    for out in bad:
        msg = f"cannot write to {out}"
        cases.append((["sweep", "--models", model, "--tokens", "256", "--samples", "1", "--output-dir", out], msg))
        cases.append((["detect", "--model", model, "--tokens", "256", "--samples", "1", "--output-dir", out], msg))
    return cases


def untrusted_cases(tiny, d):
    """Pickle weights, a model's own code, a shell-looking model name, a Python file given as data or grid;
    each would leave ``d/code_ran`` if it ran."""
    payload = f"open({str(d / 'code_ran')!r}, 'w').write('ran')\n"
    pickled = d / "pickled"
    shutil.copytree(tiny[0], pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(tiny[1].model.state_dict(), pickled / "pytorch_model.bin")
    remote = d / "remote"
    shutil.copytree(tiny[0], remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"})
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "evil.py").write_text(payload)
    evil = d / "evil.py"
    evil.write_text(payload)
    return [
        (["detect", "--model", pickled, "--tokens", "256", "--samples", "1"], "cannot load model"),
        (["detect", "--model", remote, "--tokens", "256", "--samples", "1"], "cannot load model"),
        (["sweep", "--models", remote, "--tokens", "256", "--samples", "1"], "cannot load model"),
        (["detect", "--model", f"$(python {evil}); python {evil}"], "unknown model key"),
        (["detect", "--model", tiny[0], "--dataset", evil], "evil.py:1: malformed JSON"),
        (["sweep", "--config", evil], "malformed JSON"),
    ]


FAULTS = [(at, sig) for sig in ("KILL", "INT") for at in ("load", "compute", "write")] + [("write", "ENOSPC")]


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Every CLI run of this file: one launcher process (one import of torch and transformers) forks a
    child per fault scenario plus one driver child for the CLI cases; they run at once.

    Returns {"fault": {(at, sig): (returncode, stderr, output dir)}, "cli": {group: [(argv, msg, result,
    output dir)]}} where a CLI result is {rc, stdout, stderr}."""
    base = tmp_path_factory.mktemp("runs")
    model = str(tiny[0])
    jobs = []

    def job(name, script, argv, **extra):
        jobs.append(dict(name=name, script=script, argv=[str(a) for a in argv], env=extra,
                         stdout=str(base / f"{name}.out"), stderr=str(base / f"{name}.err")))

    for at, sig in FAULTS:
        job(f"{at}-{sig}", "wrapper", sweep_args(model, base / f"{at}-{sig}"), FAULT_AT=at, FAULT=sig)
    groups = {}
    for name, make in [("bad", lambda d: bad_input_cases(model, d)), ("unwritable", lambda d: unwritable_cases(
            model, d)), ("untrusted", lambda d: untrusted_cases(tiny, d))]:
        (base / name).mkdir()
        groups[name] = [(args + ["--output-dir", base / name / f"out{i}"] if "--output-dir" not in args else args,
                         msg) for i, (args, msg) in enumerate(make(base / name))]
    data = base / "warn.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps(dict(GOOD, answer="Nevada")) + "\n")
    groups["warning"] = [(["detect", "--model", model, "--dataset", data, "--tokens", "256", "--samples", "2",
                           "--output-dir", base / "warn-out"], "")]
    flat = [[str(a) for a in args] for g in groups.values() for args, _ in g]
    (base / "cases.json").write_text(json.dumps(flat))
    job("driver", "driver", [base / "cases.json"])
    (base / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(base / "jobs.json")], capture_output=True,
                          text=True, env=env(), timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    text = {j["name"]: ((base / f"{j['name']}.out").read_text(), (base / f"{j['name']}.err").read_text())
            for j in jobs}
    assert codes["driver"] == 0, text["driver"][1]
    got = iter(json.loads(text["driver"][0].strip().splitlines()[-1]))
    cli = {g: [(args, msg, next(got), args[args.index("--output-dir") + 1]) for args, msg in cases]
           for g, cases in groups.items()}
    fault = {(at, sig): (codes[f"{at}-{sig}"], text[f"{at}-{sig}"][1], base / f"{at}-{sig}")
             for at, sig in FAULTS}
    return {"fault": fault, "cli": cli}


def one_error_line(r, msg):
    lines = r["stderr"].strip().splitlines()
    assert r["rc"] == 2, r
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r["stderr"]
    return lines[0]


# --- 1. faults ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("at, kept", [("load", 0), ("compute", 2), ("write", 2)])
@pytest.mark.parametrize("sig", ["KILL", "INT"])
@pytest.mark.slow
def test_killed_sweep_resumes_to_the_uninterrupted_results(runs, tiny, grid, reference, at, sig, kept):
    """Killed after the weights load, mid-unit (one sample of the second unit scored), or mid-write (the
    third result's temp file synced, not renamed): the finished results are whole, and a resumed sweep ends
    with exactly the uninterrupted sweep's results."""
    rc, stderr, out = runs["fault"][(at, sig)]
    d = out / "summed_attention"
    finished = sorted(p.name for p in d.glob("*.json")) if d.exists() else []
    assert len(finished) == kept, (rc, stderr)
    assert all(results(out)[n] == results(reference)[n] for n in finished)  # what is there is complete
    temps = sorted(p.name for p in d.glob(".*.tmp")) if d.exists() else []
    if sig == "KILL":
        assert rc == -signal.SIGKILL
        assert len(temps) == (at == "write")  # a killed write leaves its temp file, never a half result
    else:
        assert rc == 130, stderr
        assert stderr.strip().splitlines() == [INTERRUPTED]
        assert temps == []  # an interrupted write cleans up after itself
    s, _ = resume(tiny, grid, out)  # the lock of a killed sweep is gone with it
    assert len(s.skipped) == kept and len(s.done) == 4 - kept and not s.recomputed
    assert results(out) == results(reference)
    assert list(d.glob(".*.tmp")) == []  # the resumed sweep removed the killed write's temp file


@pytest.mark.slow
def test_full_disk_is_a_clear_error_and_keeps_earlier_results(runs, reference):
    """The third write hits ENOSPC: one line, exit 2, the two finished results intact, no temp file."""
    rc, stderr, out = runs["fault"][("write", "ENOSPC")]
    line = one_error_line({"rc": rc, "stderr": stderr}, "error: cannot write ")
    assert line.endswith(": No space left on device")
    d = out / "summed_attention"
    assert sorted(p.name for p in d.iterdir()) == sorted(results(out)) and len(results(out)) == 2
    assert all(results(out)[n] == results(reference)[n] for n in results(out))


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 64 KiB tmpfs (needs root and mount rights; skipped elsewhere, the ENOSPC test above stands)."""
    d = tmp_path / "disk"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield d
    subprocess.run(["umount", str(d)], check=True)


@pytest.mark.slow  # mounts a real tmpfs and fills it
def test_really_full_disk(tiny, grid, reference, tiny_tmpfs):
    """On a filled tmpfs: the sweep stops with a clear error, the result already there stays valid."""
    out = tiny_tmpfs / "out"
    src = reference / "summed_attention"
    (out / "summed_attention").mkdir(parents=True)
    first = min(src.glob("*.json"))
    shutil.copy(first, out / "summed_attention" / first.name)
    (out / ".sweep.lock").write_text("0\n")  # the lock has its page before the disk is full
    with open(tiny_tmpfs / "filler", "wb", buffering=0) as f:
        with pytest.raises(OSError) as e:
            while True:
                f.write(b"\0" * 4096)
        assert e.value.errno == errno.ENOSPC
    with pytest.raises(UserError, match="cannot write .*: No space left on device"):
        resume(tiny, grid, out)
    assert sorted(p.name for p in (out / "summed_attention").iterdir()) == [first.name]
    assert results(out) == {first.name: results(reference)[first.name]}


def test_corrupt_results_are_detected_and_recomputed(tiny, grid, reference, tmp_path):
    """Each way a result file can be damaged is found by name and reason, then recomputed."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    d = out / "summed_attention"
    files = sorted(d.glob("*.json"))
    assert len(files) == 4
    rec = json.loads(files[3].read_text())
    rec["scores"][0][0] += 0.25  # hand-edited, checksum kept
    damage = {
        files[0].name: ("", "corrupt result JSON"),
        files[1].name: (files[1].read_text()[: len(files[1].read_text()) // 2], "corrupt result JSON"),
        files[2].name: (json.dumps({k: v for k, v in json.loads(files[2].read_text()).items() if k != "scores"}),
                        "missing field(s) scores"),
        files[3].name: (json.dumps(rec), "checksum mismatch"),
    }
    for name, (text, _) in damage.items():
        (d / name).write_text(text)
    key = tiny[0].name
    reasons = {}
    for t in TOKENS:
        st = unit_status(out, grid, Unit(str(tiny[0]), t, tuple(QUESTIONS)), key)
        reasons.update({f"{key}_{q}_{t}.json": st.reason[q] for q in QUESTIONS if st.state[q] == "corrupt"})
    assert sorted(reasons) == sorted(damage)
    for name, (_, why) in damage.items():
        assert why in reasons[name], reasons[name]
    s, lines = resume(tiny, grid, out)
    assert sorted(p.name for p in s.recomputed) == sorted(damage) and not s.done
    assert sum(x.startswith("recomputed ") for x in lines) == 4
    assert results(out) == results(reference)


@pytest.mark.slow
def test_unwritable_output_dir_fails_before_any_work(runs):
    """One line, exit 2, before any model is loaded or anything computed (nothing on stdout)."""
    for args, msg, r, out in runs["cli"]["unwritable"]:
        one_error_line(r, msg)
        assert r["stdout"] == "", args  # no sweep header, no table
        assert not os.path.isdir(out)


# --- 2. bad input through the CLI ---------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_input_matrix(runs):
    """Each case: one line on stderr starting ``error: ``, exit 2, no traceback, no output dir."""
    assert len(runs["cli"]["bad"]) == 23
    for args, msg, r, out in runs["cli"]["bad"]:
        one_error_line(r, msg)
        assert "Traceback" not in r["stderr"] and r["stdout"] == ""
        assert not os.path.exists(out), args


@pytest.mark.slow
def test_answer_not_in_needle_is_a_warning(runs):
    """Documented as a warning: the run goes on (exit 0) and says which record on stderr."""
    ((_, _, r, out),) = runs["cli"]["warning"]
    assert r["rc"] == 0, r["stderr"]
    warnings = [x for x in r["stderr"].splitlines() if x.startswith("warning: ")]
    assert len(warnings) == 1 and "warn.jsonl:2" in warnings[0] and "does not occur in its needle" in warnings[0]
    assert os.path.exists(os.path.join(out, "summed_attention", "tiny_warn_256.json"))


# --- 3. numbers ---------------------------------------------------------------------------------------------


def test_same_seed_same_sweep_bytes(tiny, grid, reference, tmp_path):
    """Two sweeps with one seed: byte-identical files apart from the timestamp; another seed differs."""
    s, _ = resume(tiny, grid, tmp_path / "again")
    assert len(s.done) == 4
    for p in sorted((reference / "summed_attention").glob("*.json")):
        a, b = p.read_text(), (tmp_path / "again" / "summed_attention" / p.name).read_text()
        assert a.replace(json.loads(a)["timestamp"], "") == b.replace(json.loads(b)["timestamp"], "")
    other = make_grid(**{**grid.__dict__, "seed": 1})
    resume(tiny, other, tmp_path / "seed1")
    assert results(tmp_path / "seed1") != results(reference)


def test_per_sample_masses_are_finite_and_in_unit_interval(tiny, grid):
    for res in compute_unit(tiny[1], Unit(str(tiny[0]), 320, tuple(QUESTIONS)), grid):
        s = res.sample_scores  # (S, L, H)
        assert s.shape == (2, 2, 4) and torch.isfinite(s).all()
        assert s.min() >= 0 and s.max() <= 1 + 1e-6
        assert s.sum() > 0  # the needle gets some attention
        torch.testing.assert_close(res.scores, s.sum(0))


# --- 4. security ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nothing_user_supplied_is_executed(runs):
    """All refused with one line; the code that would leave a marker never ran."""
    cases = runs["cli"]["untrusted"]
    for args, msg, r, out in cases:
        one_error_line(r, msg)
        assert not os.path.exists(out), args
    marker = os.path.join(os.path.dirname(cases[0][3]), "code_ran")
    assert not os.path.exists(marker)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    """The writer itself: a failed write keeps the previous file whole and leaves no temp file."""
    p = tmp_path / "r.json"
    rio.atomic_write_json(p, {"a": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rio.os, "fsync", full)
    with pytest.raises(UserError, match=f"cannot write {p}: No space left on device"):
        rio.atomic_write_json(p, {"a": 2})
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"a": 1} and [x.name for x in tmp_path.iterdir()] == ["r.json"]
