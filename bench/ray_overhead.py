"""What the Ray engine costs on a small case: Ray startup, the first unit (actor start + model load), and the
per-unit overhead once the actor runs (time between two units' results minus the unit's own scoring).

A tiny random Llama with SmolLM2's tokenizer (so the scoring is short and the overhead shows), 6 units of
4 questions x 2 samples, a private local Ray instance (2 CPUs, no dashboard)::

    python bench/ray_overhead.py
"""

import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import retrieval_heads.sweep.ray as engine
from retrieval_heads.models import smollm2_path
from retrieval_heads.sweep import make_grid


def tiny_model(path: Path) -> str:
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_path() / name, path / name)
    return str(path)


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    grid = make_grid(models=[tiny_model(tmp / "tiny-llama")], questions=["all"],
                     tokens=[256, 320, 384, 448, 512, 576], samples=2)
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"ray.init (local, 2 CPUs): {time.perf_counter() - t:.1f} s")

    back = []  # (time a unit's results reached the driver, seconds its scoring took on the worker)
    get = engine._get

    def timed_get(*args):
        out = get(*args)
        back.append((time.perf_counter(), out[1]))
        return out

    engine._get = timed_get
    t0 = time.perf_counter()
    s = engine.run_ray_sweep(grid, tmp / "out", echo=lambda line: None)
    gaps = [(b[0] - a[0]) - b[1] for a, b in zip(back, back[1:])]
    print(f"sweep of {len(back)} units: {s.seconds:.1f} s; first unit back after {back[0][0] - t0:.1f} s "
          f"(actor start + model load {back[0][0] - t0 - back[0][1]:.1f} s); per-unit overhead mean "
          f"{sum(gaps) / len(gaps) * 1000:.0f} ms, max {max(gaps) * 1000:.0f} ms")
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
