"""How often the embedded model answers correctly, by question and prompt length (CPU).

    python bench/accuracy.py                                   # 256..2048 tokens, four questions, 8 samples
    python bench/accuracy.py --tokens 256 512 --samples 16 --threads 1

Each cell (question, length) is one ``detect`` call on the library's synthetic samples (seed 0, needle at
depth 0.5) with ``answers=True`` and the default method (``summed_attention``): the model's greedy answers
(at most 12 new tokens) are checked by the library's lenient match, and the call is timed end to end (model
already loaded), so the time is what ``retrieval-heads detect --answers`` spends on that cell minus loading;
the process's CPU time is recorded beside the wall time, as a busy shared machine inflates it far less.
Sample ``i`` depends only on (seed, i) and the four questions share one context per sample, so the
cells of one length differ only in the question asked. The results are written after every cell
(bench/results/accuracy.md and .json), so an interrupted run keeps the cells it finished.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

QUESTIONS = ["inc_state", "inc_year", "employee_count", "hq_state"]


def markdown(record: dict) -> str:
    """The result file: command, machine, the accuracy table (length x question) and the time per cell."""
    cells = {(c["tokens"], c["question"]): c for c in record["cells"]}
    tokens = record["tokens"]
    qs = record["questions"]
    acc_rows, time_rows = [], []
    for n in tokens:
        row, trow, tot, tot_n = [str(n)], [str(n)], 0, 0
        for q in qs:
            c = cells.get((n, q))
            if c is None:
                row.append("-")
                trow.append("-")
                continue
            row.append(f"{c['n_correct']}/{c['n_answered']}")
            trow.append(f"{c['seconds']:.0f} ({c['cpu_seconds']:.0f})")
            tot, tot_n = tot + c["n_correct"], tot_n + c["n_answered"]
        row.append(f"{tot}/{tot_n}" if tot_n else "-")
        acc_rows.append(row)
        time_rows.append(trow)
    lines = [
        "# Accuracy of the embedded model by question and length",
        "",
        f"Command: `{record['command']}`",
        "",
        *C.machine_lines(record["machine"]),
        "",
        f"Model {record['model']}, synthetic samples (seed {record['seed']}, needle depth {record['needle_position']}), "
        f"{record['samples']} samples per cell, greedy answers of at most {record['max_new_tokens']} tokens, "
        "correct under the library's lenient match (`data/questions.answer_matches`).",
        "",
        "Correct answers / samples:",
        "",
        C.table(["tokens", *qs, "all"], acc_rows),
        "",
        f"Seconds per cell, wall (CPU time of this process), for `detect(..., answers=True)` with the model loaded, "
        f"{record['machine']['torch_threads']} torch thread(s): scoring plus greedy answers of every sample. On a "
        "shared machine the wall time grows with the load; the CPU time is close to what the cell takes alone:",
        "",
        C.table(["tokens", *qs], time_rows),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--questions", nargs="+", default=QUESTIONS, choices=QUESTIONS)
    ap.add_argument("--samples", type=int, default=8, help="samples per cell")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="accuracy", help="name of the files under bench/results/")
    args = ap.parse_args()

    from retrieval_heads.experiments import detect
    from retrieval_heads.generation import DEFAULT_MAX_NEW_TOKENS

    machine, lm = C.setup(args.threads, args.model)
    seed, depth = 0, 0.5
    record = {
        "command": C.command_line(), "machine": machine, "model": lm.name, "seed": seed, "needle_position": depth,
        "samples": args.samples, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "tokens": args.tokens,
        "questions": args.questions, "cells": [],
    }
    for n in args.tokens:
        for q in args.questions:
            t0, c0 = time.perf_counter(), time.process_time()
            res = detect(lm, question=q, tokens=n, samples=args.samples, needle_position=depth, seed=seed,
                         answers=True)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            cell = {
                "tokens": n, "question": q, "seconds": round(dt, 2), "cpu_seconds": round(cpu, 2),
                "n_correct": res.record["extra"]["n_correct"],
                "n_answered": res.record["extra"]["n_answered"], "accuracy": res.record["extra"]["accuracy"],
                "answers": [{"gold": p.answer, "generated": a.text, "correct": a.correct}
                            for p, a in zip(res.prompts, res.answers)],
                "top_heads": [h for h, _ in res.top(3)],
            }
            record["cells"].append(cell)
            print(f"{n:5d} {q:15s} {cell['n_correct']}/{cell['n_answered']}  {dt:6.1f} s wall  {cpu:6.1f} s cpu", flush=True)
            C.write_results(args.out, record, markdown(record))
    print()
    print(markdown(record))


if __name__ == "__main__":
    main()
