"""The Ray engine: the same files as the local engine, a killed worker retried, the CLI options.

One local Ray instance (2 CPUs, no dashboard) serves the whole file. The model is a tiny random Llama with
SmolLM2's tokenizer (so prompts are real), saved to a directory as any local model would be.
"""

import json
import os
import shutil
import signal

import pytest
import torch

ray = pytest.importorskip("ray", reason="the Ray engine needs Ray (pip install 'retrieval-heads[ray]')")

from retrieval_heads.cli import main
from retrieval_heads.models import smollm2_path
from retrieval_heads.sweep.ray import ModelWorker, run_ray_sweep
from retrieval_heads.sweep import make_grid, run_sweep

pytestmark = pytest.mark.slow  # a local Ray instance and its worker processes

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (SmolLM2's vocabulary) with SmolLM2's tokenizer, in a model directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    src = smollm2_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(src / name, path / name)
    return str(path)


@pytest.fixture(scope="module")
def session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def grid_of(tiny, **kw):
    return make_grid(models=[tiny], questions=["all"], tokens=[256, 320], samples=2, save_samples=True, **kw)


def files(out):
    """{file name: content}: result JSONs without their timestamp, samples files as they are."""
    d = out / "summed_attention"
    got = {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "timestamp"}
           for p in sorted(d.glob("*_[0-9]*.json"))}
    got.update({p.name: p.read_text() for p in sorted(d.glob("*.samples.jsonl"))})
    return got


@pytest.fixture(scope="module")
def local(tiny, tmp_path_factory):
    """The local engine's files for the grid."""
    out = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray workers (1 CPU each): no oversubscription of a small machine
    try:
        s = run_sweep(grid_of(tiny), out, progress=False, echo=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert len(s.done) == 8
    return files(out)


def test_ray_sweep_matches_the_local_engine(session, tiny, local, tmp_path):
    lines = []
    s = run_ray_sweep(grid_of(tiny), tmp_path, echo=lines.append)
    assert len(s.done) == 8 and not s.skipped and not s.recomputed
    assert len(local) == 16  # 8 results + 8 samples files
    assert files(tmp_path) == local
    assert sum(x.startswith("done ") for x in lines) == 8
    # resumed: nothing to do (Ray is not even needed), then a corrupt file is recomputed on Ray
    s = run_ray_sweep(grid_of(tiny), tmp_path, echo=lines.append)
    assert len(s.skipped) == 8 and not s.done
    victim = tmp_path / "summed_attention" / "tiny-llama_hq_state_320.json"
    victim.write_text(victim.read_text()[:100])
    s = run_ray_sweep(grid_of(tiny), tmp_path, echo=lines.append)
    assert s.recomputed == [victim] and len(s.skipped) == 7
    assert files(tmp_path) == local


def test_a_killed_worker_is_retried_and_nothing_is_redone(session, tiny, local, tmp_path):
    log = tmp_path / "calls.log"
    out = tmp_path / "out"

    class DiesOnItsSecondUnit(ModelWorker):
        """Logs each call; the first process to start the 320-token unit kills itself with SIGKILL mid-unit."""

        def compute(self, unit, todo):
            with open(log, "a") as f:
                f.write(f"{unit.tokens} {os.getpid()}\n")
            if unit.tokens == 320 and not (tmp_path / "killed").exists():
                (tmp_path / "killed").touch()
                self.lm = self.load()
                os.kill(os.getpid(), signal.SIGKILL)
            return super().compute(unit, todo)

    s = run_ray_sweep(grid_of(tiny), out, echo=lambda s: None, worker=DiesOnItsSecondUnit)
    calls = [line.split() for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["256", "320", "320"]  # the finished unit is not redone
    assert calls[0][1] == calls[1][1] != calls[2][1]  # the retry ran on a new (restarted) worker process
    assert len(s.done) == 8 and len(set(s.done)) == 8
    assert files(out) == local


def test_cli_engines_and_device_map(session, tiny, local, tmp_path, capsys):
    """In process, so `--engine ray` joins this file's Ray instance; `--device-map auto` (accelerate) on the
    local engine gives the same files too."""
    base = ["sweep", "--models", tiny, "--questions", "all", "--tokens", "256", "320", "--samples", "2",
            "--save-samples", "--no-progress"]
    assert main([*base, "--engine", "ray", "--output-dir", str(tmp_path / "ray")]) == 0
    assert files(tmp_path / "ray") == local
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*base, "--device-map", "auto", "--output-dir", str(tmp_path / "dm")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert files(tmp_path / "dm") == local
    capsys.readouterr()
    for args, msg in [(["--engine", "spark"], "unknown engine 'spark'"),
                      (["--address", "auto"], "--address, --gpus-per-worker and --cpus-per-worker are for"),
                      (["--engine", "ray", "--gpus-per-worker", "1"], "--gpus-per-worker needs --device cuda"),
                      (["--engine", "ray", "--device", "cuda"], "needs --gpus-per-worker 1 or more"),
                      (["--engine", "ray", "--address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1")]:
        assert main([*base, *args, "--output-dir", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
        assert not (tmp_path / "bad").exists()


def test_ray_sweeps_depths_as_the_local_engine(session, tiny, tmp_path):
    """Depth is an axis on Ray too: one unit per length x depth, the same files (depth names) as the local
    engine, and a rerun skips them all."""
    grid = make_grid(models=[tiny], questions=["inc_state"], tokens=[256], samples=2, needle_positions=[0.2, 0.5])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sweep(grid, tmp_path / "local", progress=False, echo=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    s = run_ray_sweep(grid, tmp_path / "ray", echo=lambda s: None)
    assert sorted(p.name for p in s.done) == ["tiny-llama_inc_state_256.json", "tiny-llama_inc_state_256_d0.20.json"]
    assert files(tmp_path / "ray") == files(tmp_path / "local")
    s = run_ray_sweep(grid, tmp_path / "ray", echo=lambda s: None)
    assert len(s.skipped) == 2 and not s.done
