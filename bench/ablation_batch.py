"""An ablation curve with its conditions as rows of one batch vs one condition at a time, side by side (CPU).

    nice -n 10 env OMP_NUM_THREADS=1 python bench/ablation_batch.py --threads 1     # SmolLM2, 512 tokens

The curve: the heads of a summed_attention result on the same samples (``detect``), removed top-k for each
k and k random others per seed (``retrieval_heads.ablation.run_ablation``): greedy answers with a KV cache and
the teacher-forced gold log-probability under every condition. Paths: ``--batch-size 1`` (the reference: one
condition at a time, one forward pass per sample and condition) and each batch size in ``--batch-sizes``
(rows = sample x condition, each with its own removed heads, the unablated row once). Each round runs every
path once, the order rotating between rounds; we report the median (min-max) of each path, the ratio of the
medians and the median of the per-round ratios (batched / sequential), the process's CPU time beside the
wall time, the peak memory of each path (a fresh child process per path, see _common.peak_rss), and that
every path gives the reference's answers and log-probs. Writes bench/results/ablation_batch.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

WARMUP_TOKENS = 256


def curve(lm, args, tokens: int, samples: int):
    """(record of the heads, prompts) of the measured curve: a summed_attention result on its own samples."""
    from retrieval_heads import detect
    from retrieval_heads.experiments import build_prompts

    rec = detect(lm, question=args.question, tokens=tokens, samples=samples).record
    prompts = [g[args.question] for g in build_prompts(lm, [args.question], tokens, samples, 0.5, 0)]
    return rec, prompts


def run(lm, args, rec, prompts, batch_size: int) -> dict:
    from retrieval_heads.ablation import run_ablation

    return run_ablation(lm, rec, prompts, args.ks, args.random_seeds, args.max_new_tokens, batch_size)


def child(args, batch_size: int) -> None:
    """One peak-memory measurement in this fresh process; prints one JSON line."""
    _, lm = C.setup(args.threads, args.model)
    warm = curve(lm, args, WARMUP_TOKENS, 1)
    run(lm, args, *warm, batch_size)  # warm-up: lazy inits, small allocations
    rec, prompts = curve(lm, args, args.tokens, args.samples)
    print(json.dumps(C.peak_rss(lambda: run(lm, args, rec, prompts, batch_size))))


def measure_memory(args, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(batch_size), "--model", args.model, "--question", args.question,
           "--tokens", str(args.tokens), "--samples", str(args.samples), "--ks", *map(str, args.ks),
           "--random-seeds", str(args.random_seeds), "--max-new-tokens", str(args.max_new_tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if done.returncode != 0:
        raise RuntimeError(f"memory child at batch {batch_size} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def command() -> str:
    """The command line, with the niceness and OMP_NUM_THREADS it ran under."""
    omp = os.environ.get("OMP_NUM_THREADS")
    prefix = (f"nice -n {os.nice(0)} " if os.nice(0) else "") + (f"env OMP_NUM_THREADS={omp} " if omp else "")
    return prefix + C.command_line()


def conditions(report: dict) -> list[dict]:
    return report["top"] + report["random"]


def compare(ref: dict, got: dict) -> dict:
    """Whether ``got`` has the reference's answers, and its largest log-prob difference."""
    same, diff = True, 0.0
    for a, b in zip(conditions(ref), conditions(got), strict=True):
        same &= a["heads"] == b["heads"] and [s["generated"] for s in a["samples"]] == \
            [s["generated"] for s in b["samples"]]
        diff = max(diff, *(abs(x["logprob"] - y["logprob"]) for x, y in zip(a["samples"], b["samples"])))
    return {"answers_identical": same, "max_abs_logprob_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--question", default="hq_state")
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 5, 10])
    ap.add_argument("--random-seeds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8], help="batched paths (1 is the reference)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--out", default="ablation_batch", help="name of the files under bench/results/")
    ap.add_argument("--child", type=int, metavar="BATCH_SIZE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args, args.child)

    machine, lm = C.setup(args.threads, args.model)
    sizes = [1] + [b for b in args.batch_sizes if b != 1]
    warm = curve(lm, args, WARMUP_TOKENS, 1)
    for b in sizes:
        run(lm, args, *warm, b)  # warm-up of every path on a short prompt
    rec, prompts = curve(lm, args, args.tokens, args.samples)
    reports: dict[int, dict] = {}

    def path(b: int):
        def fn():
            reports[b] = run(lm, args, rec, prompts, b)
        return fn

    times = {b: {"wall": [], "cpu": []} for b in sizes}
    for r in range(args.repeats):
        order = sizes[r % len(sizes):] + sizes[: r % len(sizes)]  # rotate: no path always runs first
        t = C.interleaved({b: path(b) for b in order}, 1)
        for b in sizes:
            for k in ("wall", "cpu"):
                times[b][k] += t[b][k]
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"batch {b} {times[b]['wall'][-1]:.1f} s" for b in sizes),
              flush=True)
    memory = {} if args.no_memory else {b: measure_memory(args, b) for b in sizes}
    seq = C.summary(times[1]["wall"])
    rows = []
    for b in sizes:
        wall = C.summary(times[b]["wall"])
        rows.append({
            "batch_size": b,
            "seconds": wall,
            "cpu_seconds": C.summary(times[b]["cpu"]),
            "ratio": wall["median"] / seq["median"],
            "ratio_paired": C.paired_ratio(times[b]["wall"], times[1]["wall"]),
            "ratio_cpu": C.paired_ratio(times[b]["cpu"], times[1]["cpu"]),
            "memory": memory.get(b),
            **compare(reports[1], reports[b]),
        })
    conds = len(conditions(reports[1]))
    unique = len({tuple(c["heads"]) for c in conditions(reports[1])} | {()})
    record = {"benchmark": "ablation_batch", "model": lm.name, "dtype": "float32", "tokens": args.tokens,
              "prompt_tokens": sorted({len(p.input_ids) for p in prompts}), "samples": args.samples,
              "question": args.question, "ks": args.ks, "random_seeds": args.random_seeds,
              "max_new_tokens": args.max_new_tokens, "conditions": conds, "distinct_head_sets": unique,
              "repeats": args.repeats, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "command": command(), "machine": machine, "rows": rows}
    md = markdown(record)
    C.write_results(args.out, record, md)
    print(md)


