"""The command line itself (argparse), without loading a model: lists taken natively, flags both ways, usage
errors as one line with exit 2, ``--help`` on every subcommand."""

import json

import pytest

from conftest import cli, one_line
from retrieval_heads.cli import parse
from retrieval_heads.commands.ablate import parse_ks
from retrieval_heads.commands.sweep import grid_settings
from retrieval_heads.errors import UserError
from retrieval_heads.sweep import make_grid

COMMANDS = ["detect", "sweep", "ablate", "report", "export"]


def grid(*argv):
    return make_grid(**grid_settings(parse(["sweep", *argv])))


def test_lists_space_or_comma_separated_or_repeated():
    want = grid("--models", "smollm2", "--tokens", "1024", "2048")
    assert want.tokens == (1024, 2048)
    for tokens in (["1024,2048"], ["1024", "--tokens", "2048"], ["1024,", "2048"]):
        assert grid("--models", "smollm2", "--tokens", *tokens) == want, tokens
    depths = grid("--models", "smollm2", "--needle-positions", "0.1", "0.5", "0.9")
    assert depths.needle_positions == (0.1, 0.5, 0.9)
    assert grid("--models", "smollm2", "--needle-positions", "0.1,0.5,0.9") == depths
    both = grid("--models", "smollm2", "smollm2,smollm2", "--questions", "inc_state", "hq_state")
    assert both.models == ("smollm2",) and both.questions == ("inc_state", "hq_state")
    assert grid("--models", "smollm2", "--questions", "inc_state,hq_state") == both
    assert len(grid("--models", "smollm2", "--questions", "all").questions) == 4


def test_ks_space_or_comma_separated_or_repeated():
    want = [0, 5, 10]
    for ks in (["0", "5", "10"], ["0,5,10"], ["0", "--k", "5", "--k", "10"], ["0,5", "10"]):
        assert parse_ks(parse(["ablate", "r.json", "--k", *ks]).k) == want, ks
    assert parse_ks(parse(["ablate", "r.json"]).k) == [0, 5, 10, 20, 50]  # given ks replace the defaults
    with pytest.raises(UserError, match="--k: 'x' is not a whole number"):
        parse_ks(parse(["ablate", "r.json", "--k", "0", "x"]).k)


def test_a_list_option_does_not_swallow_later_options():
    args = parse(["sweep", "--models", "smollm2", "--tokens", "512", "--questions", "inc_state", "--samples", "2",
                  "--no-progress"])
    assert (args.models, args.tokens, args.questions, args.samples, args.progress) == \
        (["smollm2"], ["512"], ["inc_state"], 2, False)
    g = make_grid(**grid_settings(args))
    assert (g.models, g.tokens, g.questions, g.samples) == (("smollm2",), (512,), ("inc_state",), 2)
    args = parse(["detect", "--method", "summed_attention", "query_focused", "--span", "needle", "--top", "3"])
    assert (args.method, args.span, args.top) == (["summed_attention", "query_focused"], ["needle"], 3)


def test_the_ks_reach_the_api(tmp_path, monkeypatch, capfd):
    """``ablate RESULT --k 0 5 10 --random-seeds 1``: the API receives ks [0, 5, 10] and what follows them."""
    seen = {}

    class Done:
        record = {"summary": []}

        def write(self, out):
            seen["out"] = out

    def fake(result, model, ks, random_seeds, *rest, **kw):
        seen.update(result=result, ks=ks, random_seeds=random_seeds)
        return Done()

    monkeypatch.setattr("retrieval_heads.ablation.ablate", fake)
    result = tmp_path / "r.json"
    for ks in (["0", "5", "10"], ["0,5,10"]):
        rc, out, err = cli(capfd, "ablate", result, "--k", *ks, "--random-seeds", "1")
        assert rc == 0, err
        assert seen == {"result": result, "ks": [0, 5, 10], "random_seeds": 1,
                        "out": tmp_path / "r.ablation.json"}


