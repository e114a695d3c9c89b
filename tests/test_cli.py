"""The command line itself (argparse), without loading a model: lists taken natively, flags both ways, usage
errors as one line with exit 2, ``--help`` on every subcommand."""

import re

import pytest

from conftest import cli, one_line
from retrieval_heads.cli import parse
from retrieval_heads.commands.ablate import parse_ks
from retrieval_heads.commands.sweep import grid_settings
from retrieval_heads.errors import UserError
from retrieval_heads.sweep import make_grid

COMMANDS = ["detect", "sweep", "report", "ablate", "export"]


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
    assert (detect.save_samples, detect.success_only, detect.trust_remote_code) == (False,) * 3
    assert detect.answers is None  # the question's default: on for a task, off for a filing question
    assert parse(["detect", "--trust-remote-code", "--no-trust-remote-code"]).trust_remote_code is False
    assert parse(["ablate", "r.json", "--trust-remote-code"]).trust_remote_code is True


def test_negative_numbers_are_values(capfd):
    assert parse(["sweep", "--seed", "-1", "--needle-positions", "-0.5", "0.5"]).seed == -1
    assert parse(["ablate", "r.json", "--k", "-1", "0"]).k == ["-1", "0"]
    rc, _, err = cli(capfd, "detect", "--needle-position", "-0.5")
    one_line(rc, err, "--needle-position must lie in [0, 1], got -0.5")  # the API's own check
    rc, _, err = cli(capfd, "report", "no-such-folder", "--seed", "-1")
    one_line(rc, err, "--seed must be >= 0, got -1")


@pytest.mark.parametrize("argv, msg", [  # argparse's own messages, on one line
    (["sweep", "--tokens"], "error: argument --tokens: expected at least one argument"),
    (["sweep", "--tokens", "--models", "smollm2"], "error: argument --tokens: expected at least one argument"),
    (["ablate", "r.json", "--k"], "error: argument --k: expected at least one argument"),
    (["detect", "--method"], "error: argument --method: expected at least one argument"),
    (["detect", "--frobnicate"], "error: unrecognized arguments: --frobnicate"),
    # options are never abbreviated: --tok is not --tokens
    (["detect", "--tok", "5"], "error: unrecognized arguments: --tok 5"),
    (["sweep", "--model", "smollm2"], "error: unrecognized arguments: --model smollm2"),
    (["--foo", "detect"], "error: unrecognized arguments: --foo"),
    (["detect", "--seed"], "error: argument --seed: expected one argument"),
    (["detect", "--tokens", "many"], "error: argument --tokens: invalid int value: 'many'"),
    (["sweep", "--needle-position", "mid"], "error: argument --needle-position: invalid float value: 'mid'"),
    (["detect", "--save-samples=yes"], "error: argument --save-samples/--no-save-samples: ignored explicit "
                                       "argument 'yes'"),
    (["detect", "stray"], "error: unrecognized arguments: stray"),
    (["ablate"], "error: the following arguments are required: RESULT"),
    (["export", "r.json"], "error: the following arguments are required: --format"),
    (["detekt"], "error: argument COMMAND: invalid choice: 'detekt' (choose from 'detect', 'sweep', 'report', "
                 "'ablate', 'export')"),
    ([], "error: the following arguments are required: COMMAND"),
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
        listed = re.findall(r"^    (\w+) ", out.split("commands:")[1].split("workflow:")[0], re.MULTILINE)
        assert listed == COMMANDS  # workflow order
        assert "--version" in out and "workflow:" in out
    else:
        assert "[default:" in out and "\nexamples:\n  retrieval-heads " + command[0] in out
        assert out.count(f"retrieval-heads {command[0]} ") >= 2  # at least two examples


def test_help_groups_options_and_shows_allowed_values(capfd):
    rc, out, _ = cli(capfd, "detect", "--help")
    assert rc == 0
    titles = [line[:-1] for line in out.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert titles == ["options", "experiment", "methods", "output", "engine", "examples"]
    section = out.split("\nmethods:\n")[1].split("\noutput:\n")[0]
    assert "--method METHOD" in section and "--span SPAN" in section and "--rank-by" in section
    from retrieval_heads.chance import RANK_BY, SPANS
    from retrieval_heads.methods import METHODS

    flat = " ".join(out.split())
    assert "Allowed: " + ", ".join(METHODS) + "." in flat  # the registry's methods, whatever they are
    assert "Allowed: " + ", ".join(SPANS) + "." in flat and "Allowed: " + ", ".join(RANK_BY) + "." in flat
    assert "Allowed: float32, bfloat16, float16." in flat


def test_version(capfd):
    from retrieval_heads import __version__

    rc, out, err = cli(capfd, "--version")
    assert (rc, out, err) == (0, f"retrieval-heads {__version__}\n", "")


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
