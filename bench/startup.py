"""Where the start of ``retrieval-heads detect`` goes: imports, the model's load from the converted
safetensors, the tokenizer; against the bare read of the weights, and the whole process.

    nice -n 10 env OMP_NUM_THREADS=1 python bench/startup.py --repeats 3

Per round, each in a fresh interpreter (so every import is paid, as a user's command pays it):

- ``stages``: the steps of ``load_model("smollm2")`` one by one, in its order (the same calls), after
  ``import torch``, ``import transformers`` (with the three Auto classes) and ``import retrieval_heads.experiments``
  (every module ``detect`` needs): resolve the key, the hub check, the config, the model (transformers'
  ``from_pretrained``: the Llama module's import, the model's construction and the weights' read), the
  tokenizer, the check that every weight was loaded, ``.to(device)`` and ``eval``, the weights' identity
  (their SHA-256, cached by size and mtime after the first run);
- ``read``: ``import torch, safetensors``, ``safetensors.torch.load_file`` of the same file (memory-mapped),
  then a copy of every tensor: the weights' read alone (from the page cache, as in every run after the first);
- whole processes: ``retrieval-heads --help``, ``report`` on a one-result folder and ``detect --tokens 256
  --samples 1`` (into a temp folder), with this tree's code and, when ``--before`` names another ``src``
  folder (an older commit's: ``git archive COMMIT src | tar -x -C OLD``), with that one, side by side.

Rounds interleave the measurements (stages, read, help, ..., stages, read, ...), so a slow spell of a shared
machine hits them alike; the table gives the median and the range over rounds.
Writes bench/results/startup.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def stages() -> dict:
    """The load path of ``detect``, step by step (seconds each); mirrors ``models.load_model``."""
    out = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        out[name] = now - t
        t = now

    import torch

    lap("import torch")
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    lap("import transformers")
    import retrieval_heads.experiments  # noqa: F401
    from retrieval_heads import models as M

    lap("import retrieval_heads")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    key, name, path = M.resolve("smollm2")
    M.check_device("cpu")
    lap("resolve the key")
    hub, _ = M.hub_access(path)
    lap("hub check")
    config = AutoConfig.from_pretrained(path, **hub)
    M.check_causal_lm("smollm2", config)
    lap("config")
    m, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32,
                                                   use_safetensors=True, **hub)
    lap("model (from_pretrained)")
    tok = AutoTokenizer.from_pretrained(path, **hub)
    lap("tokenizer")
    M.check_weights_complete("smollm2", info)
    m = m.to("cpu")
    m.eval()
    lap("checks, to(device), eval")
    M.model_identity("smollm2", config)
    lap("weights identity (cached SHA-256)")
    del tok
    return out


def read() -> dict:
    t0 = time.perf_counter()
    import safetensors.torch
    import torch  # noqa: F401

    from retrieval_heads.models import smollm2_path

    t1 = time.perf_counter()
    tensors = safetensors.torch.load_file(str(smollm2_path() / "model.safetensors"))
    t2 = time.perf_counter()
    copies = [t.clone() for t in tensors.values()]  # every byte read from the (page-cached) file
    t3 = time.perf_counter()
    size = sum(t.numel() * t.element_size() for t in copies)
    return {"imports": t1 - t0, "read": t2 - t1, "copy": t3 - t2, "bytes": size}


def whole(cmd: list[str], src: Path, cwd: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "retrieval_heads", *cmd], capture_output=True, text=True,
                         env=env, cwd=cwd)
    took = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {run.stderr.strip()[-500:]}")
    return took


def child(what: str) -> None:
    print(json.dumps(stages() if what == "stages" else read()))


def run_child(what: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, __file__, "--child", what], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{what} child failed: {run.stderr.strip()[-1000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def one_result_folder(folder: Path) -> Path:
    """A results folder holding one small result with its samples (for ``report``)."""
    import torch

    from retrieval_heads.data.prompt import PromptSample
    from retrieval_heads.experiments import write_result
    from retrieval_heads.results import make_record

    g = torch.Generator().manual_seed(0)
    per_sample = torch.rand(4, 30, 9, generator=g)  # (S, L, H): SmolLM2's grid
    record = make_record(method="summed_attention", model_key="smollm2", model_name="m", question="inc_state",
                         question_prompt="q", total_tokens=256, needle_position=0.5, scores=per_sample.sum(0),
                         samples_processed=4, seed=0, dtype="float32")
    prompts = [PromptSample([1, 2, 3], 0, 1, 2, "q", "a") for _ in range(4)]
    write_result(folder, record, prompts, per_sample, save_samples=True)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", type=Path, help="another commit's src folder, run side by side")
    ap.add_argument("--out", default="startup", help="name of the files under bench/results/")
    ap.add_argument("--child", choices=["stages", "read"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)

    machine = C.machine()
    here = ROOT / "src"
    runs: dict[str, list] = {"stages": [], "read": [], "help": [], "help_before": [], "report": [], "report_before": [],
                             "detect": [], "detect_before": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = one_result_folder(tmp / "results")
        for r in range(args.repeats):
            runs["stages"].append(run_child("stages"))
            runs["read"].append(run_child("read"))
            runs["help"].append(whole(["--help"], here, tmp))
            if args.before:
                runs["help_before"].append(whole(["--help"], args.before.resolve(), tmp))
            for key, src in (("", here), ("_before", args.before)):
                if src is None:
                    continue
                runs["report" + key].append(whole(["report", str(results), "--out", str(tmp / f"report{r}{key}"),
                                                   "--resamples", "100"], src.resolve(), tmp))
                runs["detect" + key].append(whole(["detect", "--tokens", "256", "--samples", "1", "--output-dir",
                                                   str(tmp / f"out{r}{key}")], src.resolve(), tmp))
            print(f"round {r + 1}/{args.repeats} done", flush=True)
    record = {"benchmark": "startup", "repeats": args.repeats, "command": C.command_line(), "machine": machine,
              "before": str(args.before) if args.before else None, "runs": runs}
    md = markdown(record)
    C.write_results(args.out, record, md)
    print(md)


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def markdown(rec: dict) -> str:
    runs = rec["runs"]
    names = list(runs["stages"][0])
    out = ["# Start-up of `retrieval-heads detect` (CPU, SmolLM2-135M from its converted safetensors)", "",
           f"Command: `{rec['command']}`", ""]
    out += C.machine_lines(rec["machine"])
    total = [sum(s.values()) for s in runs["stages"]]
    out += ["", f"{rec['repeats']} rounds, each step in a fresh interpreter; median (min-max) seconds.", "",
            "## The load path, step by step", ""]
    rows = [[n, _med([s[n] for s in runs["stages"]]),
             f"{statistics.median(s[n] / t for s, t in zip(runs['stages'], total)):.0%}"] for n in names]
    rows.append(["**total**", _med(total), "100%"])
    out += [C.table(["step", "s", "share"], rows), ""]
    rd = runs["read"]
    gib = rd[0]["bytes"] / 2**30
    out += ["## The floor: the weights' read alone", "",
            C.table(["step", "s"], [["import torch, safetensors", _med([x["imports"] for x in rd])],
                                    [f"safetensors load_file ({gib:.2f} GiB, mapped)", _med([x["read"] for x in rd])],
                                    ["a copy of every tensor (each byte read)", _med([x["copy"] for x in rd])]]), "",
            "## Whole processes", ""]
    commands = [("help", "`retrieval-heads --help`"),
                ("report", "`retrieval-heads report` (one result, 100 resamples)"),
                ("detect", "`retrieval-heads detect --tokens 256 --samples 1`")]
    if runs.get("help_before"):
        def ratio(k: str) -> str:
            return f"{statistics.median(a / b for a, b in zip(runs[k], runs[k + '_before'])):.2f}"

        rows = [[text, _med(runs[k]), _med(runs[k + "_before"]), ratio(k)] for k, text in commands]
        out += [f"This tree's code against the code in `{rec['before']}` (same interpreter and packages), the two "
                "run one after the other in each round; the ratio is the median of the rounds' ratios.", "",
                C.table(["command", "s", "s, before", "ratio"], rows), ""]
    else:
        out += [C.table(["command", "s"], [[text, _med(runs[k])] for k, text in commands]), ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