def test_flags_both_ways_and_tri_state():
    sweep = parse(["sweep"])
    assert (sweep.answers, sweep.save_samples, sweep.trust_remote_code, sweep.progress) == (None, None, None, True)
    on = parse(["sweep", "--answers", "--save-samples", "--trust-remote-code", "--progress"])
    assert (on.answers, on.save_samples, on.trust_remote_code, on.progress) == (True, True, True, True)
    off = parse(["sweep", "--no-answers", "--no-save-samples", "--no-trust-remote-code", "--no-progress"])
    assert (off.answers, off.save_samples, off.trust_remote_code, off.progress) == (False, False, False, False)
    assert grid_settings(parse(["sweep"])) == {}  # nothing given: the grid file's settings (or the grid's)
    assert grid_settings(off) == {"answers": False, "save_samples": False, "trust_remote_code": False}
    detect = parse(["detect"])
    assert (detect.save_samples, detect.answers, detect.success_only, detect.trust_remote_code) == (False,) * 4
    assert parse(["detect", "--trust-remote-code", "--no-trust-remote-code"]).trust_remote_code is False
    assert parse(["ablate", "r.json", "--trust-remote-code"]).trust_remote_code is True


def test_negative_numbers_are_values(capfd):
    assert parse(["sweep", "--seed", "-1", "--needle-positions", "-0.5", "0.5"]).seed == -1
    assert parse(["ablate", "r.json", "--k", "-1", "0"]).k == ["-1", "0"]
    rc, _, err = cli(capfd, "detect", "--needle-position", "-0.5")
    one_line(rc, err, "--needle-position must lie in [0, 1], got -0.5")  # the API's own check
    rc, _, err = cli(capfd, "report", "no-such-folder", "--seed", "-1")
    one_line(rc, err, "--seed must be >= 0, got -1")


@pytest.mark.parametrize("argv, msg", [
    (["sweep", "--tokens"], "error: --tokens needs at least one value"),
    (["sweep", "--tokens", "--models", "smollm2"], "error: --tokens needs at least one value"),
    (["ablate", "r.json", "--k"], "error: --k needs at least one value"),
    (["detect", "--method"], "error: --method needs at least one value"),
    (["detect", "--frobnicate"], "error: No such option: --frobnicate"),
    (["detect", "--tokenz", "5"], "error: No such option: --tokenz (Possible options: --tokens, --top)"),
    # options are never abbreviated: --tok is not --tokens
    (["detect", "--tok", "5"], "error: No such option: --tok (Possible options: --method, --tokens, --top)"),
    (["sweep", "--model", "smollm2"], "error: No such option: --model (Possible options: --method, --models)"),
    (["--foo", "detect"], "error: No such option: --foo"),
    (["detect", "--seed"], "error: Option '--seed' requires an argument."),
    (["detect", "--tokens", "many"], "error: Invalid value for '--tokens': 'many' is not a valid integer."),
    (["sweep", "--needle-position", "mid"], "error: Invalid value for '--needle-position': 'mid' is not a valid "
                                            "number."),
    (["detect", "--save-samples=yes"], "error: Option '--save-samples' does not take a value."),
    (["detect", "stray"], "error: Got unexpected extra argument(s) (stray)"),
    (["ablate"], "error: Missing argument 'RESULT'."),
    (["export", "r.json"], "error: Missing option '--format'."),
    (["detekt"], "error: No such command 'detekt'."),
    ([], "error: Missing command."),
])
def test_usage_errors_are_one_line(capfd, argv, msg):
    rc, out, err = cli(capfd, *argv)
    assert one_line(rc, err) == msg and out == ""


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help(capfd, command):
    for flag in ("--help", "-h"):
        rc, out, err = cli(capfd, *command, flag)
        assert rc == 0 and err == "" and out.startswith("usage: retrieval-heads"), (command, err)
    if not command:
        assert all(c in out for c in COMMANDS)
    else:
        assert "[default:" in out


def test_help_wins_over_other_options(capfd):
    rc, out, err = cli(capfd, "sweep", "--tokens", "1024", "2048", "--help")
    assert rc == 0 and "--needle-positions DEPTH [DEPTH ...]" in out and err == ""


