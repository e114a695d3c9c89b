"""The result JSON (the original format's fields, plus a few), its file names, and its validation.

Core fields, in the original format's order: method, model_key, model_name, question, question_prompt, total_tokens,
needle_position, samples_processed, timestamp, head_rankings ([{head, score, rank}] for every head, best
first), top_50_heads. Added: num_layers, num_heads, seed, dtype, scores ([layers][heads], the same numbers
as head_rankings in grid form), extra (method-specific, e.g. accuracy), provenance (what produced it: model
source and weights identity, dataset hash, versions), and checksum: the SHA-256 of the canonical JSON of every
other field except timestamp, so a truncated or edited file is detected; :func:`validate` also checks every
field's type and the consistency of scores, rankings and top heads, which a recomputed checksum would not.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .errors import UserError
from .io import MAX_NAME, NAME_CHARS, JSONError, check_name, parse_json, read_regular, safe_key  # noqa: F401  (names: also read from here)

if TYPE_CHECKING:
    import torch

    from .data.prompt import PromptSample

CORE_FIELDS = ("method", "model_key", "model_name", "question", "question_prompt", "total_tokens",
               "needle_position", "samples_processed", "timestamp", "head_rankings", "top_50_heads")


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


_HEAD = re.compile(r"L([0-9]+)H([0-9]+)")


def parse_head(name: str) -> tuple[int, int]:
    """(layer, head) of a head name as :func:`head_name` writes it (``L3H7``); UserError for anything else
    (a leading zero, a sign, spaces or another form would name a head ambiguously)."""
    m = _HEAD.fullmatch(name) if isinstance(name, str) else None
    if m is None or head_name(int(m[1]), int(m[2])) != name:
        raise UserError(f"bad head name {name!r}: expected L<layer>H<head>, e.g. L3H7")
    return int(m[1]), int(m[2])


DEFAULT_DEPTH = 0.5  # the default needle depth: its results' file names carry no depth


def depth_text(depth: float) -> str:
    """A needle depth as it appears in a file name: the shortest decimal with at least two decimals that reads
    back as exactly ``depth`` (0.1 -> "0.10", 0.125 -> "0.125", 1 -> "1.00"); UserError unless a number in
    [0, 1]. For depths in [0, 1] these strings sort as the depths do."""
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not math.isfinite(depth) \
            or not 0 <= depth <= 1:
        raise UserError(f"needle_position: expected a number in [0, 1], got {depth!r}")
    depth += 0.0  # -0.0 is 0.0: one name for one depth
    for decimals in range(2, 40):
        text = f"{depth:.{decimals}f}"
        if float(text) == depth:
            return text
    raise UserError(f"needle_position: {depth!r} has no short decimal form")  # unreachable for a float


def file_name(model_key: str, question: str, tokens: int, depth: float = DEFAULT_DEPTH) -> str:
    """A result's file name: ``{model_key}_{question}_{tokens}.json`` at the default depth (0.5), else
    ``{model_key}_{question}_{tokens}_d{depth}.json`` (:func:`depth_text`, e.g. ``_d0.10``). The names are
    checked (:func:`check_name`), ``tokens`` must be a positive whole number and ``depth`` in [0, 1];
    :func:`parse_file_name` reads it back."""
    check_name(model_key, "model_key")
    check_name(question, "question")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise UserError(f"total_tokens: expected a positive whole number, got {tokens!r}")
    suffix = "" if depth_text(depth) == depth_text(DEFAULT_DEPTH) else f"_d{depth_text(depth)}"
    return f"{model_key}_{question}_{tokens}{suffix}.json"


_FILE_NAME = re.compile(r"(?P<stem>.+)_(?P<tokens>[1-9][0-9]*)(?:_d(?P<depth>[01]\.[0-9]{2,}))?\.json")


def parse_file_name(name: str) -> tuple[str, int, float]:
    """``(stem, tokens, depth)`` of a result's file name as :func:`file_name` writes it, ``stem`` being
    ``{model_key}_{question}`` (both may hold '_', so they are not split); a name without a depth is at the
    default 0.5. UserError for any other name, including a depth not written the one way :func:`depth_text`
    writes it (``_d0.5``, ``_d0.50``, ``_d0.100``).

    >>> parse_file_name("smollm2_inc_state_2048_d0.10.json"), parse_file_name("smollm2_inc_state_2048.json")
    (('smollm2_inc_state', 2048, 0.1), ('smollm2_inc_state', 2048, 0.5))
    """
    m = _FILE_NAME.fullmatch(name) if isinstance(name, str) else None
    depth = DEFAULT_DEPTH if m is None or m["depth"] is None else float(m["depth"])
    if m is None or not 0 <= depth <= 1 or (m["depth"] is not None and (
            m["depth"] != depth_text(depth) or depth_text(depth) == depth_text(DEFAULT_DEPTH))):
        raise UserError(f"{name!r} is not a result file name (MODEL_QUESTION_TOKENS.json or "
                        f"MODEL_QUESTION_TOKENS_dDEPTH.json, e.g. _d0.10)")
    return m["stem"], int(m["tokens"]), depth


def result_path(output_dir: str | Path, method: str, model_key: str, question: str, tokens: int,
                needle_position: float = DEFAULT_DEPTH) -> Path:
    """``output_dir/method/`` + :func:`file_name` (``{model_key}_{question}_{tokens}.json`` at the default depth
    0.5, with ``_d{depth}`` before ``.json`` at any other); the names are checked (:func:`check_name`) and
    ``tokens`` must be a positive whole number, so the file always lies in ``output_dir/method/``."""
    check_name(method, "method")
    return Path(output_dir) / method / file_name(model_key, question, tokens, needle_position)


def check_result_folder(folder: str | Path) -> None:
    """UserError if a method folder that results go into is a symbolic link: results are written inside
    the output folder, never through a link to somewhere else."""
    if Path(folder).is_symlink():
        raise UserError(f"{folder} is a symbolic link; results are not written through it (remove it or use "
                        "another --output-dir)")


def samples_path(path: str | Path) -> Path:
    """The per-sample audit file beside a result JSON (``detect --save-samples``)."""
    return Path(path).with_suffix(".samples.jsonl")


def sample_rows(prompts: Sequence[PromptSample], sample_scores: torch.Tensor, answers: Sequence | None = None,
                spans=None):
    """The .samples.jsonl rows; with ``answers``, each row also has the model's ``generated`` answer and
    whether it is ``correct``; with ``spans`` (a chance.SpanScores), the per-sample ``baseline`` and
    ``control`` masses ([L][H]) and whether the sample went into the test."""
    cpu = sample_scores.detach().double().cpu()

    def grid(t: torch.Tensor) -> list:
        return [[round(float(x), 8) for x in row] for row in t]

    for i, p in enumerate(prompts):
        chance = {} if spans is None else {"baseline": grid(spans.baseline[i]), "control": grid(spans.control[i]),
                                           "tested": bool(spans.tested[i])}
        yield {
            "index": i,
            "input_ids": p.input_ids,
            "needle_start": p.needle_start,
            "needle_end": p.needle_end,
            "question": p.question,
            "answer": p.answer,
            "scores": [[round(float(x), 8) for x in row] for row in cpu[i]],
            **(answers[i].row() if answers is not None else {}),
            **({"meta": p.meta} if p.meta else {}),
            **chance,
        }


def _number_grid(value: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """``value`` as an (L, H) float64 array when it is a list of L lists of H finite numbers, else None."""
    L, H = shape
    if not (isinstance(value, list) and len(value) == L and
            all(isinstance(row, list) and len(row) == H for row in value)):
        return None
    if not all(isinstance(x, (int, float)) for row in value for x in row):
        return None
    try:
        grid = np.asarray(value, dtype=np.float64)  # (L, H)
    except OverflowError:  # an int too large for a float
        return None
    return grid if bool(np.isfinite(grid).all()) else None


def read_sample_scores(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """(S, L, H) float64 per-sample scores from a ``.samples.jsonl`` (rows as :func:`sample_rows`
    writes them); blank lines are skipped. UserError naming the line for an unreadable file, a malformed
    row, or scores that are not finite or not of ``shape`` (L, H)."""
    path = Path(path)
    try:
        lines = read_regular(path).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read samples file {path}: {getattr(e, 'strerror', None) or e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except JSONError as e:
            raise UserError(f"{path}: line {n} is not a per-sample score row ({e})") from None
        if not isinstance(row, dict) or "scores" not in row:
            raise UserError(f"{path}: line {n} is not a per-sample score row")
        scores = _number_grid(row["scores"], shape)  # (L, H)
        if scores is None:
            raise UserError(f"{path}: line {n} has scores that are not a {shape[0]} x {shape[1]} grid of "
                            "finite numbers")
        rows.append(scores)
    return np.stack(rows) if rows else np.zeros((0, *shape), dtype=np.float64)  # (S, L, H)


def ranking(scores, layers: list[int] | None = None) -> list[tuple[str, float]]:
    """Heads best first; ties broken by (layer, head) so the order is reproducible. scores (L, H): a tensor or
    an array; ``layers``: only the heads of these layers (a hybrid's attention layers; None: every layer)."""
    L, H = scores.shape
    flat = [(float(scores[l, h]), l, h) for l in (range(L) if layers is None else layers) for h in range(H)]
    flat.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(head_name(l, h), s) for s, l, h in flat]


