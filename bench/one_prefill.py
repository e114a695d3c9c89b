"""Every method from one prefill: three methods vs summed_attention alone, in detect and in a sweep unit (CPU).

    python bench/one_prefill.py                                   # 1K and 2K tokens, 1 sample, 2 rounds
    python bench/one_prefill.py --tokens 1024 2048 --samples 2 --repeats 3 --threads 2

(a) ``detect`` on one question, per length, each round running in turn: summed_attention alone (one full
pass per sample); the three methods summed_attention, query_focused and retrieval_score from one prefill
(the default: one context pass, one pass for the question's and the "N/A" suffixes, greedy decoding from the
same cache); the same three methods each with its own passes (``one_prefill=False``: a full pass, two
passes for query_focused and its calibration, and a decoding from scratch). Goal: three methods <= 1.4x
summed_attention alone.
(b) one sweep unit (``sweep.compute_unit``) of the four questions at the first length: summed_attention
alone vs the three methods (both share one context pass per sample).
Peak memory: each path once in a fresh child process (see _common.peak_rss), as the process's highest
resident set, model included. Also: the largest difference between the shared and separate scores, and
whether the answers are identical. Writes bench/results/one_prefill.md and .json.
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

GOAL = 1.4
THREE = ["summed_attention", "query_focused", "retrieval_score"]
QUESTION = "inc_state"


def paths(lm, tokens: int, samples: int) -> dict:
    """The measured calls, each returning what it computed."""
    from retrieval_heads.data.questions import QUESTIONS
    from retrieval_heads.experiments import detect
    from retrieval_heads.sweep import Unit, compute_unit, make_grid

    kw = dict(question=QUESTION, tokens=tokens, samples=samples)
    unit = Unit(lm.key, tokens, tuple(QUESTIONS))
    one = make_grid(models=["smollm2"], tokens=[tokens], samples=samples)
    three = make_grid(models=["smollm2"], tokens=[tokens], samples=samples, method=",".join(THREE))
    return {
        "summed": lambda: detect(lm, method="summed_attention", **kw),
        "three_shared": lambda: detect(lm, method=THREE, **kw),
        "three_separate": lambda: detect(lm, method=THREE, one_prefill=False, **kw),
        "sweep_summed": lambda: compute_unit(lm, unit, one),
        "sweep_three": lambda: compute_unit(lm, unit, three),
    }


def child(args, path: str, tokens: int) -> None:
    """One peak-memory measurement in this fresh process; prints one JSON line."""
    _, lm = C.setup(args.threads, args.model)
    fns = paths(lm, 256, 1)
    fns[path]()  # warm-up on a short prompt
    fn = paths(lm, tokens, args.samples)[path]
    print(json.dumps(C.peak_rss(fn)))


def peak(args, path: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--child-tokens", str(tokens), "--model", args.model,
           "--samples", str(args.samples)] + (["--threads", str(args.threads)] if args.threads else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if done.returncode:
        raise RuntimeError(f"memory child {path} at {tokens} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds per length")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--out", default="one_prefill", help="name of the files under bench/results/")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-tokens", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args, args.child, args.child_tokens)

    machine, lm = C.setup(args.threads, args.model)
    for fn in paths(lm, 256, 1).values():  # warm-up
        fn()
    rows = []
    for i, tokens in enumerate(args.tokens):
        fns = paths(lm, tokens, args.samples)
        names = ["summed", "three_shared", "three_separate"] + (["sweep_summed", "sweep_three"] if i == 0 else [])
        got: dict = {}
        times = {n: {"wall": [], "cpu": []} for n in names}
        for r in range(args.repeats):
            order = names if r % 2 == 0 else list(reversed(names))
            t = C.interleaved({n: (lambda n=n: got.__setitem__(n, fns[n]())) for n in order}, 1)
            for n in names:
                for k in ("wall", "cpu"):
                    times[n][k] += t[n][k]
            print(f"{tokens} tokens, round {r + 1}/{args.repeats}: " +
                  ", ".join(f"{n} {times[n]['wall'][-1]:.1f} s" for n in names), flush=True)
        a, b = got["three_shared"], got["three_separate"]
        row = {
            "tokens": tokens,
            "seconds": {n: C.summary(times[n]["wall"]) for n in names},
            "cpu_seconds": {n: C.summary(times[n]["cpu"]) for n in names},
            "ratio_three_shared": C.paired_ratio(times["three_shared"]["wall"], times["summed"]["wall"]),
            "ratio_three_separate": C.paired_ratio(times["three_separate"]["wall"], times["summed"]["wall"]),
            "ratio_three_shared_cpu": C.paired_ratio(times["three_shared"]["cpu"], times["summed"]["cpu"]),
            "max_abs_diff": max(float((a[n].sample_scores - b[n].sample_scores).abs().max()) for n in a),
            "answers_identical": [x.ids for x in a["retrieval_score"].answers] ==
                                 [x.ids for x in b["retrieval_score"].answers],
        }
        if i == 0:
            row["ratio_sweep"] = C.paired_ratio(times["sweep_three"]["wall"], times["sweep_summed"]["wall"])
            row["ratio_sweep_cpu"] = C.paired_ratio(times["sweep_three"]["cpu"], times["sweep_summed"]["cpu"])
        if not args.no_memory:
            row["peak"] = {n: peak(args, n, tokens) for n in names}
        rows.append(row)
    record = {"benchmark": "one_prefill", "model": lm.name, "dtype": "float32", "question": QUESTION,
              "methods": THREE, "samples": args.samples, "repeats": args.repeats, "goal_ratio": GOAL,
              "command": C.command_line(), "machine": machine, "rows": rows}
    md = markdown(record)
    C.write_results(args.out, record, md)
    print(md)


def markdown(rec: dict) -> str:
    def t(r, n):
        s = r["seconds"][n]
        return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"

    def m(r, n, base):
        p = r.get("peak")
        if not p:
            return "not measured"
        return f"{p[n]['peak_mib']:.0f} ({p[n]['peak_mib'] / p[base]['peak_mib']:.2f}x)"

    a_rows = [[str(r["tokens"]), t(r, "summed"), t(r, "three_shared"), t(r, "three_separate"),
               f"**{r['ratio_three_shared']:.2f}**", f"{r['ratio_three_separate']:.2f}",
               f"{r['ratio_three_shared_cpu']:.2f}", m(r, "summed", "summed"), m(r, "three_shared", "summed"),
               m(r, "three_separate", "summed"), f"{r['max_abs_diff']:.1e}", "yes" if r["answers_identical"] else "NO"]
              for r in rec["rows"]]
    r0 = rec["rows"][0]
    b_rows = [[str(r0["tokens"]), t(r0, "sweep_summed"), t(r0, "sweep_three"), f"**{r0['ratio_sweep']:.2f}**",
               f"{r0['ratio_sweep_cpu']:.2f}", m(r0, "sweep_summed", "sweep_summed"),
               m(r0, "sweep_three", "sweep_summed")]]
    return "\n".join([
        "# Every method from one prefill (CPU)",
        "",
        f"{rec['model']}, {rec['dtype']}, question `{rec['question']}`, {rec['samples']} synthetic sample(s) per "
        f"call; methods {', '.join(rec['methods'])}. Median (min-max) wall seconds of {rec['repeats']} interleaved "
        "rounds (the order reversed every other round) after a warm-up; ratios are medians over rounds of the "
        "per-round ratio; peak memory is each path once in a fresh child process (highest resident set, model "
        "included; ratio to the single-method path).",
        "",
        f"Command: `{rec['command']}`",
        "",
        *C.machine_lines(rec["machine"]),
        "",
        f"## (a) detect: three methods vs summed_attention alone (goal <= {rec['goal_ratio']}x)",
        "",
        C.table(["--tokens", "summed_attention, s", "3 methods, one prefill, s", "3 methods, own passes, s",
                 "ratio one prefill", "ratio own passes", "ratio (CPU time)", "peak MiB summed",
                 "peak MiB one prefill", "peak MiB own passes", "max abs diff (one prefill vs own passes)",
                 "answers identical"], a_rows),
        "",
        "## (b) a sweep unit of the four questions: three methods vs summed_attention",
        "",
        C.table(["--tokens", "4 questions x summed_attention, s", "4 questions x 3 methods, s", "ratio",
                 "ratio (CPU time)", "peak MiB summed", "peak MiB 3 methods"], b_rows),
        "",
    ])


if __name__ == "__main__":
    main()
