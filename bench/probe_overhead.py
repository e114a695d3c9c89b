"""What the probe costs on top of one prefill, against the seed's path, on the embedded SmolLM2 (CPU).

    python bench/probe_overhead.py                                   # 1K, 2K, 4K, 8K; 3 rounds
    python bench/probe_overhead.py --lengths 1024 2048 --repeats 5 --threads 1

Paths, per sample (one prompt of N tokens, batch 1, float32):
  (a) the seed's path: eager attention, output_attentions=True, one .item() per head;
  (b) our probe: SummedAttention().score_batch (sdpa forward + exact last-row recomputation);
  (c) the floor: a bare sdpa prefill, use_cache=False, logits_to_keep=1.

Time: rounds a, b, c, a, b, c, ... after one warm-up of each path; median and spread per path.
Peak memory: each (path, length) is measured in its own fresh child process (model loaded, a short warm-up,
then the one call), as the kernel's high-water mark of the resident set (VmHWM, reset just before the call;
see _common.peak_rss). "peak" is the process's whole resident set at its highest (model included);
"extra" is that peak minus the resident set just before the call.
(a) is skipped where its N x N matrices would not fit in the memory available when the run starts.
Writes bench/results/probe_overhead.md and .json.
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

WARMUP_TOKENS = 256
MEMORY_FRACTION = 0.7  # of the RAM available at the start: the machine may be shared
PATH_NAMES = {
    "a": "(a) seed: eager + output_attentions + .item()",
    "b": "(b) probe: SummedAttention",
    "c": "(c) bare sdpa prefill",
}


def load(model_key: str):
    from transformers.utils import logging

    from retrieval_heads.models import load_model

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return load_model(model_key)


def prompt_of(lm, tokens: int):
    from retrieval_heads.data.prompt import PromptFormat
    from retrieval_heads.data.samples import synthetic_samples

    return synthetic_samples(PromptFormat(lm.tokenizer), ["inc_state"], tokens, 1, 0.5, 0)[0]["inc_state"]


def child(model_key: str, path: str, tokens: int) -> None:
    """One peak-memory measurement in this fresh process; prints one JSON line."""
    lm = load(model_key)
    C.make_paths(lm.model, prompt_of(lm, WARMUP_TOKENS), path)[path]()  # warm-up: lazy inits, small allocations
    fn = C.make_paths(lm.model, prompt_of(lm, tokens), path)[path]
    print(json.dumps(C.peak_rss(fn)))


def measure_memory(model_key: str, path: str, tokens: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", path, str(tokens), "--model", model_key]
    if threads:
        cmd += ["--threads", str(threads)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if run.returncode != 0:
        raise RuntimeError(f"memory child {path} at {tokens} failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def fmt_time(s: dict | None) -> str:
    return "skipped" if s is None else f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def fmt_ratio(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds per length")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--out", default="probe_overhead", help="name of the files under bench/results/")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.model, args.child[0], int(args.child[1]))

    import psutil

    machine = C.machine()
    lm = load(args.model)
    model = lm.model
    budget = MEMORY_FRACTION * psutil.virtual_memory().available
    for p in C.make_paths(model, prompt_of(lm, WARMUP_TOKENS)).values():  # warm-up, not timed
        p()

    rows = []
    for n in args.lengths:
        prompt = prompt_of(lm, n)
        need = C.seed_path_bytes(model, len(prompt.input_ids))
        which = "abc" if need <= budget else "bc"
        paths = C.make_paths(model, prompt, which)
        print(f"N={n}: paths {', '.join(which)}" + ("" if "a" in which else
              f" ((a) skipped: needs ~{need / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB allowed)"), flush=True)
        results: dict[str, object] = {}

        def keep(name, fn):
            def run():
                results[name] = fn()
            return run

        times = C.interleaved({k: keep(k, fn) for k, fn in paths.items()}, args.repeats,
                              on_round=lambda r: print(f"  round {r + 1}/{args.repeats} done", flush=True))
        row = {
            "tokens": n, "prompt_tokens": len(prompt.input_ids), "needle": [prompt.needle_start, prompt.needle_end],
            "seed_path_gib_estimate": round(need / 2**30, 2), "seed_path_run": "a" in which,
            "time_s": {k: C.summary(v["wall"]) for k, v in times.items()},
            "cpu_s": {k: C.summary(v["cpu"]) for k, v in times.items()},
        }
        t, cpu = row["time_s"], row["cpu_s"]
        row["b_over_c_time"] = t["b"]["median"] / t["c"]["median"]
        row["b_over_c_time_paired"] = C.paired_ratio(times["b"]["wall"], times["c"]["wall"])
        row["b_over_c_cpu"] = cpu["b"]["median"] / cpu["c"]["median"]
        if "a" in which:
            row["a_over_b_time"] = t["a"]["median"] / t["b"]["median"]
            row["a_over_b_time_paired"] = C.paired_ratio(times["a"]["wall"], times["b"]["wall"])
            row["a_over_b_cpu"] = cpu["a"]["median"] / cpu["b"]["median"]
            row["max_abs_diff_a_b"] = float((results["a"] - results["b"].cpu()).abs().max())
        if not args.no_memory:
            mem = {k: measure_memory(args.model, k, n, args.threads) for k in which}
            row["memory_mib"] = mem
            row["b_over_c_peak"] = mem["b"]["peak_mib"] / mem["c"]["peak_mib"]
            row["b_over_c_extra"] = mem["b"]["delta_mib"] / mem["c"]["delta_mib"]
            if "a" in which:
                row["a_over_b_peak"] = mem["a"]["peak_mib"] / mem["b"]["peak_mib"]
        rows.append(row)
        print("  " + json.dumps({k: v for k, v in row.items() if k not in ("time_s", "cpu_s")}), flush=True)

    record = {"benchmark": "probe_overhead", "model": lm.name, "dtype": "float32", "batch": 1,
              "repeats": args.repeats, "command": C.command_line(), "machine": machine, "rows": rows}
    md = markdown(record)
    C.write_results(args.out, record, md)
    print(md)


def markdown(rec: dict) -> str:
    rows = rec["rows"]
    mem = all("memory_mib" in r for r in rows)
    header = ["N", "(a) s", "(b) s", "(c) s", "b/c time", "b/c paired", "b/c CPU time", "a/b time", "a/b CPU time"]
    if mem:
        header += ["(a) peak MiB", "(b) peak MiB", "(c) peak MiB", "b/c peak", "(b) extra MiB", "(c) extra MiB",
                   "a/b peak"]
    body = []
    for r in rows:
        t, m = r["time_s"], r.get("memory_mib", {})
        cells = [str(r["prompt_tokens"]), fmt_time(t.get("a")), fmt_time(t["b"]), fmt_time(t["c"]),
                 fmt_ratio(r["b_over_c_time"]), fmt_ratio(r["b_over_c_time_paired"]), fmt_ratio(r["b_over_c_cpu"]),
                 fmt_ratio(r.get("a_over_b_time"), 2), fmt_ratio(r.get("a_over_b_cpu"), 2)]
        if mem:
            peak = lambda k: f"{m[k]['peak_mib']:.0f}" if k in m else "skipped"  # noqa: E731
            extra = lambda k: f"{m[k]['delta_mib']:.0f}"  # noqa: E731
            cells += [peak("a"), peak("b"), peak("c"), fmt_ratio(r["b_over_c_peak"]), extra("b"), extra("c"),
                      fmt_ratio(r.get("a_over_b_peak"), 1)]
        body.append(cells)

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    worst_time = max(r["b_over_c_time"] for r in rows)
    lines = [
        "# Probe overhead on the embedded model (CPU)",
        "",
        f"{rec['model']}, {rec['dtype']}, batch {rec['batch']}, one synthetic prompt per length "
        f"(needle in the middle). Seconds per sample: median (min-max) of {rec['repeats']} interleaved rounds "
        "(a, b, c, a, b, c, ...) after one warm-up of each path.",
        "",
        "Machine (the load average below tells how busy it was; absolute times vary between runs, the ratios "
        "compare adjacent runs):",
        "",
        *C.machine_lines(rec["machine"]),
        "",
        C.table(header, body),
        "",
        "- (a) the seed's path: eager attention, `output_attentions=True`, one `.item()` per head; "
        "(b) our probe, `SummedAttention().score_batch`; (c) a bare sdpa prefill, `use_cache=False`, "
        "`logits_to_keep=1`: the floor.",
        "- b/c time is the ratio of the median wall times; b/c paired is the median over rounds of b/c within one "
        "round; CPU time is the process's (all threads), which other users' jobs inflate far less than wall time.",
    ]
    if mem:
        lines.append("- Peak memory: each (path, length) in a fresh child process; peak = the process's highest "
                     "resident set during the call (model included, VmHWM reset just before it); extra = peak minus "
                     "the resident set just before the call.")
    skipped = [r for r in rows if not r["seed_path_run"]]
    if skipped:
        lines.append("- (a) skipped at " + ", ".join(f"{r['tokens']} (needs ~{r['seed_path_gib_estimate']} GiB for "
                     "its N x N matrices)" for r in skipped) + f": more than {int(MEMORY_FRACTION * 100)}% of the "
                     "memory available at the start.")
    diffs = [r["max_abs_diff_a_b"] for r in rows if "max_abs_diff_a_b" in r]
    if diffs:
        lines.append(f"- Where (a) ran, (a) and (b) scores agree within {max(diffs):.1e} (max abs difference).")
    lines += ["", "Targets:", "",
              f"- b/c <= 1.05 in time at every length: {verdict(worst_time <= 1.05)} (worst {worst_time:.3f})"]
    if mem:
        worst_peak = max(r["b_over_c_peak"] for r in rows)
        lines.append(f"- b/c <= 1.10 in peak memory at every length: {verdict(worst_peak <= 1.10)} "
                     f"(worst {worst_peak:.3f})")
    at2k = [r for r in rows if r["tokens"] == 2048 and "a_over_b_time" in r]
    if at2k:
        lines.append(f"- a/b >= 3 at 2K: {verdict(at2k[0]['a_over_b_time'] >= 3)} in time "
                     f"({at2k[0]['a_over_b_time']:.2f})" + (f", {at2k[0]['a_over_b_peak']:.1f}x in peak memory"
                                                            if mem else ""))
    if any(r["tokens"] == 8192 for r in rows):
        lines.append("- 8K runs: met")
    lines += ["", f"Command: `{rec['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
