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

from conftest import save_tiny
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
    from retrieval_heads import io as rio, models, onepass
    from retrieval_heads.cli import main

    at, fault = os.environ["FAULT_AT"], os.environ["FAULT"]
    # Ctrl-C as in a terminal, whatever this process inherited: a test run started in the background by a
    # non-interactive shell ignores SIGINT, and Python then installs no KeyboardInterrupt handler
    signal.signal(signal.SIGINT, signal.default_int_handler)

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
    elif at == "compute":  # the sweep's shared prefill (onepass.score_groups): fire after one batch of unit 2
        real_score, calls = onepass.score_groups, []

        def score_groups(lm, groups, questions, methods, answers=False, max_new_tokens=12, batch_size=1,
                         on_batch=None):
            calls.append(1)

            def batch_done(k):
                on_batch(k)
                if len(calls) == 2:
                    fire()

            return real_score(lm, groups, questions, methods, answers, max_new_tokens, batch_size, batch_done)

        onepass.score_groups = score_groups
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
    import retrieval_heads.cli, retrieval_heads.sweep, retrieval_heads.experiments, retrieval_heads.chance

    pids = {}
    for job in json.load(open(sys.argv[1])):
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
                f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
                os.close(f)
            for k, v in job["env"].items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
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
    from retrieval_heads.models import load_model

    d = save_tiny(tmp_path_factory.mktemp("models") / "tiny")
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
        (sweep + ["--questions"], "argument --questions: expected at least one argument"),
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
        # a sweep refuses pickle weights too, after the lock: it leaves no lock file, folder or progress bar
        (["sweep", "--models", pickled, "--tokens", "256", "--samples", "1"], "cannot load model"),
        # the flag wins over a grid file that turns remote code on; a string "false" is not false
        (["sweep", "--config", grid_file(d, "trusting.json", models=[str(remote)], tokens=[256], samples=1,
                                         trust_remote_code=True), "--no-trust-remote-code"], "cannot load model"),
        (["sweep", "--config", grid_file(d, "false.json", models=[str(remote)], tokens=[256], samples=1,
                                         trust_remote_code="false")],
         'trust_remote_code: expected true or false, got "false"'),
    ]


def grid_file(d, name, text=None, **settings):
    """A grid file ``d/name`` holding ``text`` or the JSON of ``settings``."""
    p = d / name
    p.write_text(text if text is not None else json.dumps(settings))
    return p


def typed_cases(model, d):
    """Grid files with a value of the wrong type, and other bad settings of a sweep: each is one line naming
    the field, before anything is made."""
    m = {"models": [model], "tokens": [256], "samples": 1}
    cases = [
        (dict(m, save_samples="no"), 'save_samples: expected true or false, got "no"'),
        (dict(m, needle_position=True), "needle_position: expected a number, got true"),
        (dict(m, tokens=2048.0), "tokens: expected a whole number or a list of whole numbers, got 2048.0"),
        (dict(m, tokens=[256, True]), "tokens: expected a whole number or a list of whole numbers, got true"),
        (dict(m, models=5), "models: expected a name or a list of names, got 5"),
        (dict(m, samples="2"), 'samples: expected a whole number, got "2"'),
        (dict(m, seed=0.5), "seed: expected a whole number, got 0.5"),
        (dict(m, device=["cpu"]), 'device: expected a name, got ["cpu"]'),
    ]
    out = [(["sweep", "--config", grid_file(d, f"typed{i}.json", **g)], f"grid file {d}/typed{i}.json: {msg}")
           for i, (g, msg) in enumerate(cases)]
    toml = grid_file(d, "float.toml", f'models = ["{model}"]\ntokens = 1.5\n')
    huge = grid_file(d, "huge.json", '{"models": ["%s"], "tokens": %s}' % (model, "9" * 5000))
    deep = grid_file(d, "deep.json", '{"models": ["%s"], "tokens": %s}' % (model, "[" * 5000 + "]" * 5000))
    sweep = ["sweep", "--models", model, "--tokens", "256", "--samples", "1"]
    out += [
        (["sweep", "--config", toml], f"grid file {toml}: tokens: expected a whole number or a list of whole "
                                      f"numbers, got 1.5"),
        (["sweep", "--config", huge], f"grid file {huge}: malformed JSON (Exceeds the limit"),
        (["sweep", "--config", deep], f"grid file {deep}: malformed JSON (nested deeper than"),
        (sweep + ["--questions", "all,bogus"], "unknown question 'bogus'"),
        (sweep + ["--questions", "all", "bogus"], "unknown question 'bogus'"),
        (sweep + ["--device", "foo"], "unknown device 'foo'"),
        (sweep + ["--device", "meta"], "cannot use device 'meta'"),
    ]
    if not torch.cuda.is_available():
        out.append((sweep + ["--device", "cuda"], "device 'cuda' is not available on this machine"))
    return out


def deep(n=100_000):
    return "[" * n + "]" * n


