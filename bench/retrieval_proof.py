"""Are the answer-span heads retrieval heads? Detect them by lift, then remove them (CPU, SmolLM2).

    nice -n 10 env OMP_NUM_THREADS=1 python bench/retrieval_proof.py --samples 8   # 256 tokens, k 0 5 10 20

The chain, as two CLI commands (printed in the result file):

1. ``retrieval-heads detect --question inc_state --tokens T --samples N --span needle,answer --rank-by lift
   --answers``: every head scored on the needle and on the answer's own tokens, each against its control span
   (one-sided Wilcoxon, Benjamini-Hochberg), ranked by lift;
2. ``retrieval-heads ablate RESULT --k 0 5 10 20 --draws 5 --controls matched,random`` on the ``answer``
   result: its top-k heads by lift removed, against 5 draws per k of layer-matched random heads (each top
   head replaced by a random head of its own layer) and of unmatched random heads (any layer), on the
   result's own samples (answers decoded up to the question's own budget: 12 tokens for a filing question,
   38 for passkey); greedy accuracy, the gold answer's mean log-probability after the prompt and after
   the model's own lead-in, per condition; the paired one-sided Wilcoxon test per k (Holm over k).

The question asked: does removing the top-k heads lower the gold answer's log-probability more than removing
as many heads of the same layers? ``--question`` takes any built-in question (e.g. a passkey task where
the package has one). Writes bench/results/retrieval_proof.md, and the ablation's
own JSON and PNG (bench/results/retrieval_proof.ablation.json, .png). Any other question or length writes
beside them under its own name, so earlier runs are kept:

    nice -n 10 env OMP_NUM_THREADS=1 python bench/retrieval_proof.py --question passkey --tokens 1024 --samples 8

writes bench/results/retrieval_proof_passkey_1024.md (.ablation.json, .png). The detect results stay in a
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
    lines = [f"# Ablation of the top heads by lift on the answer span: `{rec['question']}`, {rec['tokens']} tokens",
             "",
             f"Command: `{rec['command']}`, which runs:", "",
             f"1. `{rec['detect']}` ({rec['detect_seconds']:.0f} s)",
             f"2. `{rec['ablate']}` ({rec['ablate_seconds']:.0f} s)", "",
             *C.machine_lines(rec["machine"]), "",
             f"Model SmolLM2-135M-Instruct, float32, CPU; question `{rec['question']}`, {rec['tokens']} tokens, "
             f"{rec['samples']} synthetic samples (seed 0, needle depth 0.5); answers decoded up to "
             f"{rec['max_new_tokens']} tokens.", "", "## Detect", ""]
    for span, name in NAMES.items():
        r = results[span]
        lines += [f"`--span {span}` ({r['significance']['samples']} samples in the test): **{r['verdict']}**", "",
                  C.table(["head (by lift)", "score", "lift", "p adjusted (BH)"], head_rows(r, 8)), ""]
    lines += ["## Ablation of the `answer` result's top-k heads (by lift)", "",
              "Removed heads' outputs are zeroed. Controls, "
              f"{abl['draws']} draws per k each: layer-matched (each top head replaced by a random head of its own "
              "layer, outside the top k) and unmatched (k random heads of any layer outside the top k); each shown "
              "as median [min, max] over its draws. Gold log-prob: mean over samples of the gold answer's "
              "teacher-forced log-probability right after the prompt; after the lead-in: the same after the "
              "model's own lead-in (its unablated answer's words before the answer, e.g. \"The company is "
              "incorporated in\"). p: one-sided Wilcoxon signed-rank over samples, top-k lower than the mean of "
              "the control's draws, Holm-adjusted over k.", ""]
    lead = abl.get("leadin", {}).get("samples", [])
    if lead:
        kinds = {k: sum(1 for x in lead if x["source"] == k) for k in ("own", "shared", "none")}
        common = max({x["text"] for x in lead}, key=lambda t: sum(1 for x in lead if x["text"] == t))
        lines += [f"Lead-ins: {kinds['own']} samples their own, {kinds['shared']} the most common one, "
                  f"{kinds['none']} none; the most common: \"{common}\".", ""]

    def band(s, c, m, fmt):
        return f"{fmt.format(s[f'{c}_{m}_median'])} [{fmt.format(s[f'{c}_{m}_min'])}, {fmt.format(s[f'{c}_{m}_max'])}]"

    tests = {(t["control"], t["metric"], t["k"]): t for t in abl.get("tests", [])}
    for m, title, fmt in (("accuracy", "Accuracy", "{:.3f}"), ("logprob", "Gold log-prob after the prompt", "{:.3f}"),
                          ("leadin_logprob", "Gold log-prob after the lead-in", "{:.3f}")):
        rows = []
        for s in abl["summary"]:
            row = [str(s["k"]), fmt.format(s[f"top_{m}"]), band(s, "matched", m, fmt), band(s, "random", m, fmt)]
            if m != "accuracy":
                for c in ("matched", "random"):
                    t = tests.get((c, m, s["k"]))
                    row.append("-" if t is None else f"{t['p_holm']:.2g} ({t['n_lower']}/{t['n']} lower)")
            rows.append(row)
        head = ["k", "top-k removed", "layer-matched random removed", "unmatched random removed"]
        if m != "accuracy":
            head += ["p vs layer-matched", "p vs unmatched"]
        lines += [f"### {title}", "", C.table(head, rows), ""]
    lines += [f"**Conclusion** (as `ablate` prints it): {abl['conclusion']}", ""]
    lines += ["Outcome:", ""] + [f"- {o}" for o in rec["outcome"]] + [""]
    lines += ["Not run here: " + rec["not_run"], ""]
    lines += [f"Files: `{rec['stem']}.ablation.json` (every condition, per-sample answers and log-probs), "
              f"`{rec['stem']}.ablation.png` (the curves).", ""]
    return "\n".join(lines)


def outcome(abl: dict) -> list[str]:
    """Per k and metric, whether the effect survives against each control, by the test and by every draw."""
    out = []
    tests = {(t["control"], t["metric"], t["k"]): t for t in abl.get("tests", [])}
    for s in abl["summary"]:
        if s["k"] == 0:
            out.append(f"k = 0 (nothing removed): accuracy {s['top_accuracy']:.3f}, gold log-prob "
                       f"{s['top_logprob']:.3f}, after the lead-in {s['top_leadin_logprob']:.3f}")
            continue
        for m, name in (("logprob", "gold log-prob"), ("leadin_logprob", "log-prob after the lead-in")):
            parts = []
            for c, cname in (("matched", "layer-matched"), ("random", "unmatched")):
                t = tests.get((c, m, s["k"]))
                below = s[f"top_{m}"] < s[f"{c}_{m}_min"]
                sig = t is not None and t["p_holm"] <= 0.05
                parts.append(f"vs {cname}: {'survives' if sig else 'does NOT survive'} (p {t['p_holm']:.2g}, "
                             f"{t['n_lower']}/{t['n']} samples lower; "
                             f"{'below' if below else 'NOT below'} every draw)" if t else f"vs {cname}: no test")
            out.append(f"k = {s['k']}, {name} {s[f'top_{m}']:.3f}: " + "; ".join(parts))
        acc_below = s["top_accuracy"] < s["matched_accuracy_min"]
        out.append(f"k = {s['k']}, accuracy {s['top_accuracy']:.3f} vs layer-matched median "
                   f"{s['matched_accuracy_median']:.3f}: {'below' if acc_below else 'NOT below'} every matched draw")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--question", default="inc_state")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 5, 10, 20])
    ap.add_argument("--draws", type=int, default=5, help="draws per k of each control")
    ap.add_argument("--not-run", default="the other runs of bench/results/retrieval_proof.md",
                    help="what of the planned runs this one leaves out, for the result file")
    ap.add_argument("--keep", help="keep the detect results in this folder")
    args = ap.parse_args()
    from retrieval_heads.data.tasks import decode_budget

    budget = decode_budget(args.question)  # the question's own answer budget (ablate's default is the seed's 12)
    stem = "retrieval_proof" if (args.question, args.tokens) == ("inc_state", 256) else \
        f"retrieval_proof_{args.question}_{args.tokens}"
    info = C.machine()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        detect = ["detect", "--question", args.question, "--tokens", str(args.tokens), "--samples", str(args.samples),
                  "--span", "needle,answer", "--rank-by", "lift", "--answers", "--output-dir", str(out)]
        t_detect = cli(detect)
        files = {s: out / n / f"smollm2_{args.question}_{args.tokens}.json" for s, n in NAMES.items()}
        results = {s: json.loads(p.read_text()) for s, p in files.items()}
        ablation = C.RESULTS / f"{stem}.ablation.json"
        ablate = ["ablate", str(files["answer"]), "--k", *map(str, args.ks), "--draws", str(args.draws),
                  "--controls", "matched,random", "--max-new-tokens", str(budget), "--out", str(ablation)]
        t_ablate = cli(ablate)
    abl = json.loads(ablation.read_text())
    shown = [a if not a.startswith(str(out)) else "RESULTS" + a[len(str(out)):] for a in ablate]
    if str(abl.get("result", "")).startswith(str(out)):  # no temporary folder's name in the committed file
        abl["result"] = "RESULTS" + abl["result"][len(str(out)):]
        from retrieval_heads.io import atomic_write_json

        atomic_write_json(ablation, abl)
    rec = {"command": C.command_line(), "machine": info, "question": args.question, "tokens": args.tokens,
           "samples": args.samples, "max_new_tokens": budget, "stem": stem,
           "detect": "retrieval-heads " + shlex.join(detect).replace(str(out), "RESULTS"), "detect_seconds": t_detect,
           "ablate": "retrieval-heads " + shlex.join(shown).replace(str(C.RESULTS), "bench/results"),
           "ablate_seconds": t_ablate, "outcome": outcome(abl),
           "not_run": args.not_run + ("" if args.samples >= 16 else
                                      f"; 16 samples (this run has {args.samples}, to fit its time)")}
    from retrieval_heads.io import atomic_write_text

    md = C.RESULTS / f"{stem}.md"
    atomic_write_text(md, markdown(rec, results, abl))
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