def _checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k not in ("timestamp", "checksum")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def make_record(
    *, method: str, model_key: str, model_name: str, question: str, question_prompt: str, total_tokens: int,
    needle_position: float, scores: torch.Tensor, samples_processed: int, seed: int, dtype: str,
    extra: dict | None = None, provenance: dict | None = None, added: dict | None = None, rank_by: str = "score",
    attention_layers: list[int] | None = None,
) -> dict[str, Any]:
    """The result record. ``attention_layers``: a hybrid's attention layers (:mod:`retrieval_heads.families`),
    recorded, and the only layers whose heads are ranked (the other layers' scores stay 0 in the grid); None
    where every layer attends (the field is then absent). ``added`` (e.g. the chance fields of :func:`retrieval_heads.chance.chance_fields`,
    with its ``lift`` grid) goes after ``extra``; with it, every head_rankings entry also has its ``lift``,
    and ``rank_by="lift"`` orders head_rankings and top_50_heads by lift instead of score."""
    scores = scores.detach().double().cpu()
    rounded = [[round(float(x), 6) for x in row] for row in scores]
    layers = None if attention_layers is None else sorted(attention_layers)
    ranked = ranking(np.asarray(rounded, dtype=np.float64), layers)
    lifts = (added or {}).get("lift")
    if rank_by == "lift":
        if lifts is None:
            raise ValueError("rank_by='lift' needs the lift grid")
        by_lift = ranking(np.asarray(lifts, dtype=np.float64), layers)
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
        **({} if layers is None else {"attention_layers": layers}),
        "seed": seed,
        "dtype": dtype,
        "scores": rounded,
        "extra": extra or {},
    }
    if added:
        record.update(added, rank_by=rank_by)
    record["provenance"] = provenance if provenance is not None else make_provenance(None)
    record["checksum"] = _checksum(record)
    return record