BIG = "9" * 5000  # an integer over Python's 4300-digit conversion limit


def hostile_json_cases(tiny, d):
    """Results, samples files and datasets nested too deep or holding huge numbers; files made under ``d``.
    Nothing may be written: each case's third item is a path that must not appear."""
    from retrieval_heads.results import make_record

    good = make_record(method="summed_attention", model_key="tiny", model_name=str(tiny[0]), question="inc_state",
                       question_prompt="Q", total_tokens=256, needle_position=0.5, scores=torch.rand(2, 4),
                       samples_processed=2, seed=0, dtype="float32")
    files = {}
    for name, text in [("deep", deep()), ("big", '{"scores": ' + BIG + "}"), ("inf", '{"scores": 1e999}')]:
        files[name] = d / f"{name}.json"
        files[name].write_text(text)
        folder = d / f"results_{name}" / "summed_attention"
        folder.mkdir(parents=True)
        (folder / "tiny_inc_state_256.json").write_text(text)
    for name, row in [("deep_samples", deep()), ("big_samples", '{"scores": [[' + BIG + "]]}")]:
        folder = d / f"results_{name}" / "summed_attention"
        folder.mkdir(parents=True)
        rio.atomic_write_json(folder / "tiny_inc_state_256.json", good)
        (folder / "tiny_inc_state_256.samples.jsonl").write_text(json.dumps({"scores": [[0.1] * 4] * 2}) + "\n" +
                                                                  row + "\n")
        files[name] = folder / "tiny_inc_state_256.json"
    for name, line in [("deep", deep()), ("big", '{"needle": ' + BIG + "}")]:
        files[name + "_data"] = d / f"{name}.jsonl"
        files[name + "_data"].write_text(json.dumps(GOOD) + "\n" + line + "\n")
    detect = ["detect", "--model", tiny[0], "--tokens", "256", "--samples", "1", "--output-dir", d / "det"]
    return [
        (["export", files["deep"], "--format", "kv", "--out", d / "x.json"], "deep.json: corrupt result JSON "
         "(nested deeper than 64 levels)", d / "x.json"),
        (["export", files["big"], "--format", "kv", "--out", d / "x.json"], "big.json: corrupt result JSON "
         "(Exceeds the limit (4300 digits)", d / "x.json"),
        (["export", files["inf"], "--format", "kv", "--out", d / "x.json"], "inf.json: corrupt result JSON "
         "(number 1e999 is out of range)", d / "x.json"),
        (["export", files["deep_samples"], "--format", "wu", "--out", d / "x.json"], "samples.jsonl: line 2 is "
         "not a per-sample score row (nested deeper than 64 levels)", d / "x.json"),
        (["export", files["big_samples"], "--format", "wu", "--out", d / "x.json"], "samples.jsonl: line 2 is "
         "not a per-sample score row (Exceeds the limit", d / "x.json"),
        (["ablate", files["deep"], "--out", d / "a.json"], "deep.json: corrupt result JSON", d / "a.json"),
        (["ablate", files["big"], "--out", d / "a.json"], "big.json: corrupt result JSON", d / "a.json"),
        (["report", d / "results_deep", "--out", d / "rep"], "tiny_inc_state_256.json: corrupt result JSON "
         "(nested deeper than 64 levels)", d / "rep"),
        (["report", d / "results_big", "--out", d / "rep"], "tiny_inc_state_256.json: corrupt result JSON", d / "rep"),
        (["report", d / "results_deep_samples", "--out", d / "rep"], "samples.jsonl: line 2 is not a per-sample "
         "score row (nested deeper than 64 levels)", d / "rep"),
        (detect + ["--dataset", files["deep_data"]], "deep.jsonl:2: malformed JSON (nested deeper than 64 levels)",
         d / "det"),
        (detect + ["--dataset", files["big_data"]], "big.jsonl:2: malformed JSON (Exceeds the limit (4300 digits)",
         d / "det"),
    ]


