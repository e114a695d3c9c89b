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
import re
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


NAME_CHARS = re.compile(r"[A-Za-z0-9._+-]+")
MAX_NAME = 128


def check_name(value: Any, field: str) -> str:
    """``value`` if it can be part of a file name (a result's method, model_key and question are): a non-empty
    string of at most 128 characters from ``A-Za-z0-9._+-``, not starting with '.', without '..' (so no
    '/', '\\', hidden file or parent folder can come from it); else UserError naming ``field``."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{field}: expected a non-empty name, got {json.dumps(value)[:60]}")
    if len(value) > MAX_NAME or not NAME_CHARS.fullmatch(value) or value.startswith(".") or ".." in value:
        raise UserError(f"{field}: {json.dumps(value)[:60]} cannot name a file (use at most {MAX_NAME} of "
                        f"A-Za-z0-9._+-, not starting with '.', no '..')")
    return value


def safe_key(text: str) -> str:
    """``text`` (e.g. a local folder's name) turned into a name that passes :func:`check_name`: every other
    character becomes '_', runs of dots become '_', and leading dots go (empty: ``model``).

    >>> safe_key("my model (v2)"), safe_key(".hidden..x"), safe_key("Ünï")
    ('my_model__v2_', 'hidden_x', '_n_')
    """
    key = re.sub(r"\.{2,}", "_", re.sub(r"[^A-Za-z0-9._+-]", "_", text)).lstrip(".")[:MAX_NAME]
    return key or "model"


def result_path(output_dir: str | Path, method: str, model_key: str, question: str, tokens: int) -> Path:
    """``output_dir/method/{model_key}_{question}_{tokens}.json``; the names are checked (:func:`check_name`)
    and ``tokens`` must be a positive whole number, so the file always lies in ``output_dir/method/``."""
    check_name(method, "method")
    check_name(model_key, "model_key")
    check_name(question, "question")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise UserError(f"total_tokens: expected a positive whole number, got {tokens!r}")
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
    extra: dict | None = None,
) -> dict[str, Any]:
    scores = scores.detach().double().cpu()
    rounded = [[round(float(x), 6) for x in row] for row in scores]
    ranked = ranking(torch.tensor(rounded, dtype=torch.float64))
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
        "head_rankings": [{"head": h, "score": s, "rank": i + 1} for i, (h, s) in enumerate(ranked)],
        "top_50_heads": [h for h, _ in ranked[:50]],
        "num_layers": scores.shape[0],
        "num_heads": scores.shape[1],
        "seed": seed,
        "dtype": dtype,
        "scores": rounded,
        "extra": extra or {},
    }
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
    _check_fields(record, where)
    L, H = record["num_layers"], record["num_heads"]
    if len(record["head_rankings"]) != L * H or any(
        not isinstance(x, (int, float)) or not math.isfinite(x) for row in record["scores"] for x in row
    ):
        raise UserError(f"{where}: inconsistent or non-finite scores")
    return record


def _check_fields(record: dict, where: str) -> None:
    """The fields that become file names, model names or settings: names checked, numbers of their type
    (a JSON ``true`` is not a number, ``"0"`` is not a seed)."""
    try:
        for k in ("method", "model_key", "question"):
            check_name(record[k], k)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    bad = next((k for k, ok in (
        ("total_tokens", whole(record["total_tokens"]) and record["total_tokens"] > 0),
        ("samples_processed", whole(record["samples_processed"]) and record["samples_processed"] >= 0),
        ("num_layers", whole(record["num_layers"]) and record["num_layers"] > 0),
        ("num_heads", whole(record["num_heads"]) and record["num_heads"] > 0),
        ("seed", "seed" not in record or whole(record["seed"])),
        ("needle_position", isinstance(record["needle_position"], (int, float))
         and not isinstance(record["needle_position"], bool) and 0 <= record["needle_position"] <= 1),
    ) if not ok), None)
    if bad:
        raise UserError(f"{where}: {bad}: unexpected value {json.dumps(record[bad])[:60]}")


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
