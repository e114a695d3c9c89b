"""The result JSON (the seed's format, plus a few fields), its file names, and its validation.

Seed fields, in the seed's order: method, model_key, model_name, question, question_prompt, total_tokens,
needle_position, samples_processed, timestamp, head_rankings ([{head, score, rank}] for every head, best
first), top_50_heads. Added: num_layers, num_heads, seed, dtype, scores ([layers][heads], the same numbers
as head_rankings in grid form), extra (method-specific, e.g. accuracy), and checksum: the SHA-256 of the
canonical JSON of every other field except timestamp, so a truncated or edited file is detected.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

SEED_FIELDS = ("method", "model_key", "model_name", "question", "question_prompt", "total_tokens",
               "needle_position", "samples_processed", "timestamp", "head_rankings", "top_50_heads")


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def parse_head(name: str) -> tuple[int, int]:
    layer, head = name[1:].split("H")
    return int(layer), int(head)


def result_path(output_dir: str | Path, method: str, model_key: str, question: str, tokens: int) -> Path:
    return Path(output_dir) / method / f"{model_key}_{question}_{tokens}.json"


def samples_path(path: str | Path) -> Path:
    """The per-sample audit file beside a result JSON (``detect --save-samples``)."""
    return Path(path).with_suffix(".samples.jsonl")


def read_sample_scores(path: str | Path, shape: tuple[int, int]) -> torch.Tensor:
    """(S, L, H) float64 per-sample scores from a ``.samples.jsonl`` (rows as ``experiments.sample_rows``
    writes them); blank lines are skipped. UserError naming the line for an unreadable file, a malformed
    row, or scores that are not finite or not of ``shape`` (L, H)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read samples file {path}: {e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            scores = torch.tensor(json.loads(line)["scores"], dtype=torch.float64)  # (L, H)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise UserError(f"{path}: line {n} is not a per-sample score row") from None
        if tuple(scores.shape) != tuple(shape) or not bool(torch.isfinite(scores).all()):
            raise UserError(f"{path}: line {n} has scores of shape {tuple(scores.shape)}, expected {tuple(shape)}")
        rows.append(scores)
    return torch.stack(rows) if rows else torch.zeros(0, *shape, dtype=torch.float64)  # (S, L, H)


def ranking(scores: torch.Tensor) -> list[tuple[str, float]]:
    """Heads best first; ties broken by (layer, head) so the order is reproducible. scores (L, H)."""
    L, H = scores.shape
    flat = [(float(scores[l, h]), l, h) for l in range(L) for h in range(H)]
    flat.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(head_name(l, h), s) for s, l, h in flat]


def _checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k not in ("timestamp", "checksum")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def make_record(
    *, method: str, model_key: str, model_name: str, question: str, question_prompt: str, total_tokens: int,
    needle_position: float, scores: torch.Tensor, samples_processed: int, seed: int, dtype: str,
    extra: dict | None = None, added: dict | None = None, rank_by: str = "score",
) -> dict[str, Any]:
    """The result record. ``added`` (e.g. the chance fields of :func:`retrieval_heads.chance.chance_fields`,
    with its ``lift`` grid) goes after ``extra``; with it, every head_rankings entry also has its ``lift``,
    and ``rank_by="lift"`` orders head_rankings and top_50_heads by lift instead of score."""
    scores = scores.detach().double().cpu()
    rounded = [[round(float(x), 6) for x in row] for row in scores]
    ranked = ranking(torch.tensor(rounded, dtype=torch.float64))
    lifts = (added or {}).get("lift")
    if rank_by == "lift":
        if lifts is None:
            raise ValueError("rank_by='lift' needs the lift grid")
        by_lift = ranking(torch.tensor(lifts, dtype=torch.float64))
        ranked = [(h, rounded[parse_head(h)[0]][parse_head(h)[1]]) for h, _ in by_lift]
    record: dict[str, Any] = {
        "method": method,
        "model_key": model_key,
        "model_name": model_name,
        "question": question,
        "question_prompt": question_prompt,
        "total_tokens": total_tokens,
        "needle_position": needle_position,
        "samples_processed": samples_processed,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "head_rankings": [{"head": h, "score": s, "rank": i + 1} for i, (h, s) in enumerate(ranked)]
        if lifts is None else [{"head": h, "score": s, "rank": i + 1, "lift": lifts[parse_head(h)[0]][parse_head(h)[1]]}
                               for i, (h, s) in enumerate(ranked)],
        "top_50_heads": [h for h, _ in ranked[:50]],
        "num_layers": scores.shape[0],
        "num_heads": scores.shape[1],
        "seed": seed,
        "dtype": dtype,
        "scores": rounded,
        "extra": extra or {},
    }
    if added:
        record.update(added, rank_by=rank_by)
    record["checksum"] = _checksum(record)
    return record


def validate(record: Any, where: str = "result") -> dict:
    """Raise UserError unless ``record`` is a complete, unedited result."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: not a result object")
    missing = [k for k in SEED_FIELDS + ("scores", "num_layers", "num_heads", "checksum") if k not in record]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
    if record["checksum"] != _checksum(record):
        raise UserError(f"{where}: checksum mismatch (truncated or edited)")
    L, H = record["num_layers"], record["num_heads"]
    if len(record["head_rankings"]) != L * H or any(
        not isinstance(x, (int, float)) or not math.isfinite(x) for row in record["scores"] for x in row
    ):
        raise UserError(f"{where}: inconsistent or non-finite scores")
    return record


def load_result(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read result {path}: {e}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt result JSON ({e.msg} at line {e.lineno})") from None
    return validate(record, str(path))


def is_valid_result(path: str | Path) -> bool:
    try:
        load_result(path)
        return True
    except UserError:
        return False


def scores_tensor(record: dict) -> torch.Tensor:
    return torch.tensor(record["scores"], dtype=torch.float64)