def odd_option_cases(tiny, d):
    """Options and model configs that used to end in a traceback; (argv, message, path that must not appear)."""
    model = tiny[0]
    configs = {}
    cfg = json.loads((model / "config.json").read_text())
    for name, text in [("abc", json.dumps(dict(cfg, hidden_size="abc"))),
                       ("nolayers", json.dumps(dict(cfg, num_hidden_layers=0))),
                       ("deepcfg", json.dumps(cfg)[:-1] + ', "x": ' + deep() + "}")]:
        configs[name] = d / name
        shutil.copytree(model, configs[name])
        (configs[name] / "config.json").write_text(text)
    result = d / "r" / "tiny_inc_state_256.json"
    from retrieval_heads.results import make_record

    rio.atomic_write_json(result, make_record(
        method="summed_attention", model_key="tiny", model_name=str(model), question="inc_state",
        question_prompt="Q", total_tokens=256, needle_position=0.5, scores=torch.rand(2, 4), samples_processed=1,
        seed=0, dtype="float32"))
    out = d / "out"
    run = ["--tokens", "256", "--samples", "1", "--output-dir", out]
    return [
        (["report", d / "r", "--seed", "-1", "--out", d / "rep"], "--seed must be >= 0, got -1", d / "rep"),
        (["detect", "--model", model, "--device", "meta", *run], "cannot use device 'meta'", out),
        (["sweep", "--models", model, "--device", "meta", *run[:-1], d / "sw"], "cannot use device 'meta'",
         d / "sw" / "summed_attention"),
        (["ablate", result, "--k", "0", "1", "--model", model, "--device", "meta", "--out", d / "a.json"],
         "cannot use device 'meta'", d / "a.json"),
        (["detect", "--model", model, "--top", "-1", *run], "--top must be >= 0, got -1", out),
        (["detect", "--model", configs["abc"], *run], "Validation error for field 'hidden_size': TypeError: Field "
         "'hidden_size' expected int, got str (value: 'abc')", out),
        (["detect", "--model", configs["nolayers"], *run], "has no attention heads to score (0 layers, 4 heads)", out),
        (["detect", "--model", configs["deepcfg"], *run], "cannot load model", out),
        (["detect", "--model", "someorg/not-cached", *run], "cannot load model 'someorg/not-cached': it is not in "
         "the local hub cache and HF_HUB_OFFLINE is set", out),
    ]


@pytest.fixture(scope="module")
def readonly_dir(tmp_path_factory):
    """A read-only folder: a read-only tmpfs for root (permissions do not stop root), mode 0555 for others;
    None where neither is possible."""
    d = tmp_path_factory.mktemp("ro") / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True,
                      check=False).returncode != 0:
        yield None
        return
    yield d
    subprocess.run(["umount", str(d)], check=True)


def cache_cases(d, readonly):
    """An unwritable model cache for the embedded model's first conversion: (env, argv, message)."""
    blocker = d / "a_file"
    blocker.write_text("")
    envs = [{"RETRIEVAL_HEADS_CACHE": str(blocker / "cache")}]
    if readonly is not None:
        envs += [{"RETRIEVAL_HEADS_CACHE": str(readonly)},  # the folder exists; its lock file cannot be made
                 {"RETRIEVAL_HEADS_CACHE": None, "XDG_CACHE_HOME": None, "HOME": str(readonly)}]
    return [(env, ["detect", "--model", "smollm2", "--tokens", "256", "--samples", "1", "--output-dir",
                   d / f"out{i}"], "cannot write the model cache ") for i, env in enumerate(envs)]


FAULTS = [(at, sig) for sig in ("KILL", "INT") for at in ("load", "compute", "write")] + [("write", "ENOSPC")]


@pytest.fixture(scope="module")
def runs(tiny, readonly_dir, tmp_path_factory):
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
            model, d)), ("untrusted", lambda d: untrusted_cases(tiny, d)),
                      ("typed", lambda d: typed_cases(model, d))]:
        (base / name).mkdir()
        groups[name] = [(args + ["--output-dir", base / name / f"out{i}"] if "--output-dir" not in args else args,
                         msg) for i, (args, msg) in enumerate(make(base / name))]
    data = base / "warn.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps(dict(GOOD, answer="Nevada")) + "\n")
    groups["warning"] = [(["detect", "--model", model, "--dataset", data, "--tokens", "256", "--samples", "2",
                           "--output-dir", base / "warn-out"], "")]
    made = {}  # cases that check a path of their own; the others an --output-dir
    for name, make in [("json", hostile_json_cases), ("odd", odd_option_cases)]:
        (base / name).mkdir()
        made[name] = make(tiny, base / name)
        groups[name] = [(args, msg) for args, msg, _ in made[name]]
    flat = [[str(a) for a in args] for g in groups.values() for args, _ in g]
    (base / "cases.json").write_text(json.dumps(flat))
    job("driver", "driver", [base / "cases.json"])
    (base / "cache").mkdir()
    alone = {"cache": cache_cases(base / "cache", readonly_dir)}  # one driver each: their own environment
    for g, cases in alone.items():
        for i, (environ, args, _) in enumerate(cases):
            (base / f"{g}{i}.json").write_text(json.dumps([[str(a) for a in args]]))
            job(f"{g}{i}", "driver", [base / f"{g}{i}.json"], **environ)
    (base / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(base / "jobs.json")], capture_output=True,
                          text=True, env=env(), timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    text = {j["name"]: ((base / f"{j['name']}.out").read_text(), (base / f"{j['name']}.err").read_text())
            for j in jobs}
    assert all(codes[j["name"]] == 0 for j in jobs if j["script"] == "driver"), text
    got = iter(json.loads(text["driver"][0].strip().splitlines()[-1]))
    cli = {g: [(args, msg, next(got), args[args.index("--output-dir") + 1] if g not in made else str(made[g][i][2]))
               for i, (args, msg) in enumerate(cases)] for g, cases in groups.items()}
    for g, cases in alone.items():
        cli[g] = [(args, msg, json.loads(text[f"{g}{i}"][0].strip().splitlines()[-1])[0],
                   str(args[args.index("--output-dir") + 1])) for i, (_, args, msg) in enumerate(cases)]
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


