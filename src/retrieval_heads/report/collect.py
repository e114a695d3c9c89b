"""Find the result files under a results folder, validate them, and load per-sample scores beside them.

A results folder is what ``detect`` and ``sweep`` write: ``{dir}/{method}/{model}_{question}_{tokens}.json``
(``..._{tokens}_d{depth}.json`` at a needle depth other than 0.5), possibly nested deeper. Every ``*.json`` below it is read: a file that is not JSON, or that looks like a
result (it has ``head_rankings`` or ``checksum``) but fails :func:`retrieval_heads.results.validate`, stops
the report with the file's name. JSON that is clearly something else (e.g. an ablation curve) is skipped
and listed. The report's own output folder is never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.questions import QUESTIONS
from ..errors import UserError
from ..io import JSONError, parse_json, read_regular
from ..results import DEFAULT_DEPTH, file_name, name_problem, read_sample_scores, samples_path, validate


@dataclass
class Experiment:
    """One result file: its record, its (L, H) score grid, and where it lies."""

    record: dict
    path: Path
    rel: str  # path relative to the results folder, for display

    @property
    def method(self) -> str:
        """The result's method name; a success-only variant has its own (e.g. ``summed_attention_success``)."""
        return self.record["method"]

    @property
    def model(self) -> str:
        return self.record["model_key"]

    @property
    def question(self) -> str:
        return self.record["question"]

    @property
    def tokens(self) -> int:
        return int(self.record["total_tokens"])

    @property
    def depth(self) -> float:
        """The needle's depth (``needle_position``, 0..1)."""
        return float(self.record["needle_position"])

    @property
    def question_label(self) -> str:
        """The question, with the needle depth where it is not the default 0.5 (``inc_state @0.25``): what tells
        results of one question at several depths apart in the tables that have a column per length."""
        return self.question if self.depth == DEFAULT_DEPTH else f"{self.question} @{self.depth:g}"

    @property
    def scores(self) -> np.ndarray:
        return np.asarray(self.record["scores"], dtype=np.float64)  # (L, H)

    @property
    def lift(self) -> np.ndarray | None:
        """(L, H) lift over the chance baseline, or None for a result without chance fields (another method,
        or made before they existed). UserError for a malformed grid."""
        grid = self.record.get("lift")
        if grid is None:
            return None
        try:
            out = np.asarray(grid, dtype=np.float64)
        except (TypeError, ValueError):
            out = None
        if out is None or out.shape != self.shape or not np.isfinite(out).all():
            raise UserError(f"{self.path}: malformed lift grid")
        return out

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.record["num_layers"]), int(self.record["num_heads"])

    @property
    def ranked(self) -> list[str]:
        """Head names best first, in the file's own order."""
        return [r["head"] for r in self.record["head_rankings"]]

    @property
    def samples_path(self) -> Path:
        return samples_path(self.path)

    @property
    def key(self) -> tuple:
        """(method, model, question, tokens), and the needle depth after them where it is not the default 0.5
        (as the file names do): one key per experiment."""
        ident = (self.method, self.model, self.question, self.tokens)
        return ident if self.depth == DEFAULT_DEPTH else ident + (self.depth,)

    @property
    def title(self) -> str:
        depth = "" if self.depth == DEFAULT_DEPTH else f" · depth {self.depth:g}"
        return f"{self.model} · {self.question} · {self.tokens} tokens{depth}"

    @property
    def slug(self) -> str:
        return file_name(self.model, self.question, self.tokens, self.depth).removesuffix(".json")


@dataclass
class Collection:
    root: Path
    experiments: list[Experiment]
    skipped: list[str] = field(default_factory=list)  # JSON files that are not results

    @property
    def methods(self) -> list[str]:
        return sorted({e.method for e in self.experiments})


def question_order(key: str) -> tuple[int, str]:
    """The built-in questions in their own order, then any other (dataset) names alphabetically."""
    keys = QUESTIONS.names()
    return (keys.index(key), "") if key in keys else (len(keys), key)


def sort_key(e: Experiment) -> tuple:
    return (e.method, e.model, question_order(e.question), e.depth, e.tokens)


def _looks_like_result(obj: object) -> bool:
    return isinstance(obj, dict) and ("head_rankings" in obj or "checksum" in obj)


