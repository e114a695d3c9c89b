"""Time and peak memory against prompt length, 1K to 32K tokens: the probe, the bare forward pass and the
full-matrix path, with the fitted log-log slope of each (CPU).

    nice -n 10 env OMP_NUM_THREADS=1 python bench/scaling.py --threads 1

Models:
  tiny     a Llama-family config with 32768 positions, randomly initialised from its config (seed 0):
           4 layers, hidden 256, 8 query heads and 4 key/value heads (head dim 32, grouped-query attention),
           vocab 32000, float32; lengths 1K, 2K, 4K, 8K, 16K, 32768; prompts of random ids, needle span
           in the middle (the scores' values do not matter here, only what computing them costs);
  smollm2  the embedded SmolLM2-135M (30 layers, 9 heads, 3 KV heads), lengths 1K-8K (its trained context).

Paths, per sample (one prompt of N tokens, batch 1; _common.make_paths):
  probe  (b): SummedAttention().score_batch (sdpa forward + exact last-row recomputation);
  bare   (c): one sdpa prefill, use_cache=False, logits_to_keep=1;
  full   (a): eager attention with output_attentions=True (every layer's N x N matrices), the seed's path.

Every (model, path, length) point runs in its own fresh child process: build or load the model, one warm-up
call on a 256-token prompt, then the one measured call, timed (wall and the process's CPU time) and with its
peak resident set (the kernel's VmHWM, reset just before the call; _common.peak_rss). One call per point:
no repeats (the slopes are fitted over 4-6 lengths, which averages some of the noise of a shared machine).
(a) is estimated before it runs, (layers + 2) x heads x N^2 x 4 bytes (_common.seed_path_bytes: the kept
matrices plus one layer's scores and softmax in flight), and skipped where that exceeds --budget-gib (default
6 GiB: the machine is shared); the table says where it stops.

The slope is the least-squares fit of log(value) on log(N) over the lengths a path ran (and, for the CPU
time, over the lengths from 4K up, where the quadratic part of attention weighs more); "extra" memory is the
rise of the resident set during the call (the model and the interpreter excluded).
Writes bench/results/scaling.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

TINY = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=32768)
LENGTHS = {"tiny": [1024, 2048, 4096, 8192, 16384, 32768], "smollm2": [1024, 2048, 4096, 8192]}
PATHS = {"b": "probe", "c": "bare forward", "a": "full matrices (eager, output_attentions)"}
WARMUP_TOKENS = 256


def build(model_key: str):
    """(model, tokenizer or None) in float32, eval mode."""
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if model_key == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**TINY)).eval(), None
    from retrieval_heads.models import load_model

    lm = load_model(model_key)
    return lm.model, lm.tokenizer


def prompt_of(model_key: str, tokenizer, n: int):
    from retrieval_heads.data.prompt import PromptFormat, PromptSample
    from retrieval_heads.data.samples import synthetic_samples

    if tokenizer is None:
        import random

        rng = random.Random(n)
        ids = [rng.randrange(1, TINY["vocab_size"]) for _ in range(n)]
        mid = n // 2
        return PromptSample(ids, mid, mid + 16, n - 8, "q", "a")
    return synthetic_samples(PromptFormat(tokenizer), ["inc_state"], n, 1, 0.5, 0)[0]["inc_state"]


def child(model_key: str, path: str, n: int) -> None:
    """One point in this fresh process: prints one JSON line (time and peak memory of one call)."""
    model, tok = build(model_key)
    C.make_paths(model, prompt_of(model_key, tok, WARMUP_TOKENS), path)[path]()  # warm-up: lazy inits
    fn = C.make_paths(model, prompt_of(model_key, tok, n), path)[path]
    t0, c0 = time.perf_counter(), time.process_time()
    mem = C.peak_rss(fn)
    mem.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
    print(json.dumps(mem))


def run_child(model_key: str, path: str, n: int, threads: int | None, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", model_key, path, str(n)]
    if threads:
        cmd += ["--threads", str(threads)]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
    except subprocess.TimeoutExpired:
        return {"error": f"ran past {timeout:.0f} s"}
    if run.returncode != 0:
        tail = run.stderr.strip().splitlines()[-1:] or [f"exit code {run.returncode}"]
        return {"error": tail[0][:300]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(y) on log(x); None with fewer than 2 points."""
    pts = [(math.log(x), math.log(y)) for x, y in points if y > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def shape_of(model_key: str) -> dict:
    if model_key == "tiny":
        return {"layers": TINY["num_hidden_layers"], "heads": TINY["num_attention_heads"]}
    from transformers import AutoConfig

    from retrieval_heads.models import smollm2_path

    cfg = AutoConfig.from_pretrained(smollm2_path())
    return {"layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads}


def full_bytes(shape: dict, n: int) -> int:
    """_common.seed_path_bytes for float32, batch 1, without building the model."""
    return (shape["layers"] + 2) * shape["heads"] * n * n * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(LENGTHS))
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--budget-gib", type=float, default=6.0, help="skip (a) where its estimate exceeds this")
    ap.add_argument("--timeout-s", type=float, default=600, help="per point")
    ap.add_argument("--max-tokens", type=int, help="run only lengths up to this (a quick check)")
    ap.add_argument("--out", default="scaling", help="name of the files under bench/results/")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "PATH", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]))

    machine = C.machine()
    started = time.perf_counter()
    models = []
    for key in args.models:
        shape = shape_of(key)
        rows = []
        for n in [n for n in LENGTHS[key] if args.max_tokens is None or n <= args.max_tokens]:
            est = full_bytes(shape, n)
            row = {"tokens": n, "full_gib_estimate": round(est / 2**30, 2), "points": {}}
            for p in PATHS:
                if p == "a" and est > args.budget_gib * 2**30:
                    row["points"][p] = {"skipped": f"needs ~{est / 2**30:.1f} GiB > {args.budget_gib:g} GiB"}
                else:
                    row["points"][p] = run_child(key, p, n, args.threads, args.timeout_s)
                print(f"{key} N={n} {p}: {json.dumps(row['points'][p])}", flush=True)
            rows.append(row)
        fits = {}
        for p in PATHS:
            ran = [(r["tokens"], r["points"][p]) for r in rows if "wall_s" in r["points"][p]]
            top = [(n, d) for n, d in ran if n >= 4096]
            fits[p] = {"time": slope([(n, d["wall_s"]) for n, d in ran]),
                       "cpu_4k_up": slope([(n, d["cpu_s"]) for n, d in top]),
                       "cpu": slope([(n, d["cpu_s"]) for n, d in ran]),
                       "extra_memory": slope([(n, d["delta_mib"]) for n, d in ran]),
                       "lengths": [n for n, _ in ran]}
        models.append({"model": key, "shape": shape, "rows": rows, "slopes": fits})
    record = {"benchmark": "scaling", "dtype": "float32", "batch": 1, "repeats": 1, "tiny_config": TINY,
              "budget_gib": args.budget_gib, "command": C.command_line(), "machine": machine,
              "seconds": round(time.perf_counter() - started, 1), "models": models}
    md = markdown(record)
    C.write_results(args.out, record, md)
    print(md)


