"""What every engine does before and around the scoring, in one place: :func:`prepare` checks the device and
every model's config and tokenizer, holds the output dir's lock, reads each unit's status and prints the
sweep's headline; the lines printed per experiment (kept, written) are here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..console import plural
from ..errors import ParamError, UserError, first_line
from ..hf import check_attention_code, check_tokenizer
from ..lock import results_lock
from ..models import check_causal_lm, check_device, hub_access, model_identity, resolve
from ..results import depth_text, load_result
from .grid import Grid, model_key
from .plan import Experiment, Status, Unit, experiment_path, own_files, plan, unit_status


def sweep_lock(output_dir: str | Path, own: list[Path] | None = None):
    """The results-dir lock (:func:`retrieval_heads.lock.results_lock`) held by a sweep."""
    return results_lock(output_dir, "sweep", own)


# --- checks that need configs and tokenizers, not weights -------------------------------------------------


def preflight(grid: Grid) -> None:
    """For each model: its config loads, the longest length fits its positions, and the shortest length
    holds template + needle + question. Loads configs and tokenizers only; UserError on the first problem."""
    from transformers import AutoConfig, AutoTokenizer

    from ..data.tasks import question_groups

    for m in grid.models:
        _, name, path = resolve(m)
        hub, offline_why = hub_access(path)  # the hub only if it answers within HUB_PROBE_S: no minutes of retries
        hint = " (the original study's Llama-3-8B models are gated on the hub: log in with `hf auth login`, or " \
               "try --models smollm2)" if m in ("instruct", "base") else ""
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=grid.trust_remote_code, **hub)
            check_causal_lm(m, config)
            check_attention_code(m, config, grid.trust_remote_code)
            text = config.get_text_config()
            limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
            if limit is not None and max(grid.tokens) > limit:
                raise ParamError("tokens", f" {max(grid.tokens)} exceeds the {limit} positions of {name}")
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=grid.trust_remote_code, **hub)
        except (OSError, ValueError) as e:
            if offline_why and isinstance(e, OSError):
                raise UserError(f"cannot load model {m!r}: it is not in the local hub cache and {offline_why}"
                                f"{hint}") from None
            raise UserError(f"cannot load model {m!r}: {first_line(e)}{hint}") from None
        check_tokenizer(m, tokenizer, config)
        for depth in grid.needle_positions:
            question_groups(tokenizer, grid.questions, min(grid.tokens), 1, depth, grid.seed)


@dataclass
class SweepSummary:
    """What a sweep did: the files it wrote, replaced and kept, and how long it took."""

    done: list[Path] = field(default_factory=list)  # computed now
    recomputed: list[Path] = field(default_factory=list)  # computed now, replacing a corrupt file
    skipped: list[Path] = field(default_factory=list)  # valid already
    seconds: float = 0.0


def result_line(state: str, key: str, q: str, tokens: int, record: dict, timing: str, method: bool = False) -> str:
    """One line per experiment; ``method``: name the result's method too (a sweep of several)."""
    top = record["head_rankings"][0]
    lift = f", lift {top['lift']:.2f}x" if "lift" in top else ""
    depth = record["needle_position"]
    tokens = f"{tokens:>6}" if depth == 0.5 else f"{tokens:>6} d{depth_text(depth)}"
    name = f"{record['method']:<17} " if method else ""
    return f"{state:<10} {name}{key} {q:<14} {tokens}  top {top['head']:<7} ({top['score']:.4f}{lift})  {timing}"


def results_folders(grid: Grid, output_dir: str | Path) -> str:
    """Where the grid's results go: OUTPUT_DIR/METHOD, or the folders of each method."""
    folders = [str(Path(output_dir) / m) for m in grid.results]
    return folders[0] if len(folders) == 1 else "{" + ", ".join(folders) + "}"


def announce(grid: Grid, output_dir: str | Path, units: list[Unit], statuses: list[Status], summary: SweepSummary,
             say: Callable[[str], None], where: str = "") -> int:
    """Print the sweep's headline and one line per valid result kept (added to ``summary.skipped``); returns
    the number of experiments left to compute."""
    todo = sum(len(st.todo) for st in statuses)
    depths = f" x {len(grid.needle_positions)} depth(s)" if len(grid.needle_positions) > 1 else ""
    methods = f" x {len(grid.results)} results" if len(grid.results) > 1 else ""
    say(f"sweep: {len(grid.models)} model(s) x {len(grid.questions)} question(s) x {len(grid.tokens)} "
        f"length(s){depths}{methods} = {grid.size} experiments, {grid.samples} samples each; {todo} to compute"
        f"{where} -> {results_folders(grid, output_dir)}")
    for unit, st in zip(units, statuses):
        for (m, q), state in st.state.items():
            if state == "done":
                path = experiment_path(output_dir, grid, st.model_key, q, unit.tokens, unit.depth, m)
                say(result_line("skipped", st.model_key, q, unit.tokens, load_result(path), "(valid result)",
                                len(grid.results) > 1))
                summary.skipped.append(path)
    return todo


def outcome_line(st: Status, e: Experiment, unit: Unit, grid: Grid, record: dict, seconds: float) -> str:
    """The line printed for experiment ``e`` of ``unit`` once written (done, or recomputed with the reason)."""
    what = plural(len(unit.questions), "question") + (f" x {len(grid.results)} results" if len(grid.results) > 1 else "")
    timing = f"{seconds:.1f} s (unit of {what}, one prefill per sample)"
    if st.state[e] == "corrupt":
        return result_line("recomputed", st.model_key, e[1], unit.tokens, record, f"{timing}  (was: {st.reason[e]})",
                           len(grid.results) > 1)
    return result_line("done", st.model_key, e[1], unit.tokens, record, timing, len(grid.results) > 1)


# --- the setup every engine shares -----------------------------------------------------------------------


@dataclass
class Prepared:
    """A sweep ready to run, its output dir locked: the units in order, each unit's :class:`Status`, the
    summary so far (the valid results kept, in ``skipped``) and the number of experiments left to compute."""

    units: list[Unit]
    statuses: list[Status]
    summary: SweepSummary
    todo: int


@contextmanager
def prepare(grid: Grid, output_dir: str | Path, say: Callable[[str], None], check_models: bool = True,
            device_here: bool = True, where: str = "") -> Iterator[Prepared]:
    """The setup of every engine, in one order: the plan and the models' keys, the device (``device_here``:
    it must be one this machine has; an engine whose workers run elsewhere leaves that to their model load),
    every model's config and tokenizer (``check_models``: :func:`preflight`) and the models' identities, all
    before the output dir is touched, so bad input leaves nothing behind; then the lock on ``output_dir``,
    held until the block ends, each unit's status and the sweep's headline (``say``; ``where`` names the
    engine, e.g. " on Ray"), with one line per valid result kept.

    Example (``run(...)`` scores and writes ``p.statuses``' experiments still to do)::

        with prepare(make_grid(models="smollm2", tokens=[512], samples=2), "results", print) as p:
            if p.todo:
                run(p.units, p.statuses, p.summary)
    """
    units = plan(grid)
    keys = {m: model_key(m) for m in grid.models}
    if device_here:
        check_device(grid.device)
    if check_models:
        preflight(grid)
    idents = {m: model_identity(m) for m in grid.models}
    with sweep_lock(output_dir, own_files(output_dir, grid, keys)):
        statuses = [unit_status(output_dir, grid, u, keys[u.model], idents[u.model]) for u in units]
        summary = SweepSummary()
        todo = announce(grid, output_dir, units, statuses, summary, say, where)
        yield Prepared(units, statuses, summary, todo)