def collect(root: str | Path, exclude: str | Path | None = None) -> Collection:
    """All valid results under ``root``, sorted by method, model, question, tokens. Raises UserError on
    a missing folder, a corrupt result, two results for the same experiment, or no results at all."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"results folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    skip = Path(exclude).resolve() if exclude is not None else None
    if skip is not None and (skip == root.resolve() or skip in root.resolve().parents):
        raise UserError(f"the report folder {exclude} would hold the results folder {root}; choose another --out")
    check_no_linked_folders(root)
    found: dict[tuple, Experiment] = {}
    skipped: list[str] = []
    for path in sorted(root.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts) or not path.is_file():
            continue  # temp files and folders (ours are all named .NAME...tmp)
        mine = skip is not None and (path.resolve() == skip or skip in path.resolve().parents)
        rel = path.relative_to(root).as_posix()
        try:
            obj = parse_json(read_regular(path).decode("utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            if mine:
                continue
            raise UserError(f"cannot read result {path}: {e}") from None
        except JSONError as e:
            if mine:
                continue
            raise UserError(f"{path}: corrupt result JSON ({e})") from None
        if mine:  # the report's own folder is not read, so it must hold no result that would go unreported
            if _looks_like_result(obj):
                raise UserError(f"the report folder {exclude} holds the result {path}, which the report would "
                                "leave out; choose another --out")
            continue
        if not _looks_like_result(obj):
            skipped.append(rel)
            continue
        record = validate(obj, str(path))
        why = name_problem(path, record)
        if why:
            raise UserError(f"{path}: {why}")
        exp = Experiment(record, path, rel)
        if exp.key in found:
            raise UserError(f"two results for {exp.method} {exp.title}: {found[exp.key].path} and {path}; "
                            "point the report at one of their folders")
        found[exp.key] = exp
    if not found:
        what = f"no result files (only other JSON: {', '.join(skipped[:3])})" if skipped else "no result files"
        raise UserError(f"{root}: {what}; expected METHOD/MODEL_QUESTION_TOKENS.json as written by detect or sweep")
    experiments = sorted(found.values(), key=sort_key)
    check_one_model_per_key(experiments)
    return Collection(root, experiments, skipped)


def check_no_linked_folders(root: Path) -> None:
    """UserError naming the first folder under ``root`` that is a symbolic link (``rglob`` does not follow
    them): the results in it would be left out of the report without a word. Hidden folders are skipped."""
    import os

    for folder, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in dirs:
            p = Path(folder) / d
            if p.is_symlink():
                raise UserError(f"{p} is a symbolic link to a folder; the report does not read results through "
                                f"links (point it at the folder itself, or copy the results into {root})")


WEIGHTS = ("source", "revision", "weights_sha256")  # provenance.model's fields that name the weights


def check_one_model_per_key(experiments: list[Experiment]) -> None:
    """UserError naming both files when two results share a ``model_key`` but not the model: a known weights
    field (source, revision, sha256) that differs, another head grid, or other attention layers. The report compares results of one
    key as one model (between lengths, depths, questions), so a result made by other weights under the same
    key would pass for that model's. (Unknown fields, null in older results, are not compared.)"""
    first: dict[str, Experiment] = {}
    for e in experiments:
        seen = first.setdefault(e.model, e)
        if seen is e:
            continue
        if seen.shape != e.shape:
            raise UserError(f"{seen.path} and {e.path} are both model {e.model!r} but have different head grids "
                            f"({seen.shape[0]}x{seen.shape[1]} and {e.shape[0]}x{e.shape[1]} layers x heads); "
                            "report them from separate folders")
        la, lb = seen.record.get("attention_layers"), e.record.get("attention_layers")
        if la != lb:  # a hybrid's attention layers are its architecture's: one model has one set
            name = lambda x: "all" if x is None else ",".join(map(str, x))  # noqa: E731
            raise UserError(f"{seen.path} and {e.path} are both model {e.model!r} but have different attention "
                            f"layers ({name(la)} and {name(lb)}); report them from separate folders")
        a, b = _weights(seen), _weights(e)
        differ = [k for k in WEIGHTS if a[k] is not None and b[k] is not None and a[k] != b[k]]
        if differ:
            what = ", ".join(f"{k} {str(a[k])[:16]} vs {str(b[k])[:16]}" for k in differ)
            raise UserError(f"{seen.path} and {e.path} are both model {e.model!r} but were made with different "
                            f"weights ({what}); report them from separate folders")


def _weights(e: Experiment) -> dict:
    model = (e.record.get("provenance") or {}).get("model") or {}
    return {k: model.get(k) for k in WEIGHTS}


def load_sample_scores(exp: Experiment) -> tuple[np.ndarray | None, str]:
    """Per-sample scores (S, L, H) from the ``.samples.jsonl`` beside a result, or (None, why not).

    Every row is used (a success-only result's rows hold zeros for wrongly answered samples, so they still
    add up to the result). A file whose rows add up to neither the result's scores nor their mean (e.g. one
    left over from an earlier run) is not used; a malformed file stops the report.
    """
    path = exp.samples_path
    if not path.exists():
        return None, "no per-sample scores (run with --save-samples)"
    per_sample = read_sample_scores(path, exp.shape)  # (S, L, H)
    if len(per_sample) < 2:
        return None, f"{len(per_sample)} sample(s) in {path.name}; a bootstrap needs at least 2"
    total = exp.scores
    atol = 1e-5 * max(1.0, float(np.abs(total).max()))
    if not any(np.allclose(agg, total, rtol=1e-5, atol=atol) for agg in (per_sample.sum(0), per_sample.mean(0))):
        return None, f"{path.name} does not add up to the result's scores (stale file?)"
    return per_sample, ""
