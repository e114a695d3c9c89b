"""Which experiment `retrieval-heads detect` runs with no flags: measured candidates and the rule applied (CPU).

    nice -n 5 env OMP_NUM_THREADS=1 python bench/default_experiment.py --threads 1      # 256, 512 x 8, 12, 16

The question stays `inc_state` (the seed's); candidates are prompt lengths (``--tokens``) and sample counts
(``--samples``). Per length, one in-process ``detect(span="needle,answer", answers=True)`` on the largest
count gives the greedy answers (a smaller count's accuracy is that of its first samples: sample i is the
same for every count) and each span's verdict; every smaller count is scored again (no answers) for its own
test. Time: each candidate as the plain CLI (``retrieval-heads detect --tokens T --samples N``, warm cache,
a fresh process: model load included), plus the first-time conversion, measured as the difference between a
cold-cache and a warm-cache one-sample run (``RETRIEVAL_HEADS_CACHE`` set to an empty folder).

The rule, fixed before measuring: (1) the length is the most accurate one (accuracy of the largest count;
ties to the shorter) at which every sample has a control span and at least one head beats the control on
the needle span (the span a plain ``detect`` scores); (2) the sample count is the largest candidate whose
plain run plus the conversion takes at most ``--budget`` seconds (90 by default: a margin under the README's
2 minutes for a busier machine). Finally the chosen experiment is timed as a first run would be: a cold
cache and the explicit flags (the same as the new defaults). Writes bench/results/default_experiment.md, .json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

QUESTION = "inc_state"
SPANS = ("needle", "answer")
NAMES = {"needle": "summed_attention", "answer": "summed_attention+answer"}


def cli_seconds(args: list[str], cache: str | None = None) -> float:
    """Wall seconds of one `retrieval-heads detect ARGS` in a fresh process (its output in a temp folder)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if cache is not None:
        env["RETRIEVAL_HEADS_CACHE"] = cache
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "retrieval_heads", "detect", *args, "--output-dir", out], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0


def span_row(rec: dict) -> dict:
    sig = rec["significance"]
    top = max(rec["head_rankings"], key=lambda r: r["lift"])
    return {"significant": len(sig["heads"]), "samples_in_test": sig["samples"],
            "samples_left_out": sig.get("samples_left_out", 0), "top_lift": top["lift"], "top_lift_head": top["head"],
            "verdict": rec["verdict"]}


def measure(lm, tokens: int, counts: list[int]) -> dict:
    from retrieval_heads import detect

    n_max = max(counts)
    full = detect(lm, question=QUESTION, tokens=tokens, samples=n_max, span=",".join(SPANS), answers=True)
    correct = [a.correct for a in full[NAMES["needle"]].answers]
    rows = {}
    for n in counts:
        res = full if n == n_max else detect(lm, question=QUESTION, tokens=tokens, samples=n, span=",".join(SPANS))
        rows[n] = {"correct": sum(correct[:n]), "spans": {s: span_row(res[NAMES[s]].record) for s in SPANS}}
    return rows


def choose(record: dict, budget: float) -> tuple[int, int, list[str]]:
    """(tokens, samples) by the rule in the module docstring, with the reasons as lines."""
    why = []
    ok = []
    for t, rows in record["candidates"].items():
        top = rows[str(max(int(n) for n in rows))]
        needle = top["spans"]["needle"]
        fits = needle["samples_left_out"] == 0 and top["spans"]["answer"]["samples_left_out"] == 0
        beats = needle["significant"] > 0
        why.append(f"{t} tokens: accuracy {top['correct']}/{max(int(n) for n in rows)}, control in every sample: "
                   f"{'yes' if fits else 'no'}, needle heads beating the control: {needle['significant']}")
        if fits and beats:
            ok.append((-top["correct"], int(t)))
    if not ok:
        raise SystemExit("no candidate length satisfies the rule")
    tokens = min(ok)[1]
    conv = record["conversion_seconds"]
    fit = [int(n) for n, s in record["seconds"][str(tokens)].items() if s + conv <= budget]
    if not fit:
        raise SystemExit(f"no sample count at {tokens} tokens fits {budget} s")
    samples = max(fit)
    why.append(f"chosen: {tokens} tokens (the most accurate length that passes), {samples} samples (the largest count "
               f"whose plain run + conversion, {record['seconds'][str(tokens)][str(samples)] + conv:.0f} s, is within "
               f"{budget:.0f} s)")
    return tokens, samples, why


