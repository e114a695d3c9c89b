"""What an ablation curve costs: the shared path against one condition at a time, side by side (CPU).

    nice -n 10 env OMP_NUM_THREADS=1 python bench/ablation_cost.py --threads 1     # SmolLM2, 256 tokens

The curve: the heads of a summed_attention result on the answer span, ranked by lift (``detect`` on the
same samples), removed top-k for each k, with ``--draws`` layer-matched and unmatched random draws per k
(about 30 distinct head sets). Paths, in one process, each after a warm-up on a short prompt:

- **shared** (``--batch-size 8``, the default): the layers below a batch's lowest removed head computed once
  per sample, one prefill per row for the answer and both log-probs, conditions of a sample batched;
- **sequential** (``--batch-size 1``, the reference): one condition and one sample at a time, every measure
  from its own passes;
- **conditions x one forward**: the time of one plain forward pass over a prompt (the median of 5), times
  the rows of the curve (head sets x samples): what a curve costs if every row needed one bare pass and
  nothing else (no decoding, no log-prob passes).

Peak memory: the process's highest resident set during each path (``/proc/self/clear_refs`` reset before
it), against the sequential path's (one condition at a time). Both paths must give the same answers and
log-probs; the bench checks and reports it. Writes bench/results/ablation_cost.md and .json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def curve(lm, args, tokens: int, samples: int):
    """(record of the heads, prompts): a summed_attention result on the answer span, ranked by lift."""
    from retrieval_heads import detect
    from retrieval_heads.experiments import build_prompts

    rec = detect(lm, question=args.question, tokens=tokens, samples=samples, span="answer", rank_by="lift").record
    prompts = [g[args.question] for g in build_prompts(lm, [args.question], tokens, samples, 0.5, 0)]
    return rec, prompts


def run(lm, args, rec, prompts, batch_size: int, ks=None, draws=None) -> dict:
    from retrieval_heads.ablation import run_ablation

    return run_ablation(lm, rec, prompts, args.ks if ks is None else ks, args.draws if draws is None else draws,
                        args.max_new_tokens, batch_size)


def conditions(report: dict) -> list[dict]:
    return report["top"] + report["matched"] + report["random"]


def compare(ref: dict, got: dict) -> dict:
    same, diff = True, 0.0
    for a, b in zip(conditions(ref), conditions(got), strict=True):
        same &= a["heads"] == b["heads"] and [s["generated"] for s in a["samples"]] == \
            [s["generated"] for s in b["samples"]]
        for x, y in zip(a["samples"], b["samples"]):
            diff = max(diff, abs(x["logprob"] - y["logprob"]), abs(x["leadin_logprob"] - y["leadin_logprob"]))
    return {"answers_identical": same, "max_abs_logprob_diff": diff}


def one_forward(lm, prompt, repeats: int = 5) -> float:
    import torch

    ids = torch.tensor([prompt.input_ids])
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def lowest_layers(report: dict) -> list[int]:
    from retrieval_heads.results import parse_head

    return sorted({min(parse_head(h)[0] for h in c["heads"]) for c in conditions(report) if c["heads"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--question", default="inc_state")
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 5, 10, 20])
    ap.add_argument("--draws", type=int, default=4, help="draws per k of each control")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="ablation_cost", help="name of the files under bench/results/")
    ap.add_argument("--render", action="store_true", help="only write the .md again from the .json")
    args = ap.parse_args()
    if args.render:
        import json

        record = json.loads((C.RESULTS / f"{args.out}.json").read_text())
        C.write_results(args.out, record, markdown(record))
        return

    machine, lm = C.setup(args.threads, args.model)
    warm = curve(lm, args, 200, 1)
    for b in (1, args.batch_size):
        run(lm, args, *warm, b, ks=[0, 5], draws=1)  # warm-up of both paths on a short prompt
    rec, prompts = curve(lm, args, args.tokens, args.samples)
    reports: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    memory: dict[str, dict] = {}
    for name, b in (("shared", args.batch_size), ("sequential", 1)):
        def fn(b=b, name=name):
            t = time.perf_counter()
            reports[name] = run(lm, args, rec, prompts, b)
            seconds[name] = time.perf_counter() - t
        memory[name] = C.peak_rss(fn)
        print(f"{name}: {seconds[name]:.1f} s, peak {memory[name]['peak_mib']:.0f} MiB", flush=True)
    fwd = one_forward(lm, prompts[0])
    ref = reports["sequential"]
    sets = len({tuple(c["heads"]) for c in conditions(ref)} | {()})
    rows = sets * len(prompts)
    record = {
        "benchmark": "ablation_cost", "model": lm.name, "dtype": "float32", "tokens": args.tokens,
        "prompt_tokens": sorted({len(p.input_ids) for p in prompts}), "samples": len(prompts),
        "question": args.question, "ks": args.ks, "draws": args.draws, "controls": ref["controls"],
        "conditions": len(conditions(ref)), "distinct_head_sets": sets, "rows": rows,
        "num_layers": lm.num_layers, "lowest_removed_layers": lowest_layers(ref),
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "seconds": seconds, "one_forward_seconds": fwd, "rows_x_one_forward_seconds": fwd * rows,
        "memory": memory, **compare(ref, reports["shared"]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "command": command(), "machine": machine,
    }
    md = markdown(record)
    C.write_results(args.out, record, md)
    print(md)


def command() -> str:
    omp = os.environ.get("OMP_NUM_THREADS")
    prefix = (f"nice -n {os.nice(0)} " if os.nice(0) else "") + (f"env OMP_NUM_THREADS={omp} " if omp else "")
    return prefix + C.command_line()


def markdown(rec: dict) -> str:
    s, m = rec["seconds"], rec["memory"]
    seq, fast, bare = s["sequential"], s["shared"], rec["rows_x_one_forward_seconds"]
    body = [
        ["shared (`--batch-size %d`, default)" % rec["batch_size"], f"{fast:.1f}", f"**{fast / seq:.2f}**",
         f"{fast / bare:.2f}", f"{m['shared']['peak_mib']:.0f} ({m['shared']['delta_mib']:+.0f})",
         f"{m['shared']['peak_mib'] / m['sequential']['peak_mib']:.2f}"],
        ["sequential (`--batch-size 1`, one condition at a time)", f"{seq:.1f}", "1.00", f"{seq / bare:.2f}",
         f"{m['sequential']['peak_mib']:.0f} ({m['sequential']['delta_mib']:+.0f})", "1.00"],
        [f"rows x one forward pass ({rec['rows']} x {rec['one_forward_seconds']:.3f} s)", f"{bare:.1f}",
         f"{bare / seq:.2f}", "1.00", "not measured", "-"],
    ]
    low = rec["lowest_removed_layers"]
    return "\n".join([
        "# Ablation cost: the shared path against one condition at a time (CPU)",
        "",
        f"{rec['model']}, {rec['dtype']}, `--tokens {rec['tokens']}` ({'/'.join(map(str, rec['prompt_tokens']))} "
        f"prompt tokens), question {rec['question']}, {rec['samples']} samples. The curve: k in "
        f"{' '.join(map(str, rec['ks']))}, {rec['draws']} draws per k of each control ({', '.join(rec['controls'])}): "
        f"{rec['conditions']} conditions, {rec['distinct_head_sets']} distinct head sets with the unablated one, "
        f"so {rec['rows']} rows (head set x sample), each a greedy answer (at most {rec['max_new_tokens']} tokens), "
        "a gold log-prob and a lead-in log-prob. Heads: a summed_attention result on the answer span of the same "
        f"samples, ranked by lift. Lowest removed layer per head set: {min(low) if low else '-'} to "
        f"{max(low) if low else '-'} of {rec['num_layers']} (a batch runs from the lowest of its rows).",
        "",
        "One run, one process; each path once, after a warm-up of both on a short prompt. Ratios: below 1 is "
        "faster or smaller. Peak memory: the process's highest resident set during the path (model included), "
        "rise = above the resident set just before it.",
        "",
        "Machine: a 2-core CPU shared with other work during the run, hence `nice` and one torch thread; "
        "absolute times are noisy.",
        "",
        *C.machine_lines(rec["machine"]),
        "",
        C.table(["path", "s per curve", "time / sequential", "time / (rows x one forward)",
                 "peak memory, MiB (rise)", "peak / sequential"], body),
        "",
        f"- Same answers as the sequential path: {'yes' if rec['answers_identical'] else '**no**'}; largest "
        f"log-prob difference (gold and lead-in, as rounded in the JSON): {rec['max_abs_logprob_diff']:.1e}.",
        "- Peak memory: the sequential path runs second, in the same process; its rise is measured above the "
        "resident set the shared path left (memory the allocator keeps), so where that rise is about 0 its own "
        "peak may be lower than shown, and the shared path's ratio to it higher: read the ratio as a lower bound.",
        "- Rows x one forward pass counts one bare prefill per row and nothing else; the paths also decode up to "
        f"{rec['max_new_tokens']} tokens per row and teacher-force the gold answer twice (after the prompt and "
        "after the lead-in).",
        "",
        f"Command: `{rec['command']}`",
        "",
    ])


if __name__ == "__main__":
    main()
