"""The embedded model's accuracy on each long-context task at 512, 1K, 2K, 4K and 8K tokens (measured, not tuned).

    nice -n 10 env OMP_NUM_THREADS=1 python bench/tasks.py --threads 1

Per task and length: the task's prompts (seed 0, needle depth 0.5; 8 samples up to 2K tokens, 4 at 4K and 8K,
where one forward pass costs tens of seconds on a CPU), the model's greedy answers with the task's own decoding
budget (:func:`retrieval_heads.data.tasks.decode_budget`; ``--batch-size`` prompts decoded together, as
``detect --batch-size`` does), and the share it answers right (the documented
lenient matcher). Cells run length by length, every task at one length before the next, and the results are
written after every cell, so a run cut short leaves a table whose missing cells say "not run". ``--tokens``
and ``--tasks`` pick cells; cells of other lengths already in the results file are kept (two runs on different lengths
can share it).
Writes bench/results/tasks.md, .json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

LENGTHS = (512, 1024, 2048, 4096, 8192)
SAMPLES = {512: 8, 1024: 8, 2048: 8, 4096: 4, 8192: 4}


def markdown(rec: dict) -> str:
    from retrieval_heads.data.tasks import TASKS, decode_budget

    lines = ["# Accuracy of the embedded model on the long-context tasks", "", f"Command: `{rec['command']}`", "",
             *C.machine_lines(rec["machine"]), "",
             "Model SmolLM2-135M-Instruct (8,192 positions), float32, CPU; seed 0, needle depth 0.5; greedy "
             "answers with each task's decoding budget, checked by the lenient matcher (the key as a whole "
             "number or whole words). Samples per cell: " +
             ", ".join(f"{t}: {n}" for t, n in SAMPLES.items()) + " (fewer at 4K and 8K: CPU time). Cells "
             "marked \"not run\" were not measured. Cells may come from several runs of the script on different "
             "`--tokens` / `--tasks` at the same time, sharing the results file; the command and machine lines "
             "above are the last writer's.", ""]
    rows = []
    for k in TASKS.names():
        cells = []
        for t in LENGTHS:
            r = rec["cells"].get(k, {}).get(str(t))
            cells.append("not run" if r is None else f"{r['n_correct']}/{r['n_answered']}")
        rows.append([f"`{k}`", str(decode_budget(k)), *cells])
    lines += [C.table(["task", "decoded tokens", *(f"{t} tokens" for t in LENGTHS)], rows), ""]
    lines += ["Answers of the failed samples (first 3 per cell):", ""]
    for k, by_t in rec["cells"].items():
        for t, r in by_t.items():
            bad = [f"{a!r} (gold {g})" for a, g, ok in r["answers"] if not ok][:3]
            if bad:
                lines.append(f"- `{k}` at {t}: " + "; ".join(bad))
    lines.append("")
    return "\n".join(lines)


def merged(mine: dict) -> dict:
    """The cells already in bench/results/tasks.json (a run on other lengths, e.g. ``--tokens 4096 8192`` at
    the same time) with this run's own, which win."""
    import json

    try:
        cells = json.loads((C.RESULTS / "tasks.json").read_text())["cells"]
    except (OSError, ValueError, KeyError):
        cells = {}
    for k, by_t in mine.items():
        cells.setdefault(k, {}).update(by_t)
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--tasks", nargs="+", default=None, help="Tasks to run [default: all].")
    ap.add_argument("--rewrite", action="store_true", help="Only write tasks.md again from tasks.json.")
    ap.add_argument("--batch-size", type=int, default=4, help="Prompts decoded together (all of one length).")
    args = ap.parse_args()
    from retrieval_heads.data.tasks import TASKS, decode_budget, task_prompts
    from retrieval_heads.generation import answer_prompts

    if args.rewrite:
        import json

        rec = json.loads((C.RESULTS / "tasks.json").read_text())
        C.write_results("tasks", rec, markdown(rec))
        return
    info, lm = C.setup(args.threads, "smollm2")
    rec = {"command": C.command_line(), "machine": info, "samples": SAMPLES, "cells": {}}
    mine: dict = {}
    for t in args.tokens:
        for k in args.tasks or TASKS.names():
            t0 = time.perf_counter()
            prompts = task_prompts(lm.tokenizer, k, t, SAMPLES[t], 0.5, 0)
            got = answer_prompts(lm, prompts, decode_budget(k), args.batch_size)
            r = {"n_correct": sum(a.correct for a in got), "n_answered": len(got),
                 "answers": [[a.text, p.answer, a.correct] for a, p in zip(got, prompts)],
                 "wall_seconds": round(time.perf_counter() - t0, 1)}
            mine.setdefault(k, {})[str(t)] = r
            print(k, t, f"{r['n_correct']}/{r['n_answered']}", r["wall_seconds"], flush=True)
            rec["cells"] = merged(mine)
            C.write_results("tasks", rec, markdown(rec))


if __name__ == "__main__":
    main()