def _cell(d: dict, what: str) -> str:
    if "skipped" in d:
        return "does not fit"
    if "error" in d:
        return "failed"
    if what == "time":
        return f"{d['wall_s']:.2f} ({d['cpu_s']:.2f})"
    return f"{d['peak_mib']:.0f} (+{d['delta_mib']:.0f})"


def _slope(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


SHORT = {"b": "probe", "c": "bare", "a": "full"}


def markdown(rec: dict) -> str:
    out = ["# Cost against prompt length, 1K-32K tokens (CPU)", "", f"Command: `{rec['command']}`", ""]
    out += C.machine_lines(rec["machine"])
    out += ["", f"One call per point (no repeats), each in a fresh process after a 256-token warm-up; batch 1, "
            f"float32; the whole run took {rec['seconds'] / 60:.1f} minutes. Paths: **probe** = `SummedAttention` "
            "(sdpa forward + the exact last row per layer), **bare** = one sdpa prefill (`use_cache=False`, "
            "`logits_to_keep=1`), **full** = eager attention with `output_attentions=True` (every layer's N x N "
            "matrices; the seed's path). Time: wall seconds of the call, and in brackets the process's CPU "
            "seconds (a busy machine inflates the wall time far more). Memory: the process's peak resident set "
            "during the call, MiB (the kernel's VmHWM, reset just before the call; model and interpreter "
            "included), and in brackets its rise during the call. **full** runs only where its estimated need, "
            f"(layers + 2) x heads x N^2 x 4 bytes, is under {rec['budget_gib']:g} GiB.", ""]
    for m in rec["models"]:
        name = ("tiny Llama (random weights, 32768 positions: " +
                ", ".join(f"{k} {v}" for k, v in rec["tiny_config"].items() if k != "max_position_embeddings") + ")"
                if m["model"] == "tiny" else "SmolLM2-135M (embedded)")
        out += [f"## {name}", ""]
        header = (["tokens"] + [f"{SHORT[p]} s (CPU s)" for p in PATHS]
                  + [f"{SHORT[p]} peak MiB (+rise)" for p in PATHS] + ["full: estimated GiB"])
        rows = []
        for r in m["rows"]:
            pts = r["points"]
            rows.append([str(r["tokens"])] + [_cell(pts[p], "time") for p in PATHS] +
                        [_cell(pts[p], "mem") for p in PATHS] + [f"{r['full_gib_estimate']:.2f}"])
        out += [C.table(header, rows), ""]
        fit_rows = [[SHORT[p], _slope(f["time"]), _slope(f["cpu"]), _slope(f["cpu_4k_up"]), _slope(f["extra_memory"]),
                     ", ".join(str(n) for n in f["lengths"])] for p, f in m["slopes"].items()]
        out += ["Fitted log-log slopes (value ~ N^slope):", "",
                C.table(["path", "wall time", "CPU time", "CPU time, 4K and up", "memory rise", "over lengths"],
                        fit_rows), ""]
        stops = [r["tokens"] for r in m["rows"] if "skipped" in r["points"]["a"]]
        if stops:
            first = next(r for r in m["rows"] if r["tokens"] == stops[0])
            out += [f"**full** stops fitting at {stops[0]} tokens: its matrices would need ~"
                    f"{first['full_gib_estimate']:.1f} GiB (budget {rec['budget_gib']:g} GiB).", ""]
        failed = [(r["tokens"], p, d["error"]) for r in m["rows"] for p, d in r["points"].items() if "error" in d]
        out += [f"- {SHORT[p]} at {n} failed: {e}" for n, p, e in failed] + ([""] if failed else [])
    return "\n".join(out)


def render(name: str) -> None:
    """Rewrite results/NAME.md from results/NAME.json (after a change to the table's layout)."""
    rec = json.loads((C.RESULTS / f"{name}.json").read_text())
    (C.RESULTS / f"{name}.md").write_text(markdown(rec))


if __name__ == "__main__":
    main()
