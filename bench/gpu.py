"""The probe on a GPU at Llama-3-8B's shape: seconds per sample and peak memory, against a bare prefill.

    python bench/gpu.py                                   # CUDA: 2K, 4K, 8K; bf16, sdpa; about 1-2 minutes
    python bench/gpu.py --dry-run --device cpu --tiny     # the same code on a tiny config, on the CPU (a check)

The model has Meta-Llama-3-8B's shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocabulary
128256, rope theta 500000, 8192 positions) with random weights, made directly on the device in bfloat16
(timing does not depend on the weights, and no hub is needed). Prompts are random token ids with a 100-token
"needle" span in the middle. Paths, per sample, batch 1:
  (a) the seed's path: eager attention, output_attentions=True, one .item() per head (only where its
      32 x 32 x N x N matrices fit in the free GPU memory);
  (b) our probe: SummedAttention().score_batch;
  (c) the floor: a bare sdpa prefill, use_cache=False, logits_to_keep=1.
Rounds interleave the paths (a, b, c, a, b, c, ...) after a warm-up of each path at each length; peak memory
is torch.cuda.max_memory_allocated over one call (model included), "extra" is that minus what was allocated
before it. Lengths that would start after --budget-s seconds are skipped (the run stays within 5 minutes).
Writes bench/results/gpu.md and .json (not with --dry-run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1000, rope_theta=500000.0, max_position_embeddings=8192)
TARGETS_S = {2048: 0.1, 8192: 0.3}  # (b) on an H100/H200-class GPU
NEEDLE = 100
FREE_FRACTION = 0.9  # of the free device memory (a) may plan to use


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def build_model(shape: dict, device, dtype):
    """A Llama with random weights, created on ``device`` in ``dtype`` (no CPU copy, no slow default init)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = LlamaConfig(**shape, attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device), no_init_weights():
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm scales
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def random_prompt(vocab: int, n: int, seed: int = 0):
    """Random ids of length n with a needle span of NEEDLE ids in the middle, as a PromptSample."""
    import torch

    from retrieval_heads.data.prompt import PromptSample

    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    start = n // 2 - NEEDLE // 2
    return PromptSample(input_ids=ids, needle_start=start, needle_end=start + NEEDLE, context_end=n - 16,
                        question="(random ids)", answer="")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lengths", type=int, nargs="+", help="default 2048 4096 8192 (--tiny: 256 512)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds per length")
    ap.add_argument("--tiny", action="store_true", help="a tiny config instead of Llama-3-8B's shape")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no new length after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="print the table, write no result files")
    ap.add_argument("--out", default="gpu", help="name of the files under bench/results/")
    args = ap.parse_args()
    started = time.perf_counter()

    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        fail(f"bench/gpu.py needs a CUDA GPU, and torch {torch.__version__} sees none; "
             "to check the script on the CPU: python bench/gpu.py --dry-run --device cpu --tiny")
    device = torch.device(args.device)
    if cuda:
        if device.index is None:  # plain "cuda": the current device, named by its index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    lengths = args.lengths or ([256, 512] if args.tiny else [2048, 4096, 8192])
    shape = TINY if args.tiny else LLAMA3_8B
    if max(lengths) > shape["max_position_embeddings"]:
        fail(f"--lengths go up to {shape['max_position_embeddings']} positions")
    dtype = getattr(torch, args.dtype)

    machine = C.machine()
    model = build_model(shape, device, dtype)
    build_s = time.perf_counter() - started
    print(f"model built on {device} in {build_s:.1f} s", flush=True)

    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def free_bytes() -> float:
        if cuda:
            return torch.cuda.mem_get_info(device)[0]
        import psutil

        return psutil.virtual_memory().available

    def peak(fn) -> dict:
        """Peak allocated device memory over one call (CUDA), or the process's resident set (CPU)."""
        if not cuda:
            return C.peak_rss(fn)
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync()
        top = torch.cuda.max_memory_allocated(device)
        return {"before_mib": before / 2**20, "peak_mib": top / 2**20, "delta_mib": (top - before) / 2**20}

    rows, skipped = [], []
    for n in lengths:
        if time.perf_counter() - started > args.budget_s:
            skipped.append(n)
            print(f"N={n}: skipped, past the {args.budget_s:.0f} s budget", flush=True)
            continue
        prompt = random_prompt(shape["vocab_size"], n)
        # (a) keeps L x H x N x N attention in the model's dtype, plus a float32 softmax and copies in flight
        need = C.seed_path_bytes(model, n) + shape["num_attention_heads"] * n * n * 4
        which = "abc" if need <= FREE_FRACTION * free_bytes() else "bc"
        paths = C.make_paths(model, prompt, which)
        results = {}
        for k, fn in paths.items():  # warm-up at this length; (a) is checked against (b) below
            results[k] = fn()
        times = C.interleaved(paths, args.repeats, sync=sync)
        mem = {k: peak(fn) for k, fn in paths.items()}
        t = {k: C.summary(v["wall"]) for k, v in times.items()}
        row = {
            "tokens": n, "seed_path_gib_estimate": round(need / 2**30, 1), "seed_path_run": "a" in which,
            "time_s": t, "memory_mib": mem,
            "b_over_c_time": t["b"]["median"] / t["c"]["median"],
            "b_over_c_time_paired": C.paired_ratio(times["b"]["wall"], times["c"]["wall"]),
            "b_over_c_peak": mem["b"]["peak_mib"] / mem["c"]["peak_mib"],
        }
        if "a" in which:
            row["a_over_b_time"] = t["a"]["median"] / t["b"]["median"]
            row["a_over_b_peak"] = mem["a"]["peak_mib"] / mem["b"]["peak_mib"]
            row["max_abs_diff_a_b"] = float((results["a"] - results["b"].float().cpu()).abs().max())
        rows.append(row)
        print(f"N={n}: " + ", ".join(f"({k}) {t[k]['median']:.3f} s" for k in t) +
              f"; b/c {row['b_over_c_time']:.3f}" + ("" if "a" in which else
              f"; (a) skipped: needs ~{need / 2**30:.0f} GiB"), flush=True)

    record = {"benchmark": "gpu", "shape": "tiny" if args.tiny else "Meta-Llama-3-8B", "config": shape,
              "dtype": args.dtype, "device": str(device), "batch": 1, "repeats": args.repeats,
              "build_s": round(build_s, 1), "total_s": round(time.perf_counter() - started, 1),
              "command": C.command_line(), "machine": machine, "rows": rows, "skipped_lengths": skipped}
    md = markdown(record)
    print(md)
    if not args.dry_run:
        js, mdp = C.write_results(args.out, record, md)
        print(f"wrote {mdp} and {js}")


