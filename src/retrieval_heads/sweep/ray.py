"""The Ray engine of ``retrieval-heads sweep --engine ray``: the same sweep, its units run by Ray actors.

The driver (the process that runs the command) does everything but the scoring, with the local engine's
(:func:`retrieval_heads.sweep.run_sweep`) own setup, :func:`retrieval_heads.sweep.prepare`: it makes the
plan, checks the device (on a private local instance, whose workers run here), every model's config and
tokenizer, holds the output directory's lock, reads which experiments are done (skipped), missing or corrupt
(recomputed); then it writes every result with the one atomic writer :func:`retrieval_heads.sweep.write`, as
soon as its unit comes back (a ``ray.wait`` loop). Only the scoring runs on the cluster:

- one :class:`ModelWorker` actor per model key (``num_gpus=gpus_per_worker``; a CPU-only worker when 0),
  which loads its model once, on its first unit, and then scores that model's units one after the other;
- a unit is one model x one token length x all the grid's questions (:func:`retrieval_heads.sweep.plan`);
  it goes out as the small :class:`~retrieval_heads.sweep.Unit` plus the grid, and comes back as one
  :class:`Payload` per question still to write: the result record (scores included), and, only with
  ``--save-samples``, the per-sample scores (S, L, H) and the prompts the audit file needs.

Failures: Ray restarts a dead actor (``max_restarts``) and retries the method that was running on it
(``max_task_retries``), so a killed worker's unit is computed again on the restarted actor (which reloads its
model). Units already finished were written by the driver when they came back: they are never redone or lost.
An error on a worker (a model that cannot be loaded, ...) stops the sweep with one line naming its unit;
results already written stay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import spec
from ..errors import UserError, first_line
from .compute import write
from .grid import Grid
from .plan import Unit
from .prepare import SweepSummary, outcome_line, prepare

RETRIES = 3  # restarts of a dead actor, and retries of the unit it was running
LOCAL_CPUS = 2  # a private local Ray instance (no --address)


@dataclass
class Payload:
    """What crosses the network back to the driver for one experiment: enough for :func:`~retrieval_heads.
    sweep.write` and no more (no model state, no token ids unless the samples file is asked for)."""

    record: dict
    sample_scores: Any = None  # numpy float32 (S, L, H), only with save_samples
    prompts: list | None = None  # PromptSample per sample, only with save_samples
    answers: list | None = None
    attention: bytes | None = None  # the attention file, only with save_attention
    spans: Any = None  # chance.SpanScores (per-sample baselines and control masses), only with save_samples

    def result(self):
        """The :class:`~retrieval_heads.experiments.DetectResult` the writer takes."""
        import torch

        from ..experiments import DetectResult

        scores = torch.tensor(self.record["scores"])  # (L, H)
        samples = torch.from_numpy(self.sample_scores.copy()) if self.sample_scores is not None else scores[None]
        return DetectResult(scores, samples, self.prompts or [], self.record, answers=self.answers,
                            attention=self.attention, spans=self.spans)


class ModelWorker:
    """Holds one model, loaded once (on the first unit: a load error then comes back as that unit's error),
    and scores units of it. Ray makes it an actor; it is a plain class, usable without Ray."""

    def __init__(self, model: str, grid: Grid, device_map: str | None = None):
        self.model, self.grid, self.device_map = model, grid, device_map
        self.lm = None

    def load(self):
        from ..eager_rows import enable
        from ..models import load_model

        lm = load_model(self.model, dtype=self.grid.dtype, device=self.grid.device,
                        trust_remote_code=self.grid.trust_remote_code, device_map=self.device_map)
        if self.grid.eager_attentions:
            enable(lm.model)
        return lm

    def compute(self, unit: Unit, todo: list[tuple]) -> tuple[list[Payload], float]:
        """The payloads of ``todo`` ((method, question) experiments of ``unit`` to write), and the seconds the
        scoring took."""
        from .compute import compute_unit

        if self.lm is None:
            from ..hf import quiet_transformers

            quiet_transformers()
            self.lm = self.load()
        start = time.perf_counter()
        results = compute_unit(self.lm, unit, self.grid)
        seconds = time.perf_counter() - start
        keep = self.grid.save_samples
        return [Payload(r.record,
                        r.sample_scores.float().numpy() if keep else None,
                        list(r.prompts) if keep else None,
                        r.answers, r.attention,
                        r.spans if keep else None)
                for r in results if (r.record["method"], r.record["question"]) in todo], seconds


def connect(address: str | None = None, **init: Any) -> bool:
    """Connect to the Ray cluster at ``address``, or start a private local instance (2 CPUs, no dashboard).
    Returns whether this call started the connection (the caller then shuts it down). Already connected:
    nothing to do."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    opts: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address:
        opts["address"] = address
    else:
        opts["num_cpus"] = LOCAL_CPUS
    opts.update(init)
    try:
        ray.init(**opts)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise UserError(f"cannot connect to {where}: {first_line(e)}") from None
    return True


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS frame


def reachable(address: str, timeout: float = 5.0) -> None:
    """UserError at once when a ``HOST:PORT`` address does not answer (Ray itself retries for minutes): it
    must accept a connection and answer the HTTP/2 preface of a gRPC client (Ray's GCS is a gRPC server) with
    a frame, within ``timeout`` seconds each; a port that accepts and never answers is refused too. Other
    forms (``auto``, ``ray://...``) are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    hint = "start it with `ray start --head` there, or leave out --address for a local instance"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(HTTP2_PREFACE)
            answer = conn.recv(9)  # a frame header; a gRPC server sends its SETTINGS
    except socket.timeout:
        raise UserError(f"the Ray cluster at {address} accepted a connection but did not answer within "
                        f"{timeout:g} s (not a Ray head?); {hint}") from None
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}; {hint}") from None
    if len(answer) < 4 or answer[3] != 4:
        raise UserError(f"{address} answered, but not as a Ray head (gRPC) does; {hint}")


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install 'retrieval-heads[ray]'") from None
    return ray


def run_ray_sweep(
    grid: Grid,
    output_dir: str | Path,
    address: str | None = None,
    gpus_per_worker: float = 0,
    cpus_per_worker: int = 1,
    device_map: str | None = None,
    echo: Callable[[str], None] | None = None,
    check_models: bool = True,
    worker: type = ModelWorker,
    retries: int = RETRIES,
) -> SweepSummary:
    """Run ``grid`` into ``output_dir`` on Ray: the same files as :func:`~retrieval_heads.sweep.run_sweep`.
    ``worker`` is the actor class (a :class:`ModelWorker`); ``retries`` bounds actor restarts and unit
    retries."""
    spec.check("gpus_per_worker", gpus_per_worker)
    spec.check("cpus_per_worker", cpus_per_worker)
    if gpus_per_worker > 0 and grid.device == "cpu" and not device_map:
        raise UserError("--gpus-per-worker needs --device cuda (or --device-map auto) to use the GPUs")
    if gpus_per_worker == 0 and grid.device.startswith("cuda"):
        raise UserError(f"--device {grid.device} with --engine ray needs --gpus-per-worker 1 or more (Ray hides "
                        f"the GPUs from workers that asked for none)")
    ray = import_ray()
    if address:
        reachable(address)  # before the output dir is made
    t0 = time.perf_counter()
    say = echo or (lambda s: print(s, flush=True))
    # a private local instance runs the workers here: its device must be this machine's; a cluster's workers
    # check theirs when they load the model
    with prepare(grid, output_dir, say, check_models, device_here=not address, where=" on Ray") as p:
        summary = p.summary
        if p.todo:
            started = connect(address)
            try:
                _dispatch(ray, grid, output_dir, p.units, p.statuses, gpus_per_worker, cpus_per_worker, device_map,
                          worker, retries, say, summary)
            finally:
                if started:
                    ray.shutdown()
    summary.seconds = time.perf_counter() - t0
    return summary


def _dispatch(ray, grid, output_dir, units, statuses, gpus, cpus, device_map, worker, retries, say, summary):
    """Send every unit with work to its model's actor; write each unit's results as soon as it is back.
    Ray gives an actor ``cpus`` CPUs (and as many torch threads: it sets OMP_NUM_THREADS) and ``gpus`` GPUs."""
    actor_cls = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=retries, max_task_retries=retries)(worker)
    actors: dict[str, Any] = {}
    pending: dict[Any, tuple[Unit, Any]] = {}
    left: dict[str, int] = {}
    for unit, st in zip(units, statuses):
        if not st.todo:
            continue
        if st.model_key not in actors:
            actors[st.model_key] = actor_cls.remote(unit.model, grid, device_map)
        pending[actors[st.model_key].compute.remote(unit, st.todo)] = (unit, st)
        left[st.model_key] = left.get(st.model_key, 0) + 1
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            unit, st = pending.pop(ref)
            payloads, seconds = _get(ray, ref, retries, f"{st.model_key} at {unit.tokens} tokens, depth {unit.depth:g}")
            for p in payloads:
                e = (p.record["method"], p.record["question"])
                path = write(output_dir, p.result(), grid.save_samples)
                say(outcome_line(st, e, unit, grid, p.record, seconds))
                (summary.recomputed if st.state[e] == "corrupt" else summary.done).append(path)
            left[st.model_key] -= 1
            if not left[st.model_key]:  # its model's last unit: free the worker (and its GPUs) for the others
                ray.kill(actors.pop(st.model_key))
    finally:
        for a in actors.values():
            ray.kill(a)


def _get(ray, ref, retries: int, what: str):
    """``ray.get``; a worker's error becomes one line: a UserError as itself, anything else named with its
    unit (the remote traceback is in the Ray worker's log)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise cause from None  # itself: a ParamError keeps its parameter
        first = first_line(cause, default="") if cause is not None else ""
        raise UserError(f"the Ray worker failed on {what}: {type(cause or e).__name__}: {first}") from None
    except ray.exceptions.ActorDiedError as e:
        raise UserError(f"the Ray worker for {what} died {1 + retries} times; giving up: {first_line(e)}") from None