def package_versions() -> dict[str, str]:
    """The versions of this package, torch and transformers (recorded for audit; resume does not compare them)."""
    import torch
    import transformers

    from . import __version__

    return {"retrieval-heads": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def make_provenance(identity: dict | None, dataset: str | Path | None = None) -> dict:
    """A result's ``provenance``: the model's identity (:func:`retrieval_heads.models.model_identity`; null
    fields where unknown), the dataset file's name and SHA-256 (with ``--dataset``; else null), and the
    package versions."""
    model = {"source": None, "revision": None, "weights_sha256": None}
    model.update({k: identity.get(k) for k in model} if identity else {})
    data = None
    if dataset is not None:
        try:
            digest = hashlib.sha256(read_regular(dataset)).hexdigest()
        except OSError as e:
            raise UserError(f"cannot read dataset {dataset}: {e.strerror or e}") from None
        data = {"file": Path(dataset).name, "sha256": digest}
    return {"model": model, "dataset": data, "versions": package_versions()}


def identity_of(record: dict) -> dict:
    """What must match for a result to count as the same experiment's: the model's source and weights
    identity, and the dataset's hash (not the versions)."""
    prov = record.get("provenance") or {}
    model, data = prov.get("model") or {}, prov.get("dataset") or {}
    return {"source": model.get("source"), "revision": model.get("revision"),
            "weights_sha256": model.get("weights_sha256"), "dataset_sha256": data.get("sha256")}


def validate(record: Any, where: str = "result") -> dict:
    """Raise UserError unless ``record`` is a complete, unedited, self-consistent result: every field of its
    type, ``scores`` exactly num_layers x num_heads finite numbers, ``head_rankings`` every head once, best
    first (ties by layer, head), each score the grid's, ranks 1..N, ``top_50_heads`` its first 50. The
    checksum alone would pass a file edited with its checksum recomputed."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: not a result object")
    missing = [k for k in CORE_FIELDS + ("scores", "num_layers", "num_heads", "checksum") if k not in record]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
    if record["checksum"] != _checksum(record):
        raise UserError(f"{where}: checksum mismatch (truncated or edited)")
    _check_fields(record, where)
    why = structure_problem(record)
    if why:
        raise UserError(f"{where}: {why}")
    return record


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def structure_problem(record: dict) -> str | None:
    """The first thing wrong with a result's fields and their consistency, or None."""
    for k in ("method", "model_key", "model_name", "question", "question_prompt", "timestamp", "checksum"):
        if not isinstance(record[k], str):
            return f"{k}: not a string"
    for k in ("dtype",):
        if k in record and not isinstance(record[k], str):
            return f"{k}: not a string"
    for k in ("total_tokens", "samples_processed", "num_layers", "num_heads"):
        if not _is_int(record[k]) or record[k] <= 0:
            return f"{k}: not a positive whole number ({record[k]!r})"
    if "seed" in record and not _is_int(record["seed"]):
        return f"seed: not a whole number ({record['seed']!r})"
    if not _is_num(record["needle_position"]) or not 0 <= record["needle_position"] <= 1:
        return f"needle_position: not a number in [0, 1] ({record['needle_position']!r})"
    L, H = record["num_layers"], record["num_heads"]
    scores = record["scores"]
    if not isinstance(scores, list) or len(scores) != L or any(not isinstance(r, list) or len(r) != H for r in scores):
        return f"scores are not {L} x {H} (num_layers x num_heads)"
    if not all(_is_num(x) for row in scores for x in row):
        return "inconsistent or non-finite scores"
    lifts = record.get("lift")
    if lifts is not None and (not isinstance(lifts, list) or len(lifts) != L or any(
            not isinstance(r, list) or len(r) != H or not all(_is_num(x) for x in r) for r in lifts)):
        return f"lift is not {L} x {H} finite numbers"
    if record.get("rank_by", "score") not in ("score", "lift") or (record.get("rank_by") == "lift" and lifts is None):
        return "rank_by is neither score nor lift (with a lift grid)"
    order = lifts if record.get("rank_by") == "lift" else scores  # what head_rankings is sorted by
    layers = record.get("attention_layers", list(range(L)))
    if "attention_layers" in record and (not isinstance(layers, list) or not layers or not all(_is_int(x) for x in layers)
                                         or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= L
                                         or len(layers) == L):
        return f"attention_layers is not an ascending list of some of the {L} layers"
    attends = set(layers)
    ranks = record["head_rankings"]
    if not isinstance(ranks, list) or len(ranks) != len(layers) * H:
        return f"head_rankings does not hold all {len(layers) * H} heads"
    seen = set()
    prev = None
    for i, r in enumerate(ranks):
        if not isinstance(r, dict) or not isinstance(r.get("head"), str) or not _is_num(r.get("score")) \
                or not _is_int(r.get("rank")):
            return f"head_rankings[{i}] is not a {{head, score, rank}} entry"
        try:
            lh = parse_head(r["head"])
        except ValueError:
            lh = None
        if lh is None or not (lh[0] in attends and 0 <= lh[1] < H) or head_name(*lh) != r["head"] or lh in seen:
            return f"head_rankings[{i}]: {r['head']!r} is not a head of the {L} x {H} grid's attention layers, or repeats one"
        seen.add(lh)
        if r["rank"] != i + 1:
            return f"head_rankings[{i}] has rank {r['rank']}, expected {i + 1}"
        if r["score"] != scores[lh[0]][lh[1]]:
            return f"head_rankings[{i}]: {r['head']} scores {r['score']}, the scores grid {scores[lh[0]][lh[1]]}"
        if lifts is not None and r.get("lift") != lifts[lh[0]][lh[1]]:
            return f"head_rankings[{i}]: {r['head']} has lift {r.get('lift')}, the lift grid {lifts[lh[0]][lh[1]]}"
        here = (-order[lh[0]][lh[1]], lh[0], lh[1])
        if prev is not None and here < prev:
            by = "lift" if order is lifts else "score"
            return f"head_rankings is not sorted by {by} (ties by layer, head) at rank {i + 1}"
        prev = here
    top = record["top_50_heads"]
    if not isinstance(top, list) or top != [r["head"] for r in ranks[:50]]:
        return "top_50_heads is not the first 50 heads of head_rankings"
    extra = record.get("extra", {})
    if not isinstance(extra, dict):
        return "field extra is not an object"
    kv = extra.get("num_key_value_heads")
    if kv is not None and (not _is_int(kv) or kv <= 0):
        return f"extra.num_key_value_heads is not a positive whole number ({kv!r})"
    if "provenance" in record:
        from .claims import claim_problem  # the key the fields claim, against what produced the result

        return _provenance_problem(record["provenance"]) or claim_problem(record)
    return None


def _provenance_problem(prov: Any) -> str | None:
    if not isinstance(prov, dict) or not isinstance(prov.get("model"), dict):
        return "field provenance is not an object with a model"
    for k in ("source", "revision", "weights_sha256"):
        if prov["model"].get(k) is not None and not isinstance(prov["model"][k], str):
            return f"provenance.model.{k} is not a string"
    data = prov.get("dataset")
    if data is not None and (not isinstance(data, dict) or not isinstance(data.get("sha256"), str)):
        return "provenance.dataset is not an object with a sha256"
    versions = prov.get("versions")
    if versions is not None and (not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values())):
        return "provenance.versions is not an object of strings"
    return None


