"""One experiment end to end: samples -> model -> per-head scores -> result JSON. The CLI wraps :func:`detect`.

>>> from retrieval_heads import detect
>>> res = detect(model="smollm2", question="inc_state", tokens=1024, samples=4)   # doctest: +SKIP
>>> res.scores.shape, res.top(3)                                                  # doctest: +SKIP
(torch.Size([30, 9]), [('L..H..', ...), ...])
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .data.dataset import load_jsonl
from .data.prompt import PromptFormat, PromptSample
from .data.questions import QUESTIONS
from .data.samples import dataset_samples, synthetic_samples
from .errors import UserError
from .io import atomic_write_json, atomic_write_jsonl
from .methods import METHODS
from .models import LoadedModel, load_model
from .results import make_record, ranking, result_path

DEFAULT_TOKENS = 2048
DEFAULT_SAMPLES = 6


@dataclass
class DetectResult:
    """Scores of one experiment. ``scores`` (L, H) is the sum over samples of ``sample_scores`` (S, L, H)."""

    scores: torch.Tensor
    sample_scores: torch.Tensor
    prompts: list[PromptSample]
    record: dict
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        return ranking(self.scores)[:k]


def check_args(question: str | None, tokens: int, samples: int, needle_position: float, batch_size: int = 1) -> None:
    """The checks that need no model: fail before spending time on loading one."""
    if question is not None:
        QUESTIONS.get(question)
    if tokens <= 0:
        raise UserError(f"--tokens must be positive, got {tokens}")
    if samples <= 0:
        raise UserError(f"--samples must be positive, got {samples}")
    if not (isinstance(needle_position, (int, float)) and math.isfinite(needle_position) and 0 <= needle_position <= 1):
        raise UserError(f"--needle-position must lie in [0, 1], got {needle_position}")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")


def check_tokens(lm: LoadedModel, tokens: int) -> None:
    limit = lm.max_positions
    if limit is not None and tokens > limit:
        raise UserError(f"--tokens {tokens} exceeds the {limit} positions of {lm.name}")


def build_prompts(
    lm: LoadedModel, questions: Sequence[str], tokens: int, samples: int, needle_position: float, seed: int
) -> list[dict[str, PromptSample]]:
    """Synthetic samples, each a {question: prompt} group sharing one context."""
    check_tokens(lm, tokens)
    return synthetic_samples(PromptFormat(lm.tokenizer), questions, tokens, samples, needle_position, seed)


def batches(prompts: Sequence[PromptSample], batch_size: int) -> list[list[int]]:
    """Indices of prompts, grouped by length (no padding needed) and cut into batches, in first-seen order."""
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p.input_ids), []).append(i)
    return [idx[j : j + batch_size] for idx in by_len.values() for j in range(0, len(idx), batch_size)]


def score_prompts(
    lm: LoadedModel, method: str, prompts: Sequence[PromptSample], batch_size: int = 1, progress: bool = False,
    desc: str = "samples",
) -> torch.Tensor:
    """Per-sample scores (S, L, H), kept on the model's device until the end."""
    from tqdm.auto import tqdm

    m = METHODS.get(method)
    out = torch.zeros(len(prompts), lm.num_layers, lm.num_heads, device=lm.device)  # (S, L, H)
    with tqdm(total=len(prompts), desc=desc, unit="sample", disable=not progress, file=sys.stderr, leave=False) as bar:
        for idx in batches(prompts, batch_size):
            out[idx] = m.score_batch(lm.model, [prompts[i] for i in idx]).to(out.dtype)
            bar.update(len(idx))
    return out


def write_result(
    output_dir: str | Path, record: dict, prompts: Sequence[PromptSample], sample_scores: torch.Tensor,
    save_samples: bool,
) -> Path:
    """Samples file first, result JSON last (its presence marks the experiment done); both atomic."""
    path = result_path(output_dir, record["method"], record["model_key"], record["question"], record["total_tokens"])
    if save_samples:
        atomic_write_jsonl(path.with_suffix(".samples.jsonl"), sample_rows(prompts, sample_scores))
    atomic_write_json(path, record)
    return path


def sample_rows(prompts: Sequence[PromptSample], sample_scores: torch.Tensor):
    cpu = sample_scores.detach().double().cpu()
    for i, p in enumerate(prompts):
        yield {
            "index": i,
            "input_ids": p.input_ids,
            "needle_start": p.needle_start,
            "needle_end": p.needle_end,
            "question": p.question,
            "answer": p.answer,
            "scores": [[round(float(x), 8) for x in row] for row in cpu[i]],
            **({"meta": p.meta} if p.meta else {}),
        }


def detect(
    model: str | LoadedModel = "smollm2",
    question: str = "inc_state",
    tokens: int = DEFAULT_TOKENS,
    samples: int = DEFAULT_SAMPLES,
    needle_position: float = 0.5,
    dataset: str | Path | None = None,
    seed: int = 0,
    method: str = "summed_attention",
    dtype: str = "float32",
    device: str = "cpu",
    batch_size: int = 1,
    output_dir: str | Path | None = None,
    save_samples: bool = False,
    progress: bool = False,
    trust_remote_code: bool = False,
) -> DetectResult:
    """Score every (layer, head) of ``model`` by the attention its last prompt token pays to the needle.

    With ``dataset`` (a JSONL file, see :mod:`retrieval_heads.data.dataset`) its records are the samples
    (``samples`` caps how many are used) and the experiment is named after the file; otherwise ``samples``
    synthetic filings are generated from ``seed``. With ``output_dir`` the result JSON (and, with
    ``save_samples``, the per-sample audit file) is written there.
    """
    check_args(None if dataset else question, tokens, samples, needle_position, batch_size)
    METHODS.get(method)
    records = load_jsonl(dataset)[:samples] if dataset else None
    lm = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device,
                                                                  trust_remote_code=trust_remote_code)
    if records is not None:
        check_tokens(lm, tokens)
        prompts = dataset_samples(PromptFormat(lm.tokenizer), records, tokens, needle_position)
        qkey = Path(dataset).stem
        qs = {p.question for p in prompts}
        qprompt = qs.pop() if len(qs) == 1 else "(per record)"
    else:
        prompts = [g[question] for g in build_prompts(lm, [question], tokens, samples, needle_position, seed)]
        qkey, qprompt = question, QUESTIONS.get(question).prompt
    sample_scores = score_prompts(lm, method, prompts, batch_size, progress)
    total = sample_scores.sum(0)  # (L, H)
    record = make_record(
        method=method, model_key=lm.key, model_name=lm.name, question=qkey, question_prompt=qprompt,
        total_tokens=tokens, needle_position=needle_position, scores=total, samples_processed=len(prompts),
        seed=seed, dtype=str(next(lm.model.parameters()).dtype).removeprefix("torch."),
    )
    path = write_result(output_dir, record, prompts, sample_scores, save_samples) if output_dir else None
    return DetectResult(total.cpu(), sample_scores.cpu(), list(prompts), record, path)
