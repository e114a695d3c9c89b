"""What `retrieval-heads report` costs on many results: this tree's code against the code before it, side by side.

N results of one model and question at N distinct lengths (random score grids of SmolLM2's 30 x 9 heads, seed
0, written as real result files: ``report_pairs.write_results``), reported by the whole command in a fresh
process per run (``python -m retrieval_heads report DIR --resamples R``), wall time and the child's CPU time.
With ``--before SRC`` (a ``src`` folder of the earlier code), that code reports the same folder in the same
rounds (interleaved: this tree, before, this tree, ...), at the sizes up to ``--before-up-to`` (the earlier
code took over 10 minutes at 530), and the two reports are compared: every experiment's heatmap PNG byte for
byte, and report.md line for line (they differ only where the pairs and the grid are bounded: see Notes).

    git archive e825332 src | tar -x -C /tmp/report_before
    nice -n 10 env OMP_NUM_THREADS=1 python bench/report_cost.py --sizes 50 100 530 --before /tmp/report_before/src
"""

from __future__ import annotations

import argparse
import difflib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import command_line, machine, machine_lines, table, write_results
from report_pairs import write_results as write_result_files

SRC = Path(__file__).resolve().parents[1] / "src"


def run_report(src: Path, root: Path, out: Path, resamples: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "retrieval_heads", "report", str(root), "--out", str(out),
                           "--resamples", str(resamples)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"report with {src} failed: {proc.stderr.strip()}")
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def compare(a: Path, b: Path) -> dict:
    """Heatmap PNGs equal byte for byte, and the report.md lines that differ."""
    pngs = sorted(p.relative_to(a) for p in (a / "figures" / "summed_attention").glob("*.png"))
    same = sum((a / p).read_bytes() == (b / p).read_bytes() for p in pngs if (b / p).exists())
    diff = [line for line in difflib.unified_diff((b / "report.md").read_text().splitlines(),
                                                  (a / "report.md").read_text().splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return {"heatmaps": len(pngs), "heatmaps_identical": same, "md_lines_changed": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 530])
    ap.add_argument("--before", type=Path, help="src folder of the earlier code, timed beside this tree's")
    ap.add_argument("--before-up-to", type=int, default=100, help="largest size the earlier code is run at")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--resamples", type=int, default=10)
    ap.add_argument("--out", default="report_cost")
    args = ap.parse_args()
    m = machine()
    rows, record = [], {"machine": m, "command": command_line(), "sizes": {}}
    for n in args.sizes:
        work = Path(tempfile.mkdtemp(prefix="report_cost_"))
        root = work / "results"
        write_result_files(root, n)
        paths = {"this tree": SRC}
        if args.before is not None and n <= args.before_up_to:
            paths["before"] = args.before.resolve()
        times: dict[str, list[dict]] = {k: [] for k in paths}
        for r in range(args.repeats):
            for name, src in paths.items():
                times[name].append(run_report(src, root, work / f"{name.replace(' ', '_')}_{r}", args.resamples))
                print(f"{n} results, {name}: {times[name][-1]['wall']:.1f} s wall, {times[name][-1]['cpu']:.1f} s CPU",
                      flush=True)
        entry = {k: {"wall": [t["wall"] for t in v], "cpu": [t["cpu"] for t in v]} for k, v in times.items()}
        new = statistics.median(entry["this tree"]["wall"])
        new_cpu = statistics.median(entry["this tree"]["cpu"])
        if "before" in entry:
            old = statistics.median(entry["before"]["wall"])
            old_cpu = statistics.median(entry["before"]["cpu"])
            entry["ratio_wall"] = old / new
            entry["ratio_cpu"] = old_cpu / new_cpu
            entry["compare"] = compare(work / "this_tree_0", work / "before_0")
            c = entry["compare"]
            print(f"{n} results: before/this tree {entry['ratio_wall']:.1f}x wall, {entry['ratio_cpu']:.1f}x CPU; "
                  f"heatmaps identical {c['heatmaps_identical']}/{c['heatmaps']}; report.md lines changed "
                  f"{len(c['md_lines_changed'])}", flush=True)
            rows.append([str(n), f"{new:.1f} ({new_cpu:.1f})", f"{old:.1f} ({old_cpu:.1f})",
                         f"{entry['ratio_wall']:.1f}x ({entry['ratio_cpu']:.1f}x)",
                         f"{c['heatmaps_identical']}/{c['heatmaps']}", str(len(c["md_lines_changed"]))])
        else:
            rows.append([str(n), f"{new:.1f} ({new_cpu:.1f})", "not run", "—", "—", "—"])
        record["sizes"][str(n)] = entry
    md = ["# `retrieval-heads report` on many results", "",
          "N results of one model and question at N distinct lengths (30 x 9 heads, random scores, seed 0); the "
          "whole command in a fresh process, `--resamples " f"{args.resamples}`; median of {args.repeats} "
          "interleaved run(s). Seconds, wall (CPU of the process). \"Before\": the code before the report's "
          "heatmaps were drawn from one figure per head grid and its consistency pairs and grid were bounded.", "",
          table(["Results", "This tree, s", "Before, s", "Before / this tree", "Heatmap PNGs identical",
                 "report.md lines changed"], rows), "",
          "report.md changes only where a bound applies: the notes naming the bounded consistency pairs and the "
          "grid's shown lengths, the consistency paragraph, the grid's caption and the per-dimension pair count "
          "and means.", "", f"Command: `{record['command']}`", "", *machine_lines(m), ""]
    changed = [(n, line) for n, entry in record["sizes"].items()
               for line in entry.get("compare", {}).get("md_lines_changed", [])[:12]]
    if changed:
        md += ["The lines of report.md that differ (`-` before, `+` this tree; cut at 160 characters):", ""]
        md += [f"    {n}: {line[:160]}" for n, line in changed]
    js, mdp = write_results(args.out, record, "\n".join(md) + "\n")
    print(f"wrote {mdp} and {js}")


if __name__ == "__main__":
    main()
