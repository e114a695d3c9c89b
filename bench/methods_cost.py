"""Every method and two spans against one method, whole process: the cost a user pays at the command line.

    nice -n 10 python bench/methods_cost.py --repeats 3

Per round, each a fresh ``retrieval-heads detect`` process (imports, model load, prompts, passes, result
files: everything the user waits for), into its own temp folder:

- ``one``: ``--method summed_attention`` (one span, the question's default);
- ``all``: ``--method summed_attention,query_focused,retrieval_score,qrhead --span needle,answer``: four
  methods on the same samples, summed_attention's two spans written as two results.

Both at ``--tokens 1024 --samples 3`` on the same question (``--question``, default inc_state: the filing
experiment, which decodes answers only for the methods that read them, so ``one`` pays no decoding and
``all`` pays retrieval_score's). Rounds interleave the two and reverse their order every other round, so a
slow spell of a shared machine hits both alike; the ratio is the median over rounds of the per-round ratio.
Also checked: the summed_attention result of ``all`` against ``one``'s (largest score difference, same top 10).
Writes bench/results/methods_cost.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

GOAL = 1.4
ALL = "summed_attention,query_focused,retrieval_score,qrhead"


def commands(question: str, tokens: int, samples: int) -> dict[str, list[str]]:
    base = [sys.executable, "-m", "retrieval_heads", "detect", "--question", question, "--tokens", str(tokens),
            "--samples", str(samples)]
    return {"one": base + ["--method", "summed_attention"],
            "all": base + ["--method", ALL, "--span", "needle,answer"]}


def run(cmd: list[str], out: Path, threads: int | None) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, all threads) of one whole process writing into ``out``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(cmd + ["--output-dir", str(out)], capture_output=True, text=True, env=env)
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return dt, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def results(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--question", default="inc_state")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs (default: torch's own choice)")
    ap.add_argument("--out", default="methods_cost", help="name of the files under bench/results/")
    args = ap.parse_args()

    machine, _ = C.setup(None)
    cmds = commands(args.question, args.tokens, args.samples)
    times: dict[str, list[float]] = {n: [] for n in cmds}
    cpu: dict[str, list[float]] = {n: [] for n in cmds}
    with tempfile.TemporaryDirectory() as tmp:
        run(commands(args.question, 256, 1)["one"], Path(tmp) / "warm", args.threads)
        got = {}
        for r in range(args.repeats):
            order = list(cmds) if r % 2 == 0 else list(reversed(cmds))
            for name in order:
                out = Path(tmp) / f"{name}{r}"
                wall, used = run(cmds[name], out, args.threads)
                times[name].append(wall)
                cpu[name].append(used)
                got[name] = results(out)
            print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.1f} s" for n in cmds),
                  flush=True)
    one = got["one"]
    (key,) = one
    a, b = one[key], got["all"][key]
    diff = max(abs(x - y) for ra, rb in zip(a["scores"], b["scores"]) for x, y in zip(ra, rb))
    top = [h["head"] for h in a["head_rankings"][:10]] == [h["head"] for h in b["head_rankings"][:10]]
    record = {"benchmark": "methods_cost", "question": args.question, "tokens": args.tokens,
              "samples": args.samples, "repeats": args.repeats, "goal_ratio": GOAL,
              "commands": {n: " ".join(["retrieval-heads"] + c[3:]) for n, c in cmds.items()},
              "seconds": {n: C.summary(t) for n, t in times.items()},
              "cpu_seconds": {n: C.summary(t) for n, t in cpu.items()},
              "ratio": C.paired_ratio(times["all"], times["one"]),
              "ratio_cpu": C.paired_ratio(cpu["all"], cpu["one"]), "threads": args.threads,
              "results_written": {n: sorted(g) for n, g in got.items()},
              "summed_attention_max_abs_diff": diff, "summed_attention_same_top10": top,
              "command": C.command_line(), "machine": machine}
    md = markdown(record)
    C.write_results(args.out, record, md)
    print(md)


def markdown(rec: dict) -> str:
    def t(n, what="seconds"):
        s = rec[what][n]
        return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"

    verdict = "within" if rec["ratio"] <= rec["goal_ratio"] else "over"
    return "\n".join([
        "# Four methods and two spans against one method, whole process (CPU)",
        "",
        f"`retrieval-heads detect` at {rec['tokens']} tokens, {rec['samples']} samples, question "
        f"`{rec['question']}`, each run a fresh process (imports, model load, prompts, passes, result files). "
        f"Median (min-max) wall seconds of {rec['repeats']} interleaved rounds (order reversed every other "
        "round) after a warm-up run; the ratio is the median of the per-round ratios.",
        "",
        f"Command: `{rec['command']}` (OMP_NUM_THREADS: {rec['threads'] or 'unset'})",
        "",
        *C.machine_lines(rec["machine"]),
        "",
        C.table(["run", "command", "results written", "wall s", "CPU s"],
                [[n, f"`{rec['commands'][n]}`", str(len(rec["results_written"][n])), t(n), t(n, "cpu_seconds")]
                 for n in rec["commands"]]),
        "",
        f"**Ratio all / one: {rec['ratio']:.2f}x** wall ({verdict} the goal of {rec['goal_ratio']}x), "
        f"{rec['ratio_cpu']:.2f}x CPU time. "
        f"summed_attention's scores in the two runs differ by at most {rec['summed_attention_max_abs_diff']:.1e} "
        "(the one-prefill path splits the pass at the question; results are rounded to 6 decimals); same top 10 "
        f"heads: {'yes' if rec['summed_attention_same_top10'] else 'NO'}.",
        "",
    ])


if __name__ == "__main__":
    main()