def markdown(rec: dict) -> str:
    header = ["batch size", "s per curve", "ratio (medians)", "ratio (paired)", "ratio (CPU time)", "CPU s per curve",
              "peak memory, MiB (rise)", "answers = reference", "max abs log-prob diff"]
    body = []
    for r in rec["rows"]:
        s, m = r["seconds"], r["memory"]
        body.append([
            "1 (reference)" if r["batch_size"] == 1 else str(r["batch_size"]),
            f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})", f"**{r['ratio']:.2f}**", f"{r['ratio_paired']:.2f}",
            f"{r['ratio_cpu']:.2f}", f"{r['cpu_seconds']['median']:.1f}",
            "not measured" if m is None else f"{m['peak_mib']:.0f} (+{m['delta_mib']:.0f})",
            "yes" if r["answers_identical"] else "**no**", f"{r['max_abs_logprob_diff']:.1e}",
        ])
    rows_per_curve = rec["samples"] * rec["distinct_head_sets"]
    return "\n".join([
        "# Ablation curve: conditions as rows of one batch vs one condition at a time (CPU)",
        "",
        f"{rec['model']}, {rec['dtype']}, `--tokens {rec['tokens']}` ({'/'.join(map(str, rec['prompt_tokens']))} "
        f"prompt tokens), question {rec['question']}, {rec['samples']} samples; k in {' '.join(map(str, rec['ks']))}, "
        f"{rec['random_seeds']} random draws per k: {rec['conditions']} conditions, {rec['distinct_head_sets']} "
        f"distinct head sets (the unablated one shared), so {rows_per_curve} rows per curve, each a greedy answer "
        f"(at most {rec['max_new_tokens']} tokens, KV cache) and a teacher-forced gold log-prob. Median (min-max) "
        f"wall time of {rec['repeats']} interleaved rounds (every path once per round, the order rotating), after "
        "a warm-up of every path. Ratios are batched / reference: below 1 is faster.",
        "",
        "Machine: a 2-core CPU shared with several other engineers' work during the run (tests, other "
        f"benchmarks), hence `nice -n 10`, `OMP_NUM_THREADS={rec['omp_num_threads']}` and one torch thread; "
        "absolute times are noisy, and the paired ratio (median over rounds of batched/reference within one "
        "round) and the CPU-time ratio are the steadier measures.",
        "",
        *C.machine_lines(rec["machine"]),
        "",
        C.table(header, body),
        "",
        "- Peak memory: each path in a fresh child process (model loaded, a short warm-up, then one curve); "
        "peak = the process's highest resident set (model included), rise = above the resident set just before.",
        "- Every batch size gives the reference's greedy answers and its log-probs (as rounded in the JSON, 6 "
        "decimals), as `tests/test_ablation.py` checks within 1e-5.",
        "",
        f"Command: `{rec['command']}`",
        "",
    ])


if __name__ == "__main__":
    main()
