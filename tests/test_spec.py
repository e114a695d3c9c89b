"""The one spec of every setting (:mod:`retrieval_heads.spec`): it generates the flags of detect, sweep and
ablate, their defaults and the grid's, the grid file's keys and types and the range checks; a library error
names the parameter and the CLI its flag; ``--help`` loads neither torch nor transformers."""

from __future__ import annotations

import inspect
import pickle
import re
import sys

import pytest

from conftest import cli, one_line
from retrieval_heads import spec
from retrieval_heads.cli import parse
from retrieval_heads.errors import ParamError, UserError
from retrieval_heads.spec import FIELDS, GRID_DEFAULTS, GRID_KEYS, GRID_SETTINGS, bounds, option, setting
from retrieval_heads.sweep import EXPECTED, GridSettings, check_types, make_grid

OWN = {"ablate": {"--out"}}  # options that are no setting of an experiment (ablate's output file)


def flags_in_usage(command: str, capfd) -> set[str]:
    rc, out, err = cli(capfd, command, "--help")
    assert rc == 0, err
    usage = out.split("\n\n")[0]
    return set(re.findall(r"\[(--[a-z-]+)", usage))  # each option's first flag (--answers of --answers | --no-...)


@pytest.mark.parametrize("command", ["detect", "sweep", "ablate"])
def test_the_spec_generates_every_flag(capfd, command):
    """The options of a command's parser are exactly the spec's settings for it (plus ablate's --out), each
    parsed to its setting's name with the spec's default for that command."""
    want = {option(n, command)[1] for n in FIELDS if command in setting(n).commands}
    assert len(want) == {"detect": 23, "sweep": 27, "ablate": 13}[command]  # as many as before the spec
    assert flags_in_usage(command, capfd) == want | OWN.get(command, set())
    given = parse([command] + (["r.json"] if command == "ablate" else []))
    for name in (n for n in FIELDS if command in setting(n).commands):
        dest = option(name, command)[0]
        s = setting(name)
        several = s.many if command == "sweep" and s.grid else s.several
        if command == "sweep" and s.grid or several:
            want_default = None  # the grid file's or the grid's; a list option is never extended
        else:
            want_default = spec.default(name, command)
        assert getattr(given, dest) == want_default, (command, name)


def test_flags_show_the_specs_defaults(capfd):
    """Defaults in --help come from the spec: the grid's in sweep, one experiment's in detect."""
    _, out, _ = cli(capfd, "sweep", "--help")
    flat = " ".join(out.split())
    assert "Prompt lengths in tokens. [default: 2048 4096 6144 8192]" in flat
    assert f"Samples per experiment. [default: {GRID_DEFAULTS['samples']}]" in flat
    _, out, _ = cli(capfd, "detect", "--help")
    flat = " ".join(out.split())
    assert "[default: 1024 for a task, 512 for a filing question or --dataset]" in flat
    assert re.search(r"--alpha ALPHA [^[]*\[default: 0\.05\]", flat) and FIELDS["alpha"].default == 0.05


def test_the_grid_is_the_specs():
    """Grid keys, the grid's fields and defaults, and the file types with their wording, all from the spec."""
    g = make_grid()
    for key in GRID_KEYS:
        if key != "needle_position":  # the first of needle_positions
            assert getattr(g, key) == GRID_DEFAULTS[key], key
    assert g.needle_position == GRID_DEFAULTS["needle_position"] == FIELDS["needle_position"].default
    assert set(GridSettings.model_fields) == set(GRID_KEYS) == set(EXPECTED)
    assert EXPECTED["tokens"] == "a whole number or a list of whole numbers" and EXPECTED["rank_by"] == "score or lift"
    for key in GRID_KEYS:  # a value of the wrong type is named with the key and what it takes
        wrong = {"not": "a setting"}
        with pytest.raises(UserError, match=f"^G: {key}: expected {re.escape(EXPECTED[key])}, got "):
            check_types({key: wrong}, "G: ")
    with pytest.raises(UserError, match="unknown grid setting 'token' \\(did you mean 'tokens'\\?\\)"):
        check_types({"token": 5})


def outside(name: str) -> float:
    """A value just outside the bounds of setting ``name``, of its type."""
    b = bounds(name)
    if "gt" in b:
        bad = b["gt"]
    elif "ge" in b:
        bad = b["ge"] - 1
    else:
        bad = b["lt"] if "lt" in b else b["le"] + 1
    return spec.value_type(name)(bad)


SHARED = [k for k in GRID_KEYS if bounds(GRID_SETTINGS[k])]


def test_shared_settings_have_bounds():
    assert set(SHARED) >= {"tokens", "samples", "needle_position", "needle_positions", "seed", "batch_size",
                           "max_new_tokens", "save_attention"}