def corrupt_reasons(tiny, grid, out) -> dict[str, str]:
    """{file name: why} of the results the sweep's resume marks corrupt in ``out``."""
    key = tiny[0].name
    reasons = {}
    for t in TOKENS:
        st = unit_status(out, grid, Unit(str(tiny[0]), t, tuple(QUESTIONS)), key)
        reasons.update({f"{key}_{q}_{t}.json": st.reason[m, q] for m, q in st.state if st.state[m, q] == "corrupt"})
    return reasons


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
    reasons = corrupt_reasons(tiny, grid, out)
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


def test_hostile_json_is_one_line(runs):
    """Results, samples files and datasets nested too deep, with integers over the digit limit or floats that
    overflow: one line naming the file (and line), exit 2, nothing written (export, ablate, report, detect)."""
    assert len(runs["cli"]["json"]) == 12
    for args, msg, r, out in runs["cli"]["json"]:
        one_error_line(r, msg)
        assert "Traceback" not in r["stderr"] and r["stdout"] == ""
        assert not os.path.exists(out), args


def test_odd_options_devices_and_configs_are_one_line(runs):
    """report --seed -1, --device meta (detect, sweep, ablate), detect --top -1, a config with a field of the
    wrong type, no layers or nesting too deep, an uncached hub id offline: one line, exit 2, nothing written."""
    assert len(runs["cli"]["odd"]) == 9
    for args, msg, r, out in runs["cli"]["odd"]:
        one_error_line(r, msg)
        assert "Traceback" not in r["stderr"] and r["stdout"] == ""
        assert not os.path.exists(out), args


def test_unwritable_model_cache_is_one_line(runs, readonly_dir):
    """The embedded model's cache under a file, on a read-only folder, or under a read-only HOME: one line
    naming the cache folder, before the conversion starts (no "converting ..." line), nothing written."""
    cases = runs["cli"]["cache"]
    assert len(cases) == (1 if readonly_dir is None else 3)
    for args, msg, r, out in cases:
        line = one_error_line(r, msg)
        assert line.endswith("(set RETRIEVAL_HEADS_CACHE to a writable folder)")
        assert not os.path.exists(out), args
    if readonly_dir is not None:
        assert os.listdir(readonly_dir) == []


HUB_CHECK = textwrap.dedent("""
    import json, sys, time
    import torch, transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # imported before the clock starts
    import retrieval_heads.experiments
    from retrieval_heads.cli import main

    t = time.monotonic()
    rc = main(sys.argv[1:])
    print(json.dumps({"rc": rc, "seconds": time.monotonic() - t}))
""")


@pytest.mark.slow  # starts other processes
def test_unreachable_hub_fails_fast_with_one_line(tmp_path):
    """A hub id not in the local cache while the hub does not answer (a closed port): one line within a few
    seconds, not minutes of retries with a warning per retry."""
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environ = {k: v for k, v in env().items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    environ.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", HUB_CHECK, "detect", "--model", "someorg/not-cached", "--tokens",
                           "256", "--samples", "1", "--output-dir", str(out)], capture_output=True, text=True,
                          env=environ, timeout=300, check=False)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    one_error_line({"rc": got["rc"], "stderr": proc.stderr}, f"cannot load model 'someorg/not-cached': it is not in "
                   f"the local hub cache and the hub (http://127.0.0.1:{port}) cannot be reached")
    assert got["seconds"] < 10, got
    assert not out.exists()


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


# --- 5. hostile files and flags: typed grids, checked names, the lock, the temp files --------------------------


def test_grid_values_of_the_wrong_type_are_one_line(runs):
    """A grid file is typed strictly (a string "no" is not false, 2048.0 not a length, true not a depth), a
    huge or deep number in a JSON grid is malformed JSON (not "TOML"), and unknown questions next to ``all``
    or an unusable ``--device`` are errors: one line naming the field, exit 2, nothing made."""
    assert len(runs["cli"]["typed"]) == 15 + (not torch.cuda.is_available())
    for args, msg, r, out in runs["cli"]["typed"]:
        line = one_error_line(r, msg)
        assert "TOML" not in line or args[-1].endswith(".toml")
        assert r["stdout"] == "" and not os.path.exists(out), args


def test_make_grid_takes_real_booleans_only():
    """The Python API keeps CLI strings for lists and numbers, but a boolean must be a bool."""
    g = make_grid(models="smollm2", tokens="256,320", samples="2", trust_remote_code=False, save_samples=True)
    assert g.tokens == (256, 320) and g.samples == 2 and g.save_samples is True and g.trust_remote_code is False
    for settings, msg in [(dict(trust_remote_code="false"), 'trust_remote_code: expected true or false, got "false"'),
                          (dict(save_samples=1), "save_samples: expected true or false, got 1"),
                          (dict(needle_position=True), "needle_position: expected a number, got true"),
                          (dict(tokens=[2048.0]), "tokens: expected a whole number"),
                          (dict(questions="all,bogus"), "unknown question 'bogus'")]:
        with pytest.raises(UserError, match=msg.replace("(", r"\(")):
            make_grid(models="smollm2", **settings)