def samples_problem(result: str | Path, record: dict) -> str | None:
    """Why the ``.samples.jsonl`` beside a valid result does not belong to it (unreadable, a row count other
    than samples_processed, rows whose scores do not add up to the result's within rounding), or None."""
    path = samples_path(result)
    try:
        rows = read_sample_scores(path, (record["num_layers"], record["num_heads"]))  # (S, L, H)
    except UserError as e:
        return f"samples file: {str(e).removeprefix(f'{path}: ')}"
    if rows.shape[0] != record["samples_processed"]:
        return f"samples file has {rows.shape[0]} rows, the result {record['samples_processed']} samples"
    total = scores_array(record)  # (L, H)
    atol = 1e-5 * max(1.0, float(np.abs(total).max()))
    if not np.allclose(rows.sum(0), total, rtol=1e-5, atol=atol):
        return "samples file does not add up to the result's scores"
    return None


def _check_fields(record: dict, where: str) -> None:
    """The fields that become file names: each must pass :func:`check_name` (numbers that go into names or
    settings are checked for their type by :func:`structure_problem`)."""
    try:
        for k in ("method", "model_key", "question"):
            check_name(record[k], k)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


class MisnamedResult(UserError):
    """A valid result in a file whose name (or method folder) names another experiment."""


_RESULT_STEM = re.compile(r".+_[0-9]+")  # MODEL_QUESTION_TOKENS, the shape of a result's own name
BUILTIN_METHODS = ("summed_attention", "query_focused", "retrieval_score", "qrhead")  # methods.METHODS's first


