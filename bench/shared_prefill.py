"""One prefill for four questions vs four separate full passes, on the embedded SmolLM2 (CPU), side by side.

    python bench/shared_prefill.py                                 # 1K and 2K tokens, 1 sample, 3 rounds
    python bench/shared_prefill.py --tokens 1024 2048 4096 --samples 2 --repeats 5 --threads 1

Per length, each round scores the four questions of the same samples twice, in turn (the order alternates
between rounds): (separate) one full forward pass per question and sample, ``SummedAttention.score_batch``
on each full prompt, as ``detect`` does; (shared) one context pass per sample and one pass for the four
suffixes on its cache (``score_shared`` of ``tests/reference.py``), as ``sweep`` does. We report the median
(min-max) of each, the ratio shared/separate of the medians and the median of the per-round ratios (goal
<= 0.40), and the largest difference between the two paths' scores. Writes bench/results/shared_prefill.md and .json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

GOAL = 0.40


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--samples", type=int, default=1, help="samples scored per round (all four questions each)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds per length")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="shared_prefill", help="name of the files under bench/results/")
    args = ap.parse_args()

    import torch

    from retrieval_heads.data.questions import QUESTIONS
    from retrieval_heads.experiments import build_prompts
    from retrieval_heads.methods.summed_attention import SummedAttention
    from reference import score_shared  # tests/, on sys.path through _common

    machine, lm = C.setup(args.threads, args.model)
    qs = list(QUESTIONS)
    method = SummedAttention()

    warm = build_prompts(lm, qs, 256, 1, 0.5, 0)
    score_shared(lm.model, warm, qs)  # warm-up: both paths once on a short prompt
    method.score_batch(lm.model, [warm[0][qs[0]]])

    rows = []
    for tokens in args.tokens:
        groups = build_prompts(lm, qs, tokens, args.samples, 0.5, 0)
        out: dict[str, dict[str, torch.Tensor]] = {}

        def separate():
            out["separate"] = {q: torch.cat([method.score_batch(lm.model, [g[q]]) for g in groups]) for q in qs}

        def shared():
            out["shared"] = score_shared(lm.model, groups, qs)

        times = {"separate": {"wall": [], "cpu": []}, "shared": {"wall": [], "cpu": []}}
        for r in range(args.repeats):
            order = {"separate": separate, "shared": shared}
            if r % 2:
                order = dict(reversed(list(order.items())))
            t = C.interleaved(order, 1)
            for name in times:
                for k in ("wall", "cpu"):
                    times[name][k] += t[name][k]
            print(f"{tokens} tokens, round {r + 1}/{args.repeats}: separate {times['separate']['wall'][-1]:.1f} s, "
                  f"shared {times['shared']['wall'][-1]:.1f} s", flush=True)
        sep, sh = C.summary(times["separate"]["wall"]), C.summary(times["shared"]["wall"])
        rows.append({
            "tokens": tokens,
            "prompt_tokens": sorted({len(g[q].input_ids) for g in groups for q in qs}),
            "context_tokens": groups[0][qs[0]].context_end,
            "separate_s": sep,
            "shared_s": sh,
            "ratio": sh["median"] / sep["median"],
            "ratio_paired": C.paired_ratio(times["shared"]["wall"], times["separate"]["wall"]),
            "separate_cpu_s": C.summary(times["separate"]["cpu"]),
            "shared_cpu_s": C.summary(times["shared"]["cpu"]),
            "ratio_cpu": C.paired_ratio(times["shared"]["cpu"], times["separate"]["cpu"]),
            "max_abs_diff": max(float((out["shared"][q] - out["separate"][q]).abs().max()) for q in qs),
        })
    record = {"benchmark": "shared_prefill", "model": lm.name, "dtype": "float32", "questions": qs,
              "samples": args.samples, "repeats": args.repeats, "goal_ratio": GOAL, "command": C.command_line(),
              "machine": machine, "rows": rows}
    md = markdown(record)
    C.write_results(args.out, record, md)
    print(md)


def markdown(rec: dict) -> str:
    header = ["--tokens", "context + suffix", "4 separate passes, s", "shared prefill, s", "ratio (medians)",
              "ratio (paired)", "ratio (CPU time)", "max abs diff of scores"]
    body = []
    for r in rec["rows"]:
        s, p = r["separate_s"], r["shared_s"]
        suffixes = sorted({n - r["context_tokens"] for n in r["prompt_tokens"]})
        body.append([
            str(r["tokens"]), f"{r['context_tokens']} + {'/'.join(map(str, suffixes))}",
            f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})", f"{p['median']:.1f} ({p['min']:.1f}-{p['max']:.1f})",
            f"**{r['ratio']:.2f}**", f"{r['ratio_paired']:.2f}", f"{r['ratio_cpu']:.2f}", f"{r['max_abs_diff']:.1e}",
        ])
    worst = max(r["ratio"] for r in rec["rows"])
    return "\n".join([
        "# One prefill for four questions vs four separate passes (CPU)",
        "",
        f"{rec['model']}, {rec['dtype']}: the four questions of {rec['samples']} synthetic sample(s) scored per "
        f"round, as four separate full forward passes per sample (`detect`'s path) and as one shared context pass "
        f"plus one pass for the four suffixes on its KV cache (`sweep`'s path, `retrieval_heads.prefill`). "
        f"Median (min-max) wall time of {rec['repeats']} interleaved rounds per length, the order alternating "
        f"between rounds, after a warm-up.",
        "",
        "Machine: shared with other engineers' CPU work during the run (tests, other benchmarks), which adds "
        "noise to the absolute times; interleaving the two paths round by round, and the paired ratio (median "
        "over rounds of shared/separate within one round), keep the comparison fair. The process's CPU time "
        "ratio is given as a check that a busy machine inflates less.",
        "",
        *C.machine_lines(rec["machine"]),
        "",
        C.table(header, body),
        "",
        f"Goal: ratio <= {rec['goal_ratio']:.2f}; worst measured ratio of medians: {worst:.2f} "
        f"({'met' if worst <= rec['goal_ratio'] else 'NOT met'}).",
        "",
        "- The shared path's scores equal the separate passes' (last column; float32), as the tests check "
        "within 1e-5.",
        "- Why not 0.25: the suffix pass (4 x ~25 tokens over the cached context) is not free; small-batch "
        "matrix products run well below the prefill's throughput on a CPU. Its share falls as the context grows.",
        "",
        f"Command: `{rec['command']}`",
        "",
    ])


if __name__ == "__main__":
    main()