def test_flags_override_the_grid_file_both_ways(tmp_path, monkeypatch):
    """``--no-trust-remote-code`` beats a grid's true (and ``--trust-remote-code`` a grid's false), like
    ``--save-samples/--no-save-samples``."""
    from retrieval_heads import sweep as sweep_module
    from retrieval_heads.cli import main

    seen = []

    def fake_run(grid, out, **kw):
        seen.append(grid)
        return sweep_module.SweepSummary()

    monkeypatch.setattr(sweep_module, "run_sweep", fake_run)
    on = grid_file(tmp_path, "on.json", models=["smollm2"], trust_remote_code=True, save_samples=True)
    off = grid_file(tmp_path, "off.json", models=["smollm2"], trust_remote_code=False, save_samples=False)
    out = str(tmp_path / "out")
    for cfg, flags, want in [(on, ["--no-trust-remote-code", "--no-save-samples"], False),
                             (off, ["--trust-remote-code", "--save-samples"], True),
                             (on, [], True), (off, [], False)]:
        assert main(["sweep", "--config", str(cfg), *flags, "--output-dir", out]) == 0
        assert (seen[-1].trust_remote_code, seen[-1].save_samples) == (want, want), (cfg.name, flags)


def _escaping_result(field, value):
    from retrieval_heads.results import make_record

    kw = dict(method="summed_attention", model_key="m", model_name="m", question="inc_state",
              question_prompt="q", total_tokens=256, needle_position=0.5, scores=torch.rand(2, 4),
              samples_processed=2, seed=0, dtype="float32")
    kw[field] = value
    return make_record(**kw)