@pytest.mark.parametrize("key", SHARED)
def test_a_grid_key_and_its_flags_share_bounds(capfd, tmp_path, key):
    """The same bad value: the library names the parameter; sweep and detect name their flag, in one message."""
    name = GRID_SETTINGS[key]
    bad = outside(name)
    with pytest.raises(ParamError) as e:
        make_grid(models=["smollm2"], **{key: [bad] if setting(name).many else bad})
    assert e.value.param == key and str(e.value).startswith(f"{key} ")
    flag = option(name, "sweep")[1]
    want = f"error: {e.value.named(flag)}"
    assert flag == "--" + key.replace("_", "-") == spec.flag_of(key)
    rc, out, err = cli(capfd, "sweep", "--models", "smollm2", flag, bad, "--output-dir", tmp_path / "s")
    assert one_line(rc, err) == want and out == ""
    if "detect" in setting(name).commands:
        rc, out, err = cli(capfd, "detect", option(name, "detect")[1], bad, "--output-dir", tmp_path / "d")
        assert one_line(rc, err) == want and out == ""
    assert not any(tmp_path.iterdir())


def test_a_library_error_names_the_parameter_and_the_cli_its_flag(capfd):
    from retrieval_heads.experiments import check_args

    with pytest.raises(ParamError) as e:
        check_args(None, 0, 1, 0.5)
    assert str(e.value) == "tokens must be positive, got 0"
    assert spec.cli_message(e.value) == "--tokens must be positive, got 0"
    rc, _, err = cli(capfd, "detect", "--tokens", "0")
    assert one_line(rc, err) == "error: --tokens must be positive, got 0"
    draws = ParamError("random_seeds", " must lie in [0, 1000], got -1")
    assert spec.cli_message(draws) == "--draws must lie in [0, 1000], got -1"  # the setting's own flag
    assert spec.cli_message(UserError("--x stays")) == "--x stays"
    back = pickle.loads(pickle.dumps(draws))  # a Ray worker's error reaches the driver whole
    assert (type(back), back.param, str(back)) == (ParamError, "random_seeds", str(draws))
    with pytest.raises(ParamError, match=r"^needle_position must lie in \[0, 1\], got nan$"):
        spec.check("needle_position", float("nan"))
    with pytest.raises(ParamError, match=r"^samples must be at most 100000, got 100001$"):
        spec.check("samples", 100_001)
    with pytest.raises(ParamError, match=r"^alpha must lie in \(0, 1\), got 1$"):
        spec.check("alpha", 1)
    assert spec.check("samples", 100_000) == 100_000 and spec.check("tokens", None) is None


def test_the_apis_defaults_are_the_specs():
    """detect's and ablate's keyword defaults equal the spec's (a setting whose default depends on the
    question is None in both)."""
    from retrieval_heads.ablation import ablate
    from retrieval_heads.experiments import detect

    seen = 0
    for fn, command, renamed in ((detect, "detect", {}), (ablate, "ablate", {"ks": "k"})):
        for p in inspect.signature(fn).parameters.values():
            name = renamed.get(p.name, p.name)
            if name not in FIELDS or command not in setting(name).commands or p.default is inspect.Parameter.empty:
                continue
            if name == "output_dir":  # the API writes nothing unless asked; the CLI writes to results/
                continue
            want = spec.default(name, command)
            got = p.default
            if name == "method" or name == "controls":
                got, want = tuple(got.split(",")) if isinstance(got, str) else tuple(got), \
                    tuple(want.split(",")) if isinstance(want, str) else tuple(want)
            assert got == want, (command, name)
            seen += 1
    assert seen >= 25


def test_help_imports_neither_torch_nor_transformers(capfd):
    """Every command's --help, in this process: the package imported afresh with torch and transformers
    refused (the modules already loaded are put back afterwards)."""
    heavy = ("torch", "transformers")

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in heavy:
                raise ImportError(f"{name} imported by --help")

    saved = {k: m for k, m in sys.modules.items() if k.split(".")[0] in ("retrieval_heads",) + heavy}
    for k in saved:
        del sys.modules[k]
    sys.meta_path.insert(0, Refuse())
    try:
        from retrieval_heads.cli import main

        for command in [[], ["detect"], ["sweep"], ["report"], ["ablate"], ["export"]]:
            assert main([*command, "--help"]) == 0, command
            assert not [k for k in sys.modules if k.split(".")[0] in heavy]
    finally:
        del sys.meta_path[0]
        for k in [k for k in sys.modules if k.split(".")[0] in ("retrieval_heads",) + heavy]:
            del sys.modules[k]
        sys.modules.update(saved)
    out, _ = capfd.readouterr()
    assert out.count("usage: retrieval-heads") == 6


def test_the_cli_page_lists_every_detect_option():
    """docs/cli.md's table of detect's options names exactly the spec's."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    listed = set(re.findall(r"^\| `(--[a-z-]+)", page, re.MULTILINE))
    assert listed == {option(n, "detect")[1] for n in FIELDS if "detect" in setting(n).commands}