def method_names():
    """The registered methods' names: the registry where :mod:`retrieval_heads.methods` is loaded (with any
    method a user registered), else the built-in ones, without importing torch for it (``report``)."""
    loaded = sys.modules.get(f"{__package__}.methods")
    return loaded.METHODS if loaded is not None else BUILTIN_METHODS


def name_problem(path: str | Path, record: dict) -> str | None:
    """Why the file name of a valid result names another experiment than its fields, or None. A result
    renamed or copied to another's name (``m_q_256.json`` saved as ``m_q_512.json``, or put in another
    method's folder) must not pass for that experiment. A name of another shape (``best.json``) is the
    user's own and is accepted; so is a folder that is not named like a method."""
    path = Path(path)
    want = file_name(record["model_key"], record["question"], record["total_tokens"], record["needle_position"])
    folder = path.parent.name
    if folder != record["method"] and folder.split("+")[0].removesuffix("_success") in method_names():
        return (f"the result of {record['method']}/{want} lies in the folder of method {folder!r}; "
                "move it to its own folder")
    if path.name != want and (_RESULT_STEM.fullmatch(path.stem) or _FILE_NAME.fullmatch(path.name)):
        return f"the file name names another experiment than its fields ({record['method']}/{want})"
    return None


def load_result(path: str | Path) -> dict:
    """A valid result (:func:`validate`) whose file name does not name another experiment (:func:`name_problem`,
    a :class:`MisnamedResult`)."""
    path = Path(path)
    try:
        text = read_regular(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read result {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        record = parse_json(text)
    except JSONError as e:
        raise UserError(f"{path}: corrupt result JSON ({e})") from None
    record = validate(record, str(path))
    why = name_problem(path, record)
    if why:
        raise MisnamedResult(f"{path}: {why}")
    return record


def scores_array(record: dict) -> np.ndarray:
    """A valid record's (L, H) score grid, float64."""
    return np.asarray(record["scores"], dtype=np.float64)
