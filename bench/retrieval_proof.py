"""Are the answer-span heads retrieval heads? Detect them by lift, then remove them (CPU, SmolLM2).

    nice -n 5 env OMP_NUM_THREADS=1 python bench/retrieval_proof.py          # 256 tokens, 16 samples, k 0 5 10 20

The chain, as two CLI commands (printed in the result file):

1. ``retrieval-heads detect --question inc_state --tokens T --samples N --span needle,answer --rank-by lift
   --answers``: every head scored on the needle and on the answer's own tokens, each against its control span
   (one-sided Wilcoxon, Benjamini-Hochberg), ranked by lift;
2. ``retrieval-heads ablate RESULT --k 0 5 10 20 --random-seeds 3`` on the ``answer`` result: its top-k heads
   by lift removed, and k random heads from outside the top k (3 draws per k), on the result's own samples;
   greedy accuracy and the gold answer's mean log-probability per condition.

The question asked: does removing the top-k heads lower the gold answer's log-probability more than removing
as many random heads (below every random draw)? Writes bench/results/retrieval_proof.md, and the ablation's
own JSON and PNG (bench/results/retrieval_proof.ablation.json, .png); the detect results stay in a
temporary folder (``--keep DIR`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAMES = {"needle": "summed_attention", "answer": "summed_attention+answer"}


def cli(args: list[str]) -> float:
    """Run `retrieval-heads ARGS` (this checkout's package) and return its wall seconds; its output is shown."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "retrieval_heads", *args], env=env, check=True)
    return time.perf_counter() - t0


def head_rows(rec: dict, n: int) -> list[list[str]]:
    """The top n heads of a result by lift: head, score, lift, adjusted p against the control."""
    padj = rec["significance"].get("p_adjusted")
    rows = []
    for r in sorted(rec["head_rankings"], key=lambda r: -r["lift"])[:n]:
        layer, head = (int(x) for x in r["head"][1:].split("H"))
        p = "-" if not padj else f"{padj[layer][head]:.2g}"
        rows.append([r["head"], f"{r['score']:.3f}", f"{r['lift']:.2f}x", p])
    return rows


def markdown(rec: dict, results: dict, abl: dict) -> str:
    lines = ["# Ablation of the top heads by lift on the answer span", "",
             f"Command: `{rec['command']}`, which runs:", "",
             f"1. `{rec['detect']}` ({rec['detect_seconds']:.0f} s)",
             f"2. `{rec['ablate']}` ({rec['ablate_seconds']:.0f} s)", "",
             *C.machine_lines(rec["machine"]), "",
             f"Model SmolLM2-135M-Instruct, float32, CPU; question `{rec['question']}`, {rec['tokens']} tokens, "
             f"{rec['samples']} synthetic samples (seed 0, needle depth 0.5).", "", "## Detect", ""]
    for span, name in NAMES.items():
        r = results[span]
        lines += [f"`--span {span}` ({r['significance']['samples']} samples in the test): **{r['verdict']}**", "",
                  C.table(["head (by lift)", "score", "lift", "p adjusted (BH)"], head_rows(r, 8)), ""]
    lines += ["## Ablation of the `answer` result's top-k heads (by lift)", "",
              f"Removed heads' outputs are zeroed; random: k heads from outside the top k, "
              f"{abl['random_seeds']} draws per k. Gold log-prob: mean over samples of the gold answer's "
              "teacher-forced log-probability.", ""]
    rows = []
    for s in abl["summary"]:
        k = s["k"]
        top = next(t for t in abl["top"] if t["k"] == k)
        rows.append([str(k), ", ".join(top["heads"]) or "-", f"{s['top_accuracy']:.3f}",
                     f"{s['random_accuracy_mean']:.3f} ({s['random_accuracy_min']:.3f}..{s['random_accuracy_max']:.3f})",
                     f"{s['top_logprob']:.3f}",
                     f"{s['random_logprob_mean']:.3f} ({s['random_logprob_min']:.3f}..{s['random_logprob_max']:.3f})"])
    lines += [C.table(["k", "top heads removed", "accuracy, top", "accuracy, random mean (min..max)",
                       "gold log-prob, top", "gold log-prob, random mean (min..max)"], rows), ""]
    lines += ["Outcome:", ""] + [f"- {o}" for o in rec["outcome"]] + [""]
    lines += ["Files: `retrieval_proof.ablation.json` (every condition, per-sample answers and log-probs), "
              "`retrieval_proof.ablation.png` (the curves).", ""]
    return "\n".join(lines)


def outcome(abl: dict) -> list[str]:
    out = []
    for s in abl["summary"]:
        if s["k"] == 0:
            out.append(f"k = 0 (nothing removed): accuracy {s['top_accuracy']:.3f}, gold log-prob {s['top_logprob']:.3f}")
            continue
        below = s["top_logprob"] < s["random_logprob_min"]
        out.append(f"k = {s['k']}: gold log-prob {s['top_logprob']:.3f} with the top heads removed vs "
                   f"{s['random_logprob_mean']:.3f} (mean of random draws, lowest {s['random_logprob_min']:.3f}): "
                   + ("lower than every random draw" if below else "NOT lower than every random draw")
                   + f"; accuracy {s['top_accuracy']:.3f} vs {s['random_accuracy_mean']:.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--question", default="inc_state")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 5, 10, 20])
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--keep", help="keep the detect results in this folder")
    args = ap.parse_args()
    info = C.machine()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        detect = ["detect", "--question", args.question, "--tokens", str(args.tokens), "--samples", str(args.samples),
                  "--span", "needle,answer", "--rank-by", "lift", "--answers", "--output-dir", str(out)]
        t_detect = cli(detect)
        files = {s: out / n / f"smollm2_{args.question}_{args.tokens}.json" for s, n in NAMES.items()}
        results = {s: json.loads(p.read_text()) for s, p in files.items()}
        ablation = C.RESULTS / "retrieval_proof.ablation.json"
        ablate = ["ablate", str(files["answer"]), "--k", *map(str, args.ks), "--random-seeds", str(args.random_seeds),
                  "--out", str(ablation)]
        t_ablate = cli(ablate)
    abl = json.loads(ablation.read_text())
    shown = [a if not a.startswith(str(out)) else "RESULTS" + a[len(str(out)):] for a in ablate]
    if str(abl.get("result", "")).startswith(str(out)):  # no temporary folder's name in the committed file
        abl["result"] = "RESULTS" + abl["result"][len(str(out)):]
        from retrieval_heads.io import atomic_write_json

        atomic_write_json(ablation, abl)
    rec = {"command": C.command_line(), "machine": info, "question": args.question, "tokens": args.tokens,
           "samples": args.samples,
           "detect": "retrieval-heads " + shlex.join(detect).replace(str(out), "RESULTS"), "detect_seconds": t_detect,
           "ablate": "retrieval-heads " + shlex.join(shown).replace(str(C.RESULTS), "bench/results"),
           "ablate_seconds": t_ablate, "outcome": outcome(abl)}
    from retrieval_heads.io import atomic_write_text

    md = C.RESULTS / "retrieval_proof.md"
    atomic_write_text(md, markdown(rec, results, abl))
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