@pytest.mark.parametrize("field", ["model_key", "method", "question"])
def test_result_names_never_leave_the_folder(tmp_path, capsys, field):
    """A result (checksum recomputed) whose model_key, method or question is ``../../../escape``: ``report``
    refuses it on read with one line naming the field, and writes nothing outside (or inside) its folder."""
    from retrieval_heads.cli import main

    res = tmp_path / "a" / "b" / "results"
    (res / "summed_attention").mkdir(parents=True)
    (res / "summed_attention" / "r.json").write_text(json.dumps(_escaping_result(field, "../../../escape")))
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["report", str(res), "--out", str(tmp_path / "a" / "b" / "report"), "--resamples", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"{field}: " in err[0], err
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_result_names_are_checked_on_write_and_read(tmp_path):
    """One name check (``results.check_name``) for every file name made from a field: on write
    (``result_path``), on read (``validate``, so a sweep recomputes such a file), and for the report's figures.
    Numbers that go into names or settings are of their type."""
    from retrieval_heads.experiments import write_result
    from retrieval_heads.report.build import figure_path
    from retrieval_heads.report.collect import Experiment
    from retrieval_heads.results import _checksum, check_name, result_path, validate

    for bad in ["", "..", "../x", "a/b", "a\\b", ".hidden", "a..b", "x" * 129, "sp ace", "new\nline", 5, None]:
        with pytest.raises(UserError, match="model_key: "):
            check_name(bad, "model_key")
        with pytest.raises(UserError, match="question: "):
            result_path(tmp_path, "summed_attention", "m", bad, 256)
    assert check_name("org--SmolLM2-1.7B_v+1", "model_key") == "org--SmolLM2-1.7B_v+1"
    with pytest.raises(UserError, match="model_key: "):
        write_result(tmp_path, _escaping_result("model_key", "../x"), [], torch.zeros(0, 2, 4), False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="total_tokens: "):
        result_path(tmp_path, "summed_attention", "m", "q", True)
    with pytest.raises(UserError, match="method: "):
        figure_path(Experiment(_escaping_result("method", "../.."), tmp_path / "r.json", "r.json"))
    for field, value in [("model_key", "../x"), ("method", "a/b"), ("question", ".x"), ("total_tokens", "256"),
                         ("total_tokens", True), ("needle_position", True), ("seed", "0"),
                         ("samples_processed", 2.0)]:
        rec = _escaping_result("model_key", "m")
        rec[field] = value
        rec["checksum"] = _checksum(rec)  # recomputed: only the field's own check can catch it
        with pytest.raises(UserError, match=f"r.json: {field}: "):
            validate(rec, "r.json")


def test_local_names_become_safe_keys(tmp_path, tiny):
    """A model folder or a dataset file may be named anything; the key of its results is made safe."""
    from retrieval_heads import detect
    from retrieval_heads.models import resolve
    from retrieval_heads.results import check_name, safe_key

    for name in ["my model (v2)", "..dots..", "-x", "Ünïcode", "a\\b", "x" * 200]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        key = resolve(str(d))[0]
        assert check_name(key, "model_key") == key == safe_key(name)
    assert safe_key("my model (v2)") == "my_model__v2_" and safe_key("..dots..") == "_dots_"
    data = tmp_path / "my data.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    res = detect(tiny[1], dataset=data, tokens=256, samples=1, output_dir=tmp_path / "out")
    assert res.path == tmp_path / "out" / "summed_attention" / f"{tiny[1].key}_my_data_256.json"


def test_ablate_never_loads_a_folder_named_by_a_result(tmp_path, tiny, monkeypatch, capsys):
    """A result's model_key is loaded only when it is a built-in key: a result saying ``tiny`` must not load
    ``./tiny`` (a folder that happens to be there, maybe with code); ``--model`` names the model."""
    from retrieval_heads.cli import main

    monkeypatch.chdir(tmp_path)
    os.symlink(tiny[0], tmp_path / "tiny")
    r = tmp_path / "r.json"
    rec = _escaping_result("model_key", "tiny")
    r.write_text(json.dumps(rec))
    assert main(["ablate", str(r), "--k", "0", "--random-seeds", "0", "--samples", "1", "--tokens", "256"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass the model with --model" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "tiny"]


def test_empty_output_paths_are_errors(tmp_path, tiny, monkeypatch, capsys):
    """``--output-dir ""`` (sweep, detect) and ``--out ""`` (report, export, ablate) are errors, never the
    current folder."""
    from retrieval_heads.cli import main

    work = tmp_path / "cwd"
    work.mkdir()
    res = tmp_path / "res"
    (res / "summed_attention").mkdir(parents=True)
    r = res / "summed_attention" / "smollm2_inc_state_256.json"
    r.write_text(json.dumps(_escaping_result("model_key", "smollm2")))
    monkeypatch.chdir(work)
    model = str(tiny[0])
    for argv, opt in [(["sweep", "--models", model, "--tokens", "256", "--samples", "1", "--no-progress",
                        "--output-dir", ""], "--output-dir"),
                      (["detect", "--model", model, "--tokens", "256", "--samples", "1", "--output-dir", ""],
                       "--output-dir"),
                      (["report", str(res), "--out", "", "--resamples", "10"], "--out"),
                      (["export", str(r), "--format", "qrhead", "--out", ""], "--out"),
                      (["ablate", str(r), "--k", "0", "--random-seeds", "0", "--out", " "], "--out")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {opt} is empty; give a path (use . for the current folder)"], (argv, err)
        assert list(work.iterdir()) == [], argv
    assert sorted(p.name for p in res.rglob("*")) == ["smollm2_inc_state_256.json", "summed_attention"]


def test_lock_is_never_written_through_a_link(tmp_path):
    """``OUT/.sweep.lock`` as a symbolic link: an error line, the link's target untouched. As a hard link to
    a user's file: that file keeps its content (the note is a new file). On leaving, the note goes."""
    from retrieval_heads.sweep import sweep_lock

    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, out / ".sweep.lock")
    with pytest.raises(UserError, match="is a symbolic link"):
        with sweep_lock(out):
            pass
    assert victim.read_text() == "precious\n" and os.path.islink(out / ".sweep.lock")
    os.unlink(out / ".sweep.lock")
    os.link(victim, out / ".sweep.lock")
    with sweep_lock(out) as note:
        assert note.read_text() == f"{os.getpid()} sweep\n" and not os.path.samefile(note, victim)
    assert victim.read_text() == "precious\n" and sorted(out.iterdir()) == []


HOLD_LOCK = textwrap.dedent("""
    import sys
    from retrieval_heads.sweep import sweep_lock
    with sweep_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
""")


@pytest.mark.slow  # starts other processes
def test_removing_the_lock_file_does_not_release_the_lock(tmp_path):
    """Another process holds the sweep lock; deleting (or replacing) ``OUT/.sweep.lock`` does not let a
    second sweep start on ``OUT``: the lock is on the folder itself."""
    from retrieval_heads.sweep import sweep_lock

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"another sweep \\(pid {holder.pid}\\) is running"):
            with sweep_lock(out):
                pass
        os.unlink(out / ".sweep.lock")
        with pytest.raises(UserError, match="another retrieval-heads command \\(pid \\?\\) is running"):
            with sweep_lock(out):
                pass
        (out / ".sweep.lock").write_text("1\n")  # a forged note changes only the message
        with pytest.raises(UserError, match="another retrieval-heads command \\(pid 1\\) is running"):
            with sweep_lock(out):
                pass
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    with sweep_lock(out):  # released with its holder
        pass


def test_cleanup_removes_only_its_own_temp_files(tiny, grid, reference, tmp_path):
    """Taking the lock removes the temp files of the writer's own naming for this sweep's result and
    samples files, in its own method folder; a user's ``.notes.tmp``, other folders' files and the writer's
    temp files of other targets stay."""
    from retrieval_heads.io import TEMP_SUFFIX, TEMP_TAG

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    d = out / "summed_attention"
    key = tiny[0].name
    ours = [d / f".{key}_{QUESTIONS[0]}_{TOKENS[0]}.json{TEMP_TAG}k2x_9a0b{TEMP_SUFFIX}",
            d / f".{key}_{QUESTIONS[1]}_{TOKENS[1]}.samples.jsonl{TEMP_TAG}abcdefgh{TEMP_SUFFIX}"]
    keep = [d / ".notes.tmp", d / ".x.json.tmp", out / "mine" / ".notes.tmp",
            out / "mine" / f".{key}_{QUESTIONS[0]}_{TOKENS[0]}.json{TEMP_TAG}k2x_9a0b{TEMP_SUFFIX}",
            d / f".other_inc_state_256.json{TEMP_TAG}k2x_9a0b{TEMP_SUFFIX}",
            out / "query_focused" / f".{key}_{QUESTIONS[0]}_{TOKENS[0]}.json{TEMP_TAG}k2x_9a0b{TEMP_SUFFIX}"]
    for p in ours + keep:
        p.parent.mkdir(exist_ok=True)
        p.write_text("x")
    s, _ = resume(tiny, grid, out)
    assert len(s.skipped) == 4
    assert not any(p.exists() for p in ours) and all(p.read_text() == "x" for p in keep)


def test_failed_load_leaves_no_lock_no_folder_no_bar(tmp_path, grid, capsys):
    """A model that fails to load after the lock is taken: the sweep's pid note and the folders it made go
    with it, and no progress bar was drawn; an output dir that existed keeps what it had."""
    def load(m, **kw):
        raise UserError("cannot load model 'x': no weights")

    for out, before in [(tmp_path / "new" / "out", None), (tmp_path / "old", ["keep.txt"])]:
        if before:
            out.mkdir()
            (out / "keep.txt").write_text("x")
        with pytest.raises(UserError, match="no weights"):
            run_sweep(grid, out, load=load, progress=True, echo=lambda s: None)
        assert capsys.readouterr().err == ""
        if before:
            assert sorted(p.name for p in out.iterdir()) == before
        else:
            assert not (tmp_path / "new").exists()


# --- 5. all or nothing: detect's result and samples file, the report folder, the embedded model's conversion ---


class FullAfter:
    """Stands in for ``os`` in retrieval_heads.io: the disk is full from the ``n``-th fsync on (1-based)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def fsync(self, fd):
        self.calls += 1
        if self.calls >= self.n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.fsync(fd)


def tree(d):
    """{relative path: bytes} of every file under ``d`` (temp files included)."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over-earlier-run"])