def markdown(rec: dict) -> str:
    header = ["N", "(a) s", "(b) s", "(c) s", "b/c time", "a/b time", "(a) peak GiB", "(b) peak GiB",
              "(c) peak GiB", "b/c peak", "(b) extra MiB", "(c) extra MiB"]

    def s(t):
        return "skipped" if t is None else f"{t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f})"

    def gib(m, k):
        return f"{m[k]['peak_mib'] / 1024:.2f}" if k in m else "skipped"

    body = [[str(r["tokens"]), s(r["time_s"].get("a")), s(r["time_s"]["b"]), s(r["time_s"]["c"]),
             f"{r['b_over_c_time']:.3f}", f"{r['a_over_b_time']:.2f}" if "a_over_b_time" in r else "-",
             gib(r["memory_mib"], "a"), gib(r["memory_mib"], "b"), gib(r["memory_mib"], "c"),
             f"{r['b_over_c_peak']:.3f}", f"{r['memory_mib']['b']['delta_mib']:.0f}",
             f"{r['memory_mib']['c']['delta_mib']:.0f}"] for r in rec["rows"]]
    lines = [
        f"# Probe overhead at {rec['shape']}'s shape ({rec['device']})",
        "",
        f"Random weights, {rec['dtype']}, sdpa, batch 1, random ids with a {NEEDLE}-token needle span in the middle. "
        f"Seconds per sample: median (min-max) of {rec['repeats']} interleaved rounds after a warm-up per length; "
        f"peak memory over one call, model included. Model built in {rec['build_s']} s; whole run "
        f"{rec['total_s']} s.",
        "",
        *C.machine_lines(rec["machine"]),
        "",
        C.table(header, body),
        "",
        "- (a) the seed's path (eager, `output_attentions=True`, `.item()` per head); (b) our probe; "
        "(c) a bare sdpa prefill (`use_cache=False`, `logits_to_keep=1`).",
    ]
    skipped_a = [r for r in rec["rows"] if not r["seed_path_run"]]
    if skipped_a:
        lines.append("- (a) skipped at " + ", ".join(f"{r['tokens']} (needs ~{r['seed_path_gib_estimate']} GiB)"
                                                   for r in skipped_a) + ": more than the free device memory.")
    diffs = [r["max_abs_diff_a_b"] for r in rec["rows"] if "max_abs_diff_a_b" in r]
    if diffs:
        lines.append(f"- Where (a) ran, (a) and (b) scores differ by at most {max(diffs):.1e} (the seed's softmax "
                     f"is in {rec['dtype']}, the probe's in float32).")
    if rec["skipped_lengths"]:
        lines.append(f"- Lengths skipped for time: {rec['skipped_lengths']}.")
    if rec["shape"] != "tiny":
        lines += ["", "Targets ((b), H100/H200-class GPU):", ""]
        for n, limit in TARGETS_S.items():
            got = [r for r in rec["rows"] if r["tokens"] == n]
            if got:
                v = got[0]["time_s"]["b"]["median"]
                lines.append(f"- <= {limit} s/sample at {n}: {'met' if v <= limit else 'MISSED'} ({v:.3f} s)")
    lines += ["", f"Command: `{rec['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
