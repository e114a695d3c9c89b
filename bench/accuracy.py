"""How often the embedded model answers correctly, by question and prompt length (CPU).

    python bench/accuracy.py                                   # 256..2048 tokens, four questions, 8 samples
    python bench/accuracy.py --tokens 256 512 --samples 16 --threads 1

The samples are the library's synthetic ones (seed 0, needle at depth 0.5): ``experiments.build_prompts``
builds each sample's four questions on one shared context, exactly the prompts ``detect`` builds for each
question (checked on the first sample). Each cell (length, question) decodes the model's greedy answers
(``generation.answer_prompts``, at most 12 new tokens) and checks them with the library's lenient match:
the accuracy ``detect --answers`` records in ``extra``. Time: per cell, the answers; per length, one
``summed_attention`` scoring pass over the samples of one question (the same for every question, whose
prompts differ only in the question's few tokens). A ``detect --answers`` run of a cell costs about the sum
of the two (model loaded). The process's CPU time is recorded beside the wall time: a busy shared machine
inflates it far less. The results are written after every cell (bench/results/accuracy.md and .json), so
an interrupted run keeps the cells it finished.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

QUESTIONS = ["inc_state", "inc_year", "employee_count", "hq_state"]


def timed(fn):
    """(result, wall seconds, CPU seconds of this process) of fn()."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def markdown(record: dict) -> str:
    """The result file: command, machine, the accuracy table (length x question) and the times."""
    cells = {(c["tokens"], c["question"]): c for c in record["cells"]}
    scoring = {s["tokens"]: s for s in record["scoring"]}
    qs = record["questions"]
    acc_rows, time_rows = [], []
    for n in record["tokens"]:
        row, trow, tot, tot_n = [str(n)], [str(n)], 0, 0
        for q in qs:
            c = cells.get((n, q))
            if c is None:
                row.append("-")
                trow.append("-")
                continue
            row.append(f"{c['n_correct']}/{c['n_answered']}")
            trow.append(f"{c['cpu_seconds']:.0f} ({c['seconds']:.0f})")
            tot, tot_n = tot + c["n_correct"], tot_n + c["n_answered"]
        row.append(f"{tot}/{tot_n}" if tot_n else "-")
        s = scoring.get(n)
        trow.append(f"{s['cpu_seconds']:.0f} ({s['seconds']:.0f})" if s else "-")
        acc_rows.append(row)
        time_rows.append(trow)
    return "\n".join([
        "# Accuracy of the embedded model by question and length",
        "",
        f"Command: `{record['command']}`",
        "",
        *C.machine_lines(record["machine"]),
        "",
        f"Model {record['model']}, float32, synthetic samples (seed {record['seed']}, needle depth "
        f"{record['needle_position']}), {record['samples']} samples per cell (samples 0..{record['samples'] - 1}, the "
        f"same contexts for the four questions of a length), greedy answers of at most {record['max_new_tokens']} "
        "tokens, correct under the library's lenient match (`data/questions.answer_matches`).",
        "",
        "Correct answers / samples:",
        "",
        C.table(["tokens", *qs, "all"], acc_rows),
        "",
        f"CPU seconds (wall seconds) with {record['machine']['torch_threads']} torch thread(s), model loaded: the "
        f"greedy answers of each cell's {record['samples']} samples, and one `summed_attention` scoring pass over "
        "the samples of one question (`inc_state`) per length. A `detect --answers` run of a cell costs about the "
        "sum of its answers and the scoring pass. The machine was shared: the wall time grew with its load, the "
        "CPU time far less.",
        "",
        C.table(["tokens", *[f"answers {q}" for q in qs], "scoring"], time_rows),
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--questions", nargs="+", default=QUESTIONS, choices=QUESTIONS)
    ap.add_argument("--samples", type=int, default=8, help="samples per cell")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="accuracy", help="name of the files under bench/results/")
    args = ap.parse_args()

    from retrieval_heads.experiments import build_prompts, score_prompts
    from retrieval_heads.generation import DEFAULT_MAX_NEW_TOKENS, answer_prompts

    machine, lm = C.setup(args.threads, args.model)
    seed, depth = 0, 0.5
    record = {
        "command": C.command_line(), "machine": machine, "model": lm.name, "seed": seed, "needle_position": depth,
        "samples": args.samples, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "tokens": args.tokens,
        "questions": args.questions, "cells": [], "scoring": [],
    }
    for n in args.tokens:
        groups = build_prompts(lm, args.questions, n, args.samples, depth, seed)
        for q in args.questions:  # the prompts detect builds for one question alone
            assert build_prompts(lm, [q], n, 1, depth, seed)[0][q].input_ids == groups[0][q].input_ids
        _, dt, cpu = timed(lambda: score_prompts(lm, "summed_attention", [g[args.questions[0]] for g in groups]))
        record["scoring"].append({"tokens": n, "question": args.questions[0], "seconds": round(dt, 2),
                                  "cpu_seconds": round(cpu, 2)})
        print(f"{n:5d} scoring {args.questions[0]:15s} {dt:7.1f} s wall {cpu:7.1f} s cpu", flush=True)
        for q in args.questions:
            prompts = [g[q] for g in groups]
            got, dt, cpu = timed(lambda: answer_prompts(lm, prompts))
            n_correct = sum(a.correct for a in got)
            record["cells"].append({
                "tokens": n, "question": q, "seconds": round(dt, 2), "cpu_seconds": round(cpu, 2),
                "n_correct": n_correct, "n_answered": len(got), "accuracy": round(n_correct / len(got), 6),
                "answers": [{"gold": p.answer, "generated": a.text, "correct": a.correct} for p, a in zip(prompts, got)],
            })
            print(f"{n:5d} answers {q:15s} {n_correct}/{len(got)} {dt:7.1f} s wall {cpu:7.1f} s cpu", flush=True)
            C.write_results(args.out, record, markdown(record))
    print()
    print(markdown(record))


if __name__ == "__main__":
    main()