def test_full_disk_in_detect_leaves_no_samples_file_without_its_result(tiny, tmp_path, monkeypatch, earlier):
    """The result write fails after the samples file is written: neither file of this run is left, and the
    files of an earlier run of the same experiment stay as they were (a matching pair)."""
    from retrieval_heads.experiments import detect

    out = tmp_path / "out"
    if earlier:
        detect(tiny[1], question="inc_state", tokens=256, samples=2, seed=1, output_dir=out, save_samples=True)
    before = tree(tmp_path)
    monkeypatch.setattr(rio, "os", FullAfter(2))  # 1: the samples file, 2: the result
    with pytest.raises(UserError, match=r"cannot write .*tiny_inc_state_256\.json: No space left on device"):
        detect(tiny[1], question="inc_state", tokens=256, samples=2, seed=0, output_dir=out, save_samples=True)
    monkeypatch.undo()
    after = tree(tmp_path)
    assert after == before  # no samples file alone, no temp file, the earlier pair untouched
    assert len(after) == (2 if earlier else 0)


@pytest.mark.parametrize("fail_at", ["first", "last"])
@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over-earlier-report"])
def test_full_disk_in_report_leaves_the_earlier_report_or_nothing(reference, tmp_path, monkeypatch, fail_at,
                                                                   earlier):
    """The disk fills at the first figure or at report.html (the last file): no partial report folder, no
    temp folder, and an earlier report is kept whole; the next run replaces it only when complete."""
    from retrieval_heads.cli import main

    results_dir = tmp_path / "results"
    shutil.copytree(reference, results_dir)
    out = tmp_path / "site" / "report"  # its parent is made by the run, and removed on failure
    args = ["report", str(results_dir), "--out", str(out), "--resamples", "20"]
    if earlier:
        assert main(args) == 0
        (out / "figures" / "stale.png").write_bytes(b"png")  # a figure of an experiment gone since
    before = tree(tmp_path)
    files = 3 + 1 + 4  # report.json/md/html, grid.png, one heatmap per experiment
    full = FullAfter(1 if fail_at == "first" else files)
    monkeypatch.setattr(rio, "os", full)
    assert main(args) == 2
    monkeypatch.undo()
    assert full.calls == (1 if fail_at == "first" else files)
    assert tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["results", "site"] if earlier else ["results"])
    if earlier:
        assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["report"]
        assert main(args) == 0  # replaced when complete: the stale figure is gone with the old folder
        assert not (out / "figures" / "stale.png").exists() and (out / "report.html").exists()


