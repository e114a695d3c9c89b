"""Where the project and its peers' code differ, measured on the embedded model (CPU).

    python bench/peers.py                                   # 256 and 512 tokens, 8 samples, four questions
    python bench/peers.py --tokens 256 --samples 4 --threads 1

Three differences, each measured side by side in one run on the library's synthetic samples (seed 0, needle
at depth 0.5):

1. **The gold span of ``retrieval_score``** (Wu et al. take the needle, which *is* the answer; here the
   needle is a Section 1 stating several facts). The project counts copies from the asked fact's tokens
   (``data.spans.prompt_answer_span``, the span ``summed_attention+answer`` reads); before, it took the
   answer's first whole-word mention in the needle. Counted: the samples where the two spans differ (the
   answer is stated twice, e.g. the same state as headquarters and as state of incorporation). Tokenizer
   only.
2. **QRHead's query** ends at "assistant"; ``qrhead`` also reads the "\\n" row after it, ``qrhead_exact``
   does not. Both are scored from one shared pass per sample (``onepass.score_groups``); reported: the
   Spearman correlation of their summed scores over all heads, the largest difference of a summed score and
   of a per-sample score, and how many of the top 10 heads they share.
3. **The answer length**: Wu et al. decode up to 50 tokens, the project stops at 12
   (``DEFAULT_MAX_NEW_TOKENS``). Every prompt is decoded once with 50 tokens; a greedy answer's first 12
   tokens are exactly what a 12-token decode gives, so the answers correct within 12 tokens and those correct
   only between tokens 13 and 50 are counted from the one decode.

The results go to bench/results/peers.md and .json (``--out`` names another pair).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

QUESTIONS = ["inc_state", "inc_year", "employee_count", "hq_state"]


def spearman(a, b) -> float:
    import numpy as np
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a).ravel(), np.asarray(b).ravel()).statistic)


def gold_spans(tok, groups) -> dict:
    """Per question: samples whose asked-fact span differs from the answer's first mention in the needle."""
    from retrieval_heads.data.spans import answer_span, prompt_answer_span

    out = {}
    for q in QUESTIONS:
        differ = []
        for i, g in enumerate(groups):
            p = g[q]
            first = answer_span(tok, p.input_ids[p.needle_start : p.needle_end], p.answer)
            first = None if first is None else (p.needle_start + first[0], p.needle_start + first[1])
            if first != prompt_answer_span(tok, p):
                differ.append(i)
        out[q] = {"samples": len(groups), "differ": differ}
    return out


def qrhead_pair(lm, groups) -> dict:
    """qrhead vs qrhead_exact from one shared pass per sample, per question."""
    from retrieval_heads.onepass import score_groups

    got = score_groups(lm, groups, QUESTIONS, ["qrhead", "qrhead_exact"])
    out = {}
    for q in QUESTIONS:
        a, b = got[q].scores["qrhead"].cpu(), got[q].scores["qrhead_exact"].cpu()  # (S, L, H)
        sa, sb = a.sum(0).flatten(), b.sum(0).flatten()
        top_a, top_b = set(sa.argsort(descending=True)[:10].tolist()), set(sb.argsort(descending=True)[:10].tolist())
        out[q] = {"spearman": round(spearman(sa, sb), 5), "max_sum_diff": round(float((sa - sb).abs().max()), 5),
                  "max_sample_diff": round(float((a - b).abs().max()), 5),
                  "max_sum": round(float(sa.abs().max()), 5), "top10_shared": len(top_a & top_b)}
    return out


