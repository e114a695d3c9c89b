"""Sweeps: the grid and its checks, resume after kill -9, corrupt results recomputed, the lock, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from retrieval_heads import detect
from retrieval_heads.errors import UserError
from retrieval_heads.results import load_result
from retrieval_heads.sweep import (
    DEFAULT_TOKENS, Unit, load_grid_file, make_grid, plan, run_sweep, sweep_lock, unit_status,
)

ALL = ["inc_state", "inc_year", "employee_count", "hq_state"]
GRID = dict(models=["smollm2"], questions=["all"], tokens=[256, 320], samples=2)
ARGS = ["--models", "smollm2", "--questions", "all", "--tokens", "256", "320", "--samples", "2"]


def cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "retrieval_heads", "sweep", *args], capture_output=True,
                          text=True, env=env, cwd=cwd)


def results(out):
    """{file name: record without its timestamp} of every result JSON under ``out``."""
    d = out / "summed_attention"
    return {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "timestamp"}
            for p in sorted(d.glob("*.json"))}


def one_error_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# --- the grid (nothing loaded) --------------------------------------------------------------------------


def test_default_grid_is_the_seeds_on_detects_model():
    """The original study's questions and lengths, on detect's default model (its gated Llama-3-8B pair is
    --models instruct base)."""
    from retrieval_heads.cli import parse

    g = make_grid()
    assert g.models == ("smollm2",) and g.questions == tuple(ALL) and g.tokens == DEFAULT_TOKENS
    assert parse(["detect"]).model == "smollm2"
    assert g.size == 16 and g.samples > 0 and g.max_new_tokens == 12
    units = plan(g)
    assert len(units) == 4 and units[0] == Unit("smollm2", 2048, tuple(ALL))
    units = plan(make_grid(models=["instruct", "base"]))
    assert [u.model for u in units] == ["instruct"] * 4 + ["base"] * 4  # model by model: one load each


def test_max_new_tokens_is_a_grid_setting(tmp_path):
    """--max-new-tokens from the flag or the grid file; checked up front; a result whose answers were decoded
    with another limit is not taken as done by a sweep that decodes answers."""
    from retrieval_heads.commands.sweep import grid_settings
    from retrieval_heads.cli import parse
    from retrieval_heads.sweep.plan import _settings_mismatch

    assert make_grid(max_new_tokens="50").max_new_tokens == 50
    j = tmp_path / "grid.json"
    j.write_text(json.dumps({"models": "smollm2", "max_new_tokens": 30}))
    assert make_grid(**load_grid_file(j)).max_new_tokens == 30
    args = parse(["sweep", "--config", str(j), "--max-new-tokens", "40"])
    assert make_grid(**grid_settings(args)).max_new_tokens == 40  # the flag wins
    for bad, msg in [(0, "^max_new_tokens must be positive"), (True, "max_new_tokens: expected a whole number")]:
        with pytest.raises(UserError, match=msg):
            make_grid(max_new_tokens=bad)
    record = {"samples_processed": 6, "needle_position": 0.5, "seed": 0, "dtype": "float32", "rank_by": "score",
              "extra": {"accuracy": 0.5, "max_new_tokens": 12}}
    assert _settings_mismatch(record, make_grid(answers=True)) is None
    assert _settings_mismatch(record, make_grid(answers=True, max_new_tokens=50)) == \
        "max_new_tokens 12 (this sweep: 50)"
    assert _settings_mismatch(record, make_grid(method="retrieval_score", max_new_tokens=50)) is not None
    assert _settings_mismatch(record, make_grid(max_new_tokens=50)) is None  # no answers decoded: no matter
    # a task decodes (and records) its own budget unless the grid sets another: passkey's 38 is no mismatch
    task = dict(record, question="passkey", extra={"accuracy": 0.5, "max_new_tokens": 38})
    assert _settings_mismatch(task, make_grid(answers=True, questions="passkey")) is None
    assert _settings_mismatch(task, make_grid(answers=True, questions="passkey", max_new_tokens=50)) == \
        "max_new_tokens 38 (this sweep: 50)"


def test_preflight_does_not_wait_on_an_unreachable_hub(tmp_path, monkeypatch):
    """A hub id not in the cache while the hub does not answer: one line within the probe's 3 s, not
    minutes of retries (the original study's gated pair used to be the default)."""
    import socket
    import time as clock

    from huggingface_hub import constants
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401  (imported before the clock starts)

    from retrieval_heads.sweep import preflight

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    grid = make_grid(models=["someorg/not-cached"], tokens=[256])
    t = clock.monotonic()
    with pytest.raises(UserError, match=f"cannot load model 'someorg/not-cached': it is not in the local hub cache "
                                        f"and the hub \\(http://127.0.0.1:{port}\\) cannot be reached"):
        preflight(grid)
    assert clock.monotonic() - t < 3.5


def test_grid_lists_and_checks():
    g = make_grid(models="smollm2,smollm2", questions=["all"], tokens=["1024,2048", 1024], samples="3")
    assert g.models == ("smollm2",) and g.questions == tuple(ALL) and g.tokens == (1024, 2048) and g.samples == 3
    bad = [(dict(models=[]), "names no models"), (dict(questions=["inc_stat"]), "did you mean 'inc_state'"),
           (dict(models=["smolm2"]), "unknown model key"), (dict(tokens=[0]), "^tokens must be positive"),
           (dict(tokens=["2k"]), "not a whole number"), (dict(samples=0), "^samples must be positive"),
           (dict(needle_position=1.5), "[0, 1]"), (dict(method="nope"), "unknown method"),
           (dict(dtype="int8"), "unknown dtype"), (dict(sample=3), "unknown grid setting 'sample'")]
    for settings, msg in bad:
        with pytest.raises(UserError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            make_grid(**settings)


def test_grid_files(tmp_path):
    j = tmp_path / "grid.json"
    j.write_text(json.dumps({"models": ["smollm2"], "questions": "all", "tokens": [512], "samples": 2}))
    assert make_grid(**load_grid_file(j)).tokens == (512,)
    t = tmp_path / "grid.toml"
    t.write_text('models = ["smollm2"]\nquestions = ["hq_state"]\ntokens = [256, 512]\n')
    g = make_grid(**load_grid_file(t))
    assert g.questions == ("hq_state",) and g.tokens == (256, 512)
    for text, msg in [("{}", "names nothing"), ('{"samples": 3}', "names nothing"), ("[1]", "expected an object"),
                      ('{"models": [', "malformed JSON"), ('{"modles": ["x"]}', "did you mean 'models'")]:
        j.write_text(text)
        with pytest.raises(UserError, match=msg):
            load_grid_file(j)


def test_list_options_take_several_values():
    from retrieval_heads.cli import parse

    args = parse(["sweep", "--models", "a", "b", "--tokens", "1", "2", "--samples", "3", "--questions", "all"])
    assert (args.models, args.tokens, args.samples, args.questions) == (["a", "b"], ["1", "2"], 3, ["all"])
    for argv in (["--questions", "--tokens", "1"], ["--tokens"]):
        with pytest.raises(UserError, match="expected at least one argument"):
            parse(["sweep", *argv])


# --- bad input through the CLI: one line, exit 2, no output ----------------------------------------------


@pytest.mark.parametrize("args, msg", [
    (["--models", "smollm3"], "unknown model key 'smollm3' (did you mean 'smollm2'?)"),
    (["--models", "smollm2", "--questions", "inc_state", "ceo_name"], "unknown question 'ceo_name'"),
    (["--models", "smollm2", "--tokens", "1024", "9000"], "--tokens 9000 exceeds the 8192 positions"),
])
@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path, args, msg):
    """Through a real process: one line on stderr, exit 2, no traceback, no output dir."""
    out = tmp_path / "out"
    line = one_error_line(cli(*args, "--output-dir", str(out)))
    assert msg in line
    assert not out.exists()


@pytest.mark.parametrize("args, msg", [
    (["--models", "smollm2", "--tokens", "64"], "--tokens 64 is too small"),
    (["--models", "smollm2", "--tokens"], "argument --tokens: expected at least one argument"),
    (["--models", "/no/such/model"], "does not exist"),
    (["--models", "smollm2", "--samples", "0"], "--samples must be positive"),
    (["--models", "smollm2", "--needle-position", "1.5"], "--needle-position must lie in [0, 1]"),
    (["--models", "smollm2", "--tokens", "2k"], "not a whole number"),
])
def test_bad_input_in_process(tmp_path, capsys, args, msg):
    from retrieval_heads.cli import main

    out = tmp_path / "out"
    assert main(["sweep", *args, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0]
    assert not out.exists()


def _run_on_ray(grid, out, **kw):
    from retrieval_heads.sweep import run_ray_sweep

    return run_ray_sweep(grid, out, gpus_per_worker=1, **kw)


@pytest.mark.parametrize("engine", [run_sweep, _run_on_ray], ids=["local", "ray"])
def test_both_engines_check_the_device_before_the_output_dir(tmp_path, monkeypatch, engine):
    """Both engines share one setup (``sweep.prepare``): a device this machine does not have is one line, and
    the output dir is never made (the Ray engine once went on to the lock, then to Ray)."""
    monkeypatch.setattr("retrieval_heads.sweep.ray.import_ray", lambda: None)  # no Ray needed to get that far
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        engine(make_grid(models="smollm2", questions="passkey", tokens=256, samples=1, device="cuda:99"), out,
               check_models=False, echo=lambda s: None)
    assert str(e.value).startswith("device 'cuda:99' is not available on this machine")
    assert not out.exists()


def test_ray_on_a_cluster_leaves_the_device_to_its_workers(tmp_path, monkeypatch):
    """With ``address`` the workers run elsewhere: the driver does not check its own device, takes the lock,
    reads what is to do and only then connects."""
    from retrieval_heads.sweep import run_ray_sweep

    def connect(address):
        raise UserError(f"connect {address}")

    monkeypatch.setattr("retrieval_heads.sweep.ray.import_ray", lambda: None)
    monkeypatch.setattr("retrieval_heads.sweep.ray.reachable", lambda address: None)
    monkeypatch.setattr("retrieval_heads.sweep.ray.connect", connect)
    lines = []
    with pytest.raises(UserError, match="^connect head:6379$"):
        run_ray_sweep(make_grid(models="smollm2", questions="passkey", tokens=256, samples=1, device="cuda:99"),
                      tmp_path / "out", address="head:6379", gpus_per_worker=1, check_models=False,
                      echo=lines.append)
    assert lines == [f"sweep: 1 model(s) x 1 question(s) x 1 length(s) = 1 experiments, 1 samples each; 1 to "
                     f"compute on Ray -> {tmp_path / 'out' / 'summed_attention'}"]


def test_grid_file_that_names_nothing(tmp_path, capsys):
    from retrieval_heads.cli import main

    (tmp_path / "g.json").write_text('{"samples": 2}')
    assert main(["sweep", "--config", str(tmp_path / "g.json"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "names nothing" in capsys.readouterr().err and not (tmp_path / "out").exists()


# --- real sweeps on SmolLM2 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(smollm2, tmp_path_factory):
    """An uninterrupted sweep, in process, with the session's model."""
    out = tmp_path_factory.mktemp("reference")
    lines = []
    loads = []

    def load(model, **kw):
        loads.append(model)
        return smollm2

    s = run_sweep(make_grid(**GRID), out, load=load, progress=False, echo=lines.append)
    assert len(s.done) == 8 and not s.skipped and not s.recomputed
    assert loads == ["smollm2"]  # one load for the whole sweep
    return out, lines


def test_sweep_writes_detects_results(reference, smollm2):
    out, lines = reference
    assert len([x for x in lines if x.startswith("done ")]) == 8
    assert any("smollm2 hq_state" in x and "top L" in x for x in lines)
    rec = load_result(out / "summed_attention" / "smollm2_hq_state_320.json")
    det = detect(smollm2, question="hq_state", tokens=320, samples=2).record
    differ = {"timestamp", "checksum", "scores", "head_rankings", "top_50_heads", "lift", "control_scores",
              "significance"}
    assert {k: v for k, v in rec.items() if k not in differ} == {k: v for k, v in det.items() if k not in differ}
    assert list(rec) == list(det)
    torch.testing.assert_close(torch.tensor(rec["scores"]), torch.tensor(det["scores"]), atol=2e-5, rtol=0)
    # the chance fields: the same numbers within float tolerance (shared prefill vs full passes)
    for k in ("lift", "control_scores"):
        torch.testing.assert_close(torch.tensor(rec[k]), torch.tensor(det[k]), atol=2e-4, rtol=1e-4)
    assert rec["baseline"] == det["baseline"]
    sr, sd = rec["significance"], det["significance"]
    assert {k: v for k, v in sr.items() if k != "p_adjusted"} == {k: v for k, v in sd.items() if k != "p_adjusted"}


def test_rerun_skips_and_recomputes_corrupt(reference, smollm2, tmp_path):
    src, _ = reference
    out = tmp_path / "out"
    (out / "summed_attention").mkdir(parents=True)
    for p in (src / "summed_attention").glob("*.json"):
        (out / "summed_attention" / p.name).write_text(p.read_text())
    d = out / "summed_attention"
    (d / "smollm2_inc_year_320.json").write_text((d / "smollm2_inc_year_320.json").read_text()[:500])  # truncated
    rec = json.loads((d / "smollm2_hq_state_320.json").read_text())
    rec["head_rankings"][0]["score"] += 0.5  # hand-edited
    (d / "smollm2_hq_state_320.json").write_text(json.dumps(rec))
    lines = []
    s = run_sweep(make_grid(**GRID), out, load=lambda m, **kw: smollm2, progress=False, echo=lines.append)
    assert sorted(p.name for p in s.recomputed) == ["smollm2_hq_state_320.json", "smollm2_inc_year_320.json"]
    assert len(s.skipped) == 6 and not s.done
    assert any(x.startswith("recomputed smollm2 inc_year") and "corrupt result JSON" in x for x in lines)
    assert any(x.startswith("recomputed smollm2 hq_state") and "checksum mismatch" in x for x in lines)
    assert results(out) == results(src)
    # a valid result made with other settings is neither trusted nor overwritten
    with pytest.raises(UserError, match="samples_processed 2 \\(this sweep: 3\\)"):
        run_sweep(make_grid(**dict(GRID, samples=3)), out, load=lambda m, **kw: smollm2, progress=False)


def test_lock_in_process(tmp_path):
    with sweep_lock(tmp_path / "out"):
        with pytest.raises(UserError, match=f"another sweep \\(pid {os.getpid()}\\) is running"):
            with sweep_lock(tmp_path / "out"):
                pass
    with sweep_lock(tmp_path / "out"):  # released on exit
        pass
    st = unit_status(tmp_path / "out", make_grid(**GRID), Unit("smollm2", 256, tuple(ALL)))
    assert st.todo == [("summed_attention", q) for q in ALL]


@pytest.mark.slow
def test_second_sweep_on_a_locked_dir_fails_fast(tmp_path):
    """While one sweep holds the output dir, another process's sweep there stops with one line, exit 2,
    and writes nothing."""
    out = tmp_path / "out"
    with sweep_lock(out):
        proc = cli(*ARGS, "--output-dir", str(out))
        assert sorted(p.name for p in out.iterdir()) == [".sweep.lock"]
    line = one_error_line(proc)
    assert f"another sweep (pid {os.getpid()}) is running on {out}" in line
    assert not out.exists()  # the lock made the folder; nothing was written, so it goes with the lock


def test_kill9_mid_sweep_resumes_to_the_same_results(reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    first = subprocess.Popen([sys.executable, "-m", "retrieval_heads", "sweep", *ARGS, "--output-dir", str(out),
                              "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    d = out / "summed_attention"
    try:
        deadline = time.time() + 240
        while len(list(d.glob("*_256.json"))) < 4:  # the first unit is written; the second is running
            assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == -signal.SIGKILL
    before = len(list(d.glob("*.json")))
    assert 4 <= before < 8  # killed mid-sweep (a temp file of an interrupted write may remain; it is ignored)
    resumed = cli(*ARGS, "--output-dir", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("\nskipped ") == before and resumed.stdout.count("\ndone ") == 8 - before
    assert results(out) == results(ref)