def test_report_never_replaces_a_folder_with_other_files(reference, tmp_path, capsys):
    """--out naming a folder that holds anything but a report: refused with one line, the folder untouched."""
    from retrieval_heads.cli import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["report", str(reference), "--out", str(out), "--resamples", "20"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {out} holds files that are not part of a report "
                                                   "(notes.txt)")
    assert tree(tmp_path) == {"mine/notes.txt": b"keep me"}


def test_resume_recomputes_results_nested_too_deep_or_with_huge_numbers(tiny, grid, reference, tmp_path):
    """Inside a sweep folder such a file is a corrupt result (named, with its reason) and is recomputed."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    d = out / "summed_attention"
    files = sorted(d.glob("*.json"))
    damage = {files[0].name: (deep(), "nested deeper than 64 levels"),
              files[1].name: ('{"scores": ' + BIG + "}", "Exceeds the limit (4300 digits)"),
              files[2].name: ('{"scores": -1e999}', "number -1e999 is out of range")}
    for name, (text, _) in damage.items():
        (d / name).write_text(text)
    reasons = corrupt_reasons(tiny, grid, out)
    assert sorted(reasons) == sorted(damage)
    for name, (_, why) in damage.items():
        assert reasons[name].startswith("corrupt result JSON (") and why in reasons[name], reasons[name]
    s, _ = resume(tiny, grid, out)
    assert sorted(p.name for p in s.recomputed) == sorted(damage) and len(s.skipped) == 1
    assert results(out) == results(reference)


KILLED_CONVERSION = textwrap.dedent("""
    from retrieval_heads import models
    models.smollm2_path()
""")


@pytest.mark.slow  # starts other processes
def test_killed_conversion_leaves_nothing_the_next_one_does_not_remove(tmp_path, monkeypatch):
    """A first conversion killed by SIGKILL leaves its temp folder ``.smollm2-*``; the next conversion removes
    it (and no other folder) while holding the cache's lock, which also serialises concurrent first runs."""
    import fcntl
    import threading
    import time

    from retrieval_heads import models

    cache = tmp_path / "cache"
    environ = dict(env(), RETRIEVAL_HEADS_CACHE=str(cache))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CONVERSION], env=environ, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob(".smollm2-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    (stale,) = cache.glob(".smollm2-*")
    (cache / ".smollm2-note.txt").write_text("a file, not ours")
    (cache / "other").mkdir()

    converted = []

    def fake_convert(target):  # what the conversion leaves when it succeeds
        converted.append(sorted(p.name for p in cache.iterdir()))
        target.mkdir()
        header = b'{"w":{"dtype":"U8","shape":[7],"data_offsets":[0,7]}}'
        (target / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"weights")
        (target / "config.json").write_text("{}")

    monkeypatch.setenv("RETRIEVAL_HEADS_CACHE", str(cache))
    monkeypatch.setattr(models, "_convert", fake_convert)
    holder = os.open(cache / models.CONVERSION_LOCK, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process converting right now
    got = []
    runners = [threading.Thread(target=lambda: got.append(models.smollm2_path())) for _ in range(2)]
    for r in runners:
        r.start()
    time.sleep(0.5)
    assert got == [] and stale.exists()  # both wait; a temp folder that may be in use is not touched
    os.close(holder)
    for r in runners:
        r.join(30)
    assert got == [cache / "smollm2-135m-instruct"] * 2
    assert len(converted) == 1  # the second found the first's model
    assert ".smollm2-note.txt" in converted[0] and "other" in converted[0] and stale.name not in converted[0]
    assert sorted(p.name for p in cache.iterdir()) == sorted([".smollm2-note.txt", ".smollm2.lock", "other",
                                                              "smollm2-135m-instruct"])


@pytest.mark.parametrize("fail_at", [1, 2], ids=["plot", "json"])
def test_full_disk_in_ablate_leaves_neither_file(tiny, reference, tmp_path, monkeypatch, capsys, fail_at):
    """ablate writes its plot and its JSON as one: the disk filling at either leaves neither (before, the
    JSON was written and the plot then failed)."""
    from retrieval_heads.cli import main

    result = min((reference / "summed_attention").glob("*.json"))
    out = tmp_path / "abl.json"
    monkeypatch.setattr(rio, "os", FullAfter(fail_at))
    assert main(["ablate", str(result), "--model", str(tiny[0]), "--k", "0", "1", "--random-seeds", "0",
                 "--samples", "1", "--out", str(out)]) == 2
    monkeypatch.undo()
    name = "abl.png" if fail_at == 1 else "abl.json"
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: cannot write {tmp_path / name}: " \
                                                                "No space left on device"
    assert list(tmp_path.iterdir()) == []