def answer_lengths(lm, groups, short: int, long: int) -> dict:
    """Per question: answers correct within ``short`` tokens, and correct only with up to ``long``."""
    from retrieval_heads.data.questions import answer_matches
    from retrieval_heads.generation import answer_prompts

    out = {}
    for q in QUESTIONS:
        prompts = [g[q] for g in groups]
        answers = answer_prompts(lm, prompts, long)
        within = [answer_matches(lm.tokenizer.decode(a.ids[:short], skip_special_tokens=True).strip(), p.answer)
                  for a, p in zip(answers, prompts)]
        only_long = [i for i, (a, w) in enumerate(zip(answers, within)) if a.correct and not w]
        out[q] = {"samples": len(prompts), f"correct_{short}": sum(within),
                  f"correct_{long}": sum(a.correct for a in answers), "only_after": only_long,
                  "longer_than_short": sum(len(a.ids) > short for a in answers),
                  "examples": [answers[i].text[:80] for i in only_long[:3]]}
    return out


def markdown(record: dict) -> str:
    short, long = record["max_new_tokens"]
    lines = ["# The project against its peers' code", "", f"`{record['command']}`", "", *C.machine_lines(record["machine"]),
             "", f"SmolLM2-135M-Instruct, synthetic samples (seed 0, depth 0.5), {record['samples']} per length.", ""]
    lines += ["## 1. retrieval_score's gold span: the asked fact vs the answer's first mention", "",
              "Samples whose two spans differ (the answer stated twice in the needle, the other mention first):", ""]
    rows = [[str(t), q, f"{len(c['differ'])}/{c['samples']}", ", ".join(map(str, c["differ"])) or "—"]
            for t, cell in record["gold_spans"].items() for q, c in cell.items()]
    lines += [C.table(["tokens", "question", "differ", "which samples"], rows), ""]
    lines += ["## 2. qrhead (query to the last token) vs qrhead_exact (query ends at \"assistant\")", ""]
    rows = [[str(t), q, f"{c['spearman']:.4f}", f"{c['max_sum_diff']:.4f}", f"{c['max_sum']:.4f}",
             f"{c['max_sample_diff']:.4f}", f"{c['top10_shared']}/10"]
            for t, cell in record["qrhead"].items() for q, c in cell.items()]
    lines += [C.table(["tokens", "question", "Spearman (summed)", "largest summed diff", "largest summed score",
                       "largest per-sample diff", "top 10 shared"], rows), ""]
    lines += [f"## 3. Answers decoded up to {long} tokens: correct within {short}, or only after", ""]
    rows = [[str(t), q, f"{c[f'correct_{short}']}/{c['samples']}", f"{c[f'correct_{long}']}/{c['samples']}",
             str(len(c["only_after"])), str(c["longer_than_short"]), "; ".join(repr(x) for x in c["examples"]) or "—"]
            for t, cell in record["answers"].items() for q, c in cell.items()]
    lines += [C.table(["tokens", "question", f"correct in {short}", f"correct in {long}", f"only after {short}",
                       f"answers > {short} tokens", "examples"], rows), ""]
    lines += [f"Seconds: {record['seconds']}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="peers", help="results/OUT.md and .json")
    args = ap.parse_args()
    from retrieval_heads.defaults import DEFAULT_MAX_NEW_TOKENS
    from retrieval_heads.experiments import build_prompts

    machine, lm = C.setup(args.threads, args.model)
    short, long = DEFAULT_MAX_NEW_TOKENS, 50
    record = {"command": C.command_line(), "machine": machine, "samples": args.samples, "tokens": args.tokens,
              "max_new_tokens": [short, long], "gold_spans": {}, "qrhead": {}, "answers": {}, "seconds": {}}
    for t in args.tokens:
        groups = build_prompts(lm, QUESTIONS, t, args.samples, 0.5, 0)
        record["gold_spans"][t] = gold_spans(lm.tokenizer, groups)
        t0 = time.perf_counter()
        record["qrhead"][t] = qrhead_pair(lm, groups)
        t1 = time.perf_counter()
        record["answers"][t] = answer_lengths(lm, groups, short, long)
        record["seconds"][t] = {"qrhead": round(t1 - t0, 1), "answers": round(time.perf_counter() - t1, 1)}
        print(f"{t} tokens done: {record['seconds'][t]}", file=sys.stderr)
        C.write_results(args.out, record, markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
