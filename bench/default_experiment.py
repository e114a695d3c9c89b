"""Which experiment `retrieval-heads detect` runs with no flags: measured candidates and the rule applied (CPU).

    nice -n 5 env OMP_NUM_THREADS=1 python bench/default_experiment.py --threads 1      # 256, 512 x 8, 12, 16

The question stays `inc_state` (the seed's); candidates are prompt lengths (``--tokens``) and sample counts
(``--samples``). Per length, one in-process ``detect(span="needle,answer", answers=True)`` on the largest
count gives the greedy answers (a smaller count's accuracy is that of its first samples: sample i is the
same for every count) and each span's verdict. Time: each candidate as the plain CLI (``retrieval-heads
detect --tokens T --samples N``, warm cache, a fresh process: model load included), plus the first-time
conversion, measured as the difference between a cold-cache and a warm-cache one-sample run
(``RETRIEVAL_HEADS_CACHE`` set to an empty folder). Each time is the child process's CPU seconds (user +
system) with one torch thread, i.e. its wall time on an idle core; the wall time on the shared machine is
recorded beside it.

The rule, fixed before measuring: (1) the length is the most accurate one (accuracy of the largest count;
ties to the shorter) at which every sample has a control span and at least one head beats the control on
the needle span (the span a plain ``detect`` scores); (2) the sample count is the largest candidate whose
plain run plus the conversion takes at most ``--budget`` CPU seconds (90 by default: a margin under the
README's 2 minutes). Finally the chosen experiment is timed as a first run would be: a cold
cache and the explicit flags (the same as the new defaults). Writes bench/results/default_experiment.md, .json.
"""

from __future__ import annotations

import argparse
import os
import resource
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


def cli_seconds(args: list[str], cache: str | None = None) -> dict:
    """{"cpu", "wall"} seconds of one `retrieval-heads detect ARGS` in a fresh process (output in a temp folder)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if cache is not None:
        env["RETRIEVAL_HEADS_CACHE"] = cache
    with tempfile.TemporaryDirectory() as out:
        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-m", "retrieval_heads", "detect", *args, "--output-dir", out], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return {"cpu": round(cpu, 1), "wall": round(wall, 1)}


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
        rows[n] = {"correct": sum(correct[:n])}
    rows[n_max]["spans"] = {s: span_row(full[NAMES[s]].record) for s in SPANS}
    return rows


def choose(record: dict, budget: float) -> tuple[int | None, int | None, list[str]]:
    """(tokens, samples) by the rule in the module docstring (None where nothing passes), with the reasons."""
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
        return None, None, why + ["no candidate length satisfies the rule"]
    tokens = min(ok)[1]
    conv = record["conversion_seconds"]["cpu"]
    fit = [int(n) for n, s in record["seconds"][str(tokens)].items() if s["cpu"] + conv <= budget]
    if not fit:
        return tokens, None, why + [f"no sample count at {tokens} tokens fits {budget:.0f} CPU s"]
    samples = max(fit)
    why.append(f"chosen: {tokens} tokens (the most accurate length that passes), {samples} samples (the largest count "
               f"whose plain run + conversion, {record['seconds'][str(tokens)][str(samples)]['cpu'] + conv:.0f} CPU s, "
               f"is within {budget:.0f} s)")
    return tokens, samples, why


def markdown(rec: dict) -> str:
    lines = ["# The default experiment of `retrieval-heads detect`", "", f"Command: `{rec['command']}`", "",
             *C.machine_lines(rec["machine"]), "",
             f"Model SmolLM2-135M-Instruct, float32, CPU, question `{QUESTION}`, synthetic samples (seed 0, needle "
             "depth 0.5). Per candidate: greedy answers (accuracy), and per span the heads that beat the control "
             "(one-sided Wilcoxon, Benjamini-Hochberg, alpha 0.05) and the top lift; time of the plain CLI run "
             "(warm cache, model load included) plus the first-time conversion "
             f"({rec['conversion_seconds']['cpu']:.0f} CPU s, cold minus warm one-sample run), as CPU seconds of one "
             "torch thread (the wall time on the shared machine in brackets).", ""]
    rows = []
    for t, by_n in rec["candidates"].items():
        for n, r in by_n.items():
            sec, conv = rec["seconds"][t][n], rec["conversion_seconds"]
            cells = ["", "", ""]
            if "spans" in r:
                nd, an = r["spans"]["needle"], r["spans"]["answer"]
                cells = [f"{nd['significant']}; {nd['top_lift']:.2f}x ({nd['top_lift_head']})",
                         f"{an['significant']}; {an['top_lift']:.2f}x ({an['top_lift_head']})",
                         f"{nd['samples_left_out']}/{an['samples_left_out']}"]
            rows.append([t, n, f"{r['correct']}/{n}", *cells,
                         f"{sec['cpu']:.0f} + {conv['cpu']:.0f} ({sec['wall']:.0f} + {conv['wall']:.0f})"])
    lines += [C.table(["tokens", "samples", "accuracy", "needle: heads beating control; top lift",
                       "answer: heads beating control; top lift", "samples without control (needle/answer)",
                       "CPU s (wall s): run + conversion"], rows), ""]
    lines += ["Verdict lines (`detect --span needle,answer --answers`, the largest count per length):", ""]
    for t, by_n in rec["candidates"].items():
        r = by_n[str(max(int(n) for n in by_n))]
        for s in SPANS:
            lines.append(f"- {t} tokens, `{s}`: {r['spans'][s]['verdict']}")
    lines += ["", f"Rule (fixed before measuring): the most accurate length where every sample has a control and "
              f"some head beats it on the needle span; then the largest sample count whose run + conversion is "
              f"at most {rec['budget']:.0f} s.", ""]
    lines += [f"- {w}" for w in rec["why"]]
    if "final_cold_seconds" in rec:
        f = rec["final_cold_seconds"]
        lines += ["", f"First run of the chosen default on a cold cache (conversion included), "
                  f"`{rec['final_command']}`: **{f['cpu']:.0f} CPU s** with one thread ({f['wall']:.0f} s wall on "
                  "the shared machine).", ""]
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
        rec["seconds"][str(t)] = {str(n): cli_seconds(["--tokens", str(t), "--samples", str(n)])
                                  for n in sorted(args.samples)}
        print(t, rec["candidates"][str(t)], rec["seconds"][str(t)], flush=True)
    one = ["--tokens", str(min(args.tokens)), "--samples", "1"]
    with tempfile.TemporaryDirectory() as cold:
        cold_s = cli_seconds(one, cache=cold)
    warm_s = cli_seconds(one)
    rec["conversion_seconds"] = {k: round(max(0.0, cold_s[k] - warm_s[k]), 1) for k in ("cpu", "wall")}
    tokens, samples, rec["why"] = choose(rec, args.budget)
    if samples is not None:
        flags = ["--tokens", str(tokens), "--samples", str(samples)]
        rec["final_command"] = "retrieval-heads detect " + " ".join(flags)
        with tempfile.TemporaryDirectory() as cold:
            rec["final_cold_seconds"] = cli_seconds(flags, cache=cold)
    js, md = C.write_results("default_experiment", rec, markdown(rec))
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