def test_sweep_flags_win_over_the_grid_file(tmp_path):
    g = tmp_path / "g.json"
    g.write_text(json.dumps({"models": ["smollm2"], "tokens": [256], "answers": True, "samples": 3}))
    got = grid("--config", str(g), "--tokens", "512", "1024", "--no-answers")
    assert (got.tokens, got.answers, got.samples) == ((512, 1024), False, 3)


def test_sweep_takes_several_methods():
    a = grid("--models", "smollm2", "--method", "summed_attention", "qrhead")
    b = grid("--models", "smollm2", "--method", "summed_attention,qrhead")
    assert a.methods == b.methods == ("summed_attention", "qrhead") and a.size == 2 * 4 * 4


def test_sweep_takes_span_kinds():
    a = grid("--models", "smollm2", "--span", "needle", "answer")
    b = grid("--models", "smollm2", "--span", "needle,answer")
    assert a.results == b.results == ("summed_attention", "summed_attention+answer")


@pytest.mark.parametrize("argv, msg", [
    (["ablate", ""], "RESULT is empty"),
    (["ablate", "r.json", "--dataset", ""], "--dataset is empty"),
    (["export", "", "--format", "kv"], "RESULT is empty"),
    (["report", ""], "RESULTS_DIR is empty"),
    (["detect", "--dataset", ""], "--dataset is empty"),
    (["sweep", "--config", ""], "--config is empty"),
])
def test_an_empty_path_is_not_the_current_folder(capfd, tmp_path, monkeypatch, argv, msg):
    """An empty path argument is refused (as --output-dir and --out are), never read as '.': ``report ""``
    would report on the current folder and write there, ``ablate ""`` failed with a traceback."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(capfd, *argv)
    one_line(rc, err, msg)
    assert out == "" and list(tmp_path.iterdir()) == []


def test_an_empty_model_is_refused_not_the_current_folder(capfd, tmp_path, monkeypatch):
    """``--model ""`` never loads the model folder the command runs in, nor (ablate) the folder a result's
    model_key names, which a result file's field must never choose."""
    import torch

    from retrieval_heads.ablation import ablate
    from retrieval_heads.results import make_record

    (tmp_path / "config.json").write_text("{}")  # the current folder looks like a model folder
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text("{}")  # and so does the folder the result's model_key names
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(capfd, "detect", "--model", "", "--output-dir", "out")
    one_line(rc, err, "the model is empty")
    rec = make_record(method="summed_attention", model_key="tiny", model_name="tiny", question="inc_state",
                      question_prompt="q", total_tokens=256, needle_position=0.5, scores=torch.ones(3, 4),
                      samples_processed=2, seed=0, dtype="float32")
    with pytest.raises(UserError, match="the model is empty"):
        ablate(rec, model="", ks=(0, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "tiny"]


@pytest.mark.parametrize("argv, msg", [
    (["detect", "--model", "SmolLM2"], ("error: unknown model key 'SmolLM2' (did you mean 'smollm2'?); choose from: "
                                        "smollm2, instruct, base")),
    (["detect", "--question", "Inc_State"], ("error: unknown question 'Inc_State' (did you mean 'inc_state'?); "
                                             "choose from: inc_state, inc_year, employee_count, hq_state")),
    (["sweep", "--models", "SMOLLM2"], ("error: unknown model key 'SMOLLM2' (did you mean 'smollm2'?); choose from: "
                                        "smollm2, instruct, base")),
    (["sweep", "--questions", "HQ_STATE"], ("error: unknown question 'HQ_STATE' (did you mean 'hq_state'?); "
                                            "choose from: inc_state, inc_year, employee_count, hq_state")),
    (["detect", "--method", "QRHead"], "did you mean 'qrhead'?"),
])
def test_a_name_in_the_wrong_case_gets_a_did_you_mean(capfd, tmp_path, argv, msg):
    rc, out, err = cli(capfd, *argv, "--output-dir", str(tmp_path / "out"))
    assert msg in one_line(rc, err) and out == ""
    assert not (tmp_path / "out").exists()
