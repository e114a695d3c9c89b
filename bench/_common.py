"""What the bench scripts share: the machine's description, interleaved timing, peak memory, result files.

Timing: every path runs once per round, rounds repeat (a, b, c, a, b, c, ...), so a slow spell of a shared
machine hits all paths alike; we report the median and the spread (min, max) of each path, and the ratios
of medians together with the median of the per-round ratios. Wall time is what the issue's targets are on;
the process's CPU time is recorded beside it as a check that a busy machine inflates far less.

Peak memory on the CPU: ``peak_rss(fn)`` resets the kernel's high-water mark of this process's resident set
(``/proc/self/clear_refs`` <- "5", Linux >= 4.0), reads VmRSS just before ``fn`` and VmHWM just after it.
The kernel tracks VmHWM on every page fault, so no short peak is missed (a sampling thread could miss one).
The bench scripts run it in a fresh child process per measurement (model loaded, a short warm-up, then the
one measured call), so memory the allocator kept from an earlier, larger call cannot hide a peak.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

# the slow references the tests hold the library to (tests/reference.py) are measured here too
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU model, cores, RAM, accelerator and library versions, and the load when the run started."""
    import psutil
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "ram_available_gib": round(psutil.virtual_memory().available / 2**30, 1),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def setup(threads: int | None, model: str | None = None):
    """The start every CPU bench shares: torch threads, quiet transformers, the machine described (after the
    threads are set), and the model loaded (when ``model`` is given). Returns (machine, LoadedModel or None)."""
    import torch
    from transformers.utils import logging

    if threads:
        torch.set_num_threads(threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    info = machine()
    if model is None:
        return info, None
    from retrieval_heads.models import load_model

    return info, load_model(model)


def machine_lines(m: dict) -> list[str]:
    """The machine as Markdown bullet lines."""
    lines = [
        f"- CPU: {m['cpu']}, {m['cores_logical']} logical cores ({m['cores_physical']} physical), "
        f"torch threads {m['torch_threads']}; RAM {m['ram_gib']} GiB ({m['ram_available_gib']} GiB available at start)",
    ]
    if "gpu" in m:
        lines.append(f"- GPU: {m['gpu']} ({m['gpu_memory_gib']} GiB), CUDA {m['cuda']}")
    lines.append(f"- {m['os']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}")
    lines.append(f"- run on {m['date']}; 1-minute load average at start {m['load_average_1m']}")
    return lines


def interleaved(paths: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None,
                on_round: Callable[[int], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Seconds of each path over ``repeats`` rounds, each round running every path once in order:
    {path: {"wall": [...], "cpu": [...]}}. "cpu" is this process's CPU time (all its threads), which a busy
    machine inflates far less than wall time."""
    times = {name: {"wall": [], "cpu": []} for name in paths}
    for r in range(repeats):
        for name, fn in paths.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
        if on_round is not None:
            on_round(r)
    return times


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": list(xs)}


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i]: robust to the machine's load drifting between rounds."""
    return statistics.median(n / d for n, d in zip(num, den))


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def peak_rss(fn: Callable[[], object]) -> dict:
    """Run ``fn`` once; return the resident set before it, the peak during it and the difference, in MiB."""
    if not Path("/proc/self/clear_refs").exists():
        raise RuntimeError("peak memory needs Linux's /proc/self/clear_refs")
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return {"rss_before_mib": before / 1024, "peak_mib": peak / 1024, "delta_mib": (peak - before) / 1024}


def write_results(name: str, record: dict, markdown: str) -> tuple[Path, Path]:
    """bench/results/{name}.json and .md, written atomically."""
    from retrieval_heads.io import atomic_write_json, atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    js, md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    atomic_write_json(js, record)
    atomic_write_text(md, markdown)
    return js, md


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def make_paths(model, prompt, which: str = "abc") -> dict[str, Callable[[], object]]:
    """The three measured paths on one prompt (a PromptSample), each returning (L, H) scores or None.

    (a) the seed's path: eager attention, ``output_attentions=True``, one ``.item()`` per head;
    (b) our probe: ``SummedAttention().score_batch`` (sdpa forward + the exact last-row recomputation);
    (c) the floor: a bare sdpa prefill, ``use_cache=False``, ``logits_to_keep=1``.
    """
    import torch

    from reference import eager_head_scores
    from retrieval_heads.methods.summed_attention import SummedAttention
    from retrieval_heads.models import input_device

    device = input_device(model)
    ids = torch.tensor([prompt.input_ids], device=device)  # (1, N)
    cfg = model.config.get_text_config()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    method = SummedAttention()

    def a():
        s = eager_head_scores(model, ids, prompt.needle_start, prompt.needle_end)
        return torch.tensor([[s[f"L{layer}H{head}"] for head in range(H)] for layer in range(L)])  # (L, H)

    def b():
        return method.score_batch(model, [prompt])[0]  # (L, H)

    @torch.no_grad()
    def c():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)

    return {k: fn for k, fn in {"a": a, "b": b, "c": c}.items() if k in which}


def seed_path_bytes(model, n: int, batch: int = 1) -> int:
    """Memory the seed's path needs on top of the model and the prefill: every layer's (B, H, N, N) attention
    kept for ``output_attentions`` (in the model's dtype), plus one layer's logits and probabilities in flight."""
    cfg = model.config.get_text_config()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    size = next(model.parameters()).element_size()
    return (L + 2) * batch * H * n * n * size
