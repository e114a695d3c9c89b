"""The long-context default of `retrieval-heads detect`: the rule of bench/results/default_experiment.md applied.

    nice -n 5 env OMP_NUM_THREADS=1 python bench/default_task.py --threads 1

Task `passkey` (seed 0, needle depth 0.5), `answer` span, 8 samples, answers decoded: one in-process
``detect(question="passkey", tokens=T, samples=8, span="answer", answers=True)`` per length T of 512, 1024,
2048, in that order, stopping at the first that passes the rule (answered at least 90%, i.e. 8/8, and at least
one head beats the control at alpha 0.05). Records per length the accuracy, the number of heads beating the
control, the top heads by lift and the verdict line, and the wall time of the run (model loaded once, before).
Writes bench/results/default_task.md, .json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

TASK, SPAN, SAMPLES, LENGTHS = "passkey", "answer", 8, (512, 1024, 2048)


def measure(lm, tokens: int) -> dict:
    from retrieval_heads import detect

    t0 = time.perf_counter()
    res = detect(lm, question=TASK, tokens=tokens, samples=SAMPLES, span=SPAN, answers=True).result
    wall = time.perf_counter() - t0
    rec = res.record
    sig = rec["significance"]
    top = sorted(rec["head_rankings"], key=lambda r: -r["lift"])[:10]
    return {"n_correct": rec["extra"]["n_correct"], "n_answered": rec["extra"]["n_answered"],
            "answers": [a.text for a in res.answers], "significant": len(sig["heads"]),
            "significant_heads": sig["heads"], "top_by_lift": [[r["head"], round(r["lift"], 2)] for r in top],
            "verdict": rec["verdict"], "wall_seconds": round(wall, 1)}


def passes(r: dict) -> bool:
    return r["n_correct"] >= 0.9 * r["n_answered"] and r["significant"] > 0


def markdown(rec: dict) -> str:
    lines = ["# The long-context default of `retrieval-heads detect`", "", f"Command: `{rec['command']}`", "",
             *C.machine_lines(rec["machine"]), "",
             f"Model SmolLM2-135M-Instruct, float32, CPU; task `{TASK}` (seed 0, depth 0.5), span `{SPAN}`, "
             f"{SAMPLES} samples, answers decoded. Rule (bench/results/default_experiment.md, fixed before these "
             "runs): the shortest of 512, 1,024, 2,048 tokens answered at least 90% with at least one head beating "
             "the control at alpha 0.05; lengths run in order, stopping at the first that passes.", ""]
    rows = []
    for t, r in rec["candidates"].items():
        heads = ", ".join(f"{h} {x:.1f}x" for h, x in r["top_by_lift"][:5])
        rows.append([t, f"{r['n_correct']}/{r['n_answered']}", str(r["significant"]), heads,
                     "yes" if passes(r) else "no", f"{r['wall_seconds']:.0f}"])
    lines += [C.table(["tokens", "accuracy", "heads beating the control", "top 5 heads by lift", "passes",
                       "wall s (shared machine)"], rows), ""]
    lines += ["Verdict lines:", ""] + [f"- {t} tokens: {r['verdict']}" for t, r in rec["candidates"].items()]
    lines += ["", f"Chosen: {rec['chosen']}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    info, lm = C.setup(args.threads, "smollm2")
    rec = {"command": C.command_line(), "machine": info, "candidates": {}}
    chosen = None
    for t in LENGTHS:
        r = measure(lm, t)
        rec["candidates"][str(t)] = r
        print(t, r["verdict"], flush=True)
        if passes(r):
            chosen = t
            break
    if chosen is None:
        best = max(rec["candidates"].items(), key=lambda kv: (kv[1]["n_correct"], -int(kv[0])))
        rec["chosen"] = f"no length passes the rule; the most accurate, {best[0]} tokens"
        rec["chosen_tokens"] = int(best[0])
    else:
        rec["chosen"] = f"{chosen} tokens, the shortest length that passes"
        rec["chosen_tokens"] = chosen
    C.write_results("default_task", rec, markdown(rec))


if __name__ == "__main__":
    main()