def markdown(rec: dict) -> str:
    lines = ["# The default experiment of `retrieval-heads detect`", "", f"Command: `{rec['command']}`", "",
             *C.machine_lines(rec["machine"]), "",
             f"Model SmolLM2-135M-Instruct, float32, CPU, question `{QUESTION}`, synthetic samples (seed 0, needle "
             "depth 0.5). Per candidate: greedy answers (accuracy), and per span the heads that beat the control "
             "(one-sided Wilcoxon, Benjamini-Hochberg, alpha 0.05) and the top lift; time of the plain CLI run "
             "(warm cache, model load included) plus the first-time conversion "
             f"({rec['conversion_seconds']:.0f} s, cold minus warm one-sample run).", ""]
    rows = []
    for t, by_n in rec["candidates"].items():
        for n, r in by_n.items():
            nd, an = r["spans"]["needle"], r["spans"]["answer"]
            rows.append([t, n, f"{r['correct']}/{n}",
                         f"{nd['significant']}; {nd['top_lift']:.2f}x ({nd['top_lift_head']})",
                         f"{an['significant']}; {an['top_lift']:.2f}x ({an['top_lift_head']})",
                         f"{nd['samples_left_out']}/{an['samples_left_out']}",
                         f"{rec['seconds'][t][n]:.0f} + {rec['conversion_seconds']:.0f}"])
    lines += [C.table(["tokens", "samples", "accuracy", "needle: heads beating control; top lift",
                       "answer: heads beating control; top lift", "samples without control (needle/answer)",
                       "seconds (run + conversion)"], rows), ""]
    lines += ["Verdict lines (`detect --span needle,answer --answers`, the largest count per length):", ""]
    for t, by_n in rec["candidates"].items():
        r = by_n[str(max(int(n) for n in by_n))]
        for s in SPANS:
            lines.append(f"- {t} tokens, `{s}`: {r['spans'][s]['verdict']}")
    lines += ["", f"Rule (fixed before measuring): the most accurate length where every sample has a control and "
              f"some head beats it on the needle span; then the largest sample count whose run + conversion is "
              f"at most {rec['budget']:.0f} s.", ""]
    lines += [f"- {w}" for w in rec["why"]]
    lines += ["", f"First run of the chosen default on a cold cache (conversion included), "
              f"`{rec['final_command']}`: **{rec['final_cold_seconds']:.0f} s** wall.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--samples", type=int, nargs="+", default=[8, 12, 16])
    ap.add_argument("--budget", type=float, default=90.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    info, lm = C.setup(args.threads, "smollm2")
    rec = {"command": C.command_line(), "machine": info, "budget": args.budget, "candidates": {}, "seconds": {}}
    for t in args.tokens:
        rec["candidates"][str(t)] = {str(n): r for n, r in measure(lm, t, sorted(args.samples)).items()}
        rec["seconds"][str(t)] = {str(n): round(cli_seconds(["--tokens", str(t), "--samples", str(n)]), 1)
                                  for n in sorted(args.samples)}
        print(t, rec["candidates"][str(t)], rec["seconds"][str(t)], flush=True)
    one = ["--tokens", str(min(args.tokens)), "--samples", "1"]
    with tempfile.TemporaryDirectory() as cold:
        cold_s = cli_seconds(one, cache=cold)
    rec["conversion_seconds"] = round(max(0.0, cold_s - cli_seconds(one)), 1)
    tokens, samples, rec["why"] = choose(rec, args.budget)
    flags = ["--tokens", str(tokens), "--samples", str(samples)]
    rec["final_command"] = "retrieval-heads detect " + " ".join(flags)
    with tempfile.TemporaryDirectory() as cold:
        rec["final_cold_seconds"] = round(cli_seconds(flags, cache=cold), 1)
    js, md = C.write_results("default_experiment", rec, markdown(rec))
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
