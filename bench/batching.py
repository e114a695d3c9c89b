"""Throughput of `--batch-size` 1, 2 and 4 on the embedded SmolLM2 (CPU), side by side.

    python bench/batching.py                          # 1K tokens, 4 samples, 3 rounds
    python bench/batching.py --tokens 2048 --batch-sizes 1 2 4 8 --samples 8 --threads 1

The samples of one synthetic experiment have one length, so a batch needs no padding. Each round scores the
same samples once per batch size, in order (1, 2, 4, 1, 2, 4, ...); we report samples/s from the median
round and check that every batch size gives the scores of batch 1. Writes bench/results/batching.md and .json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=4, help="samples scored per round (a multiple of every size)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="batching", help="name of the files under bench/results/")
    args = ap.parse_args()

    import torch

    from retrieval_heads.experiments import build_prompts, score_prompts

    machine, lm = C.setup(args.threads, args.model)
    prompts = [g["inc_state"] for g in build_prompts(lm, ["inc_state"], args.tokens, args.samples, 0.5, 0)]
    lengths = {len(p.input_ids) for p in prompts}
    assert len(lengths) == 1, f"synthetic prompts of one experiment should share one length, got {lengths}"
    score_prompts(lm, "summed_attention", prompts[:1])  # warm-up

    scores: dict[int, torch.Tensor] = {}

    def run(bs: int):
        def fn():
            scores[bs] = score_prompts(lm, "summed_attention", prompts, batch_size=bs)  # (S, L, H)
        return fn

    times = C.interleaved({bs: run(bs) for bs in args.batch_sizes}, args.repeats,
                          on_round=lambda r: print(f"round {r + 1}/{args.repeats} done", flush=True))
    base = args.batch_sizes[0]
    rows = []
    for bs in args.batch_sizes:
        wall = C.summary(times[bs]["wall"])
        rows.append({
            "batch_size": bs,
            "seconds_per_round": wall,
            "samples_per_s": args.samples / wall["median"],
            "samples_per_s_range": [args.samples / wall["max"], args.samples / wall["min"]],
            "speedup_vs_first": C.summary(times[base]["wall"])["median"] / wall["median"],
            "speedup_paired": C.paired_ratio(times[base]["wall"], times[bs]["wall"]),
            "cpu_s_per_round": C.summary(times[bs]["cpu"]),
            "max_abs_diff_vs_first": float((scores[bs] - scores[base]).abs().max()),
        })
    record = {"benchmark": "batching", "model": lm.name, "dtype": "float32", "tokens": args.tokens,
              "prompt_tokens": lengths.pop(), "samples": args.samples, "repeats": args.repeats,
              "command": C.command_line(), "machine": machine, "rows": rows}
    md = markdown(record)
    C.write_results(args.out, record, md)
    print(md)


def markdown(rec: dict) -> str:
    header = ["batch size", "s per round", "samples/s", "speedup vs batch " + str(rec["rows"][0]["batch_size"]),
              "speedup paired", "CPU s per round", "max |score - batch-1 score|"]
    body = [[str(r["batch_size"]),
             f"{r['seconds_per_round']['median']:.2f} ({r['seconds_per_round']['min']:.2f}-"
             f"{r['seconds_per_round']['max']:.2f})",
             f"{r['samples_per_s']:.3f}", f"{r['speedup_vs_first']:.2f}", f"{r['speedup_paired']:.2f}",
             f"{r['cpu_s_per_round']['median']:.2f}", f"{r['max_abs_diff_vs_first']:.1e}"] for r in rec["rows"]]
    return "\n".join([
        "# Batching throughput on the embedded model (CPU)",
        "",
        f"{rec['model']}, {rec['dtype']}, {rec['samples']} synthetic samples of {rec['prompt_tokens']} tokens "
        f"(`--tokens {rec['tokens']}`) scored per round; median (min-max) of {rec['repeats']} interleaved rounds "
        "(one per batch size, in turn) after a warm-up.",
        "",
        "Machine (the load average below tells how busy it was; absolute times vary between runs):",
        "",
        *C.machine_lines(rec["machine"]),
        "",
        C.table(header, body),
        "",
        "- samples/s = samples per round / median seconds per round; speedup paired = median over rounds of "
        "(batch-1 time / this time) within one round.",
        "- Every batch size gives the scores of batch 1 (last column; float32 reductions over a batch may differ "
        "in the last bits).",
        "",
        f"Command: `{rec['command']}`",
        "",
    ])


if __name__ == "__main__":
    main()
