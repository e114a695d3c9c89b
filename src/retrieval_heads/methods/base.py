"""What scoring methods share: the method contract, the registry, and needle mass measured through the probe."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Sequence

import torch

from .. import spec
from ..capture import attention_probe
from ..data.prompt import PromptFormat, PromptSample
from ..hf import check_finite
from ..registry import Registry


@dataclass(frozen=True)
class MethodContext:
    """What a method may need beyond the model and the batch. A method names the fields it reads in
    :attr:`Method.needs`; the caller fills those (the others may stay None)."""

    tokenizer: Any = None  # the model's tokenizer
    prompt_format: PromptFormat | None = None  # the prompt format of that tokenizer (rebuilds a prompt's suffix)
    answers: Sequence | None = None  # the model's greedy answers (generation.Answer), one per prompt of the batch


CONTEXT_FIELDS = frozenset(f.name for f in fields(MethodContext))

SPAN_KINDS = spec.SPAN_KINDS  # what a span-measuring method can score, each its own result


def span_result_name(name: str, span: str) -> str:
    """The result name of a span kind: the method's own for ``needle`` (the original method's span),
    ``{name}+{span}`` else (e.g. ``summed_attention+answer``; the method folder has the same name)."""
    return name if span == "needle" else f"{name}+{span}"


@dataclass(frozen=True)
class RowReads:
    """What a method reads of one prompt suffix in a shared context pass (:func:`retrieval_heads.prefill.shared_reads`):
    the mean of its own query rows (:meth:`Method.row_span`) against the context's keys."""

    mass: dict[str, torch.Tensor]  # span name ("needle", ...) -> (B, L, H) attention mass on that span
    keys: torch.Tensor | None = None  # (B, L, H, P) attention on needle token j (key needle_start + j), 0 past its end


class Method(ABC):
    """A scoring method: per-sample scores (B, layers, heads) of a batch of equal-length prompts.

    ``name`` is its registry key; ``needs`` the :class:`MethodContext` fields :meth:`score_batch` reads
    (``answers`` are decoded with ``track_argmax``); ``success_only`` marks a method whose scores already
    count only the samples the model answers correctly.

    A method that can also be scored from one context pass shared with other methods and questions
    (:mod:`retrieval_heads.onepass`) sets ``shared`` and says what it reads there: :meth:`row_span`, the
    prompt rows whose mean attention it reads (None: no rows, e.g. a method that reads the answers only);
    ``reads_null``, the same rows of the content-free question "N/A" over the same context too;
    ``reads_needle_keys``, the attention on each needle token and not only the mass on spans. Its
    :meth:`from_reads` must equal :meth:`score_batch` (float tolerance), which stays the reference.

    What results a method gives: by default one, named after the method (``{name}_success`` when only
    correctly answered samples count, :meth:`result_name`). A method that sets ``measures_spans`` scores the
    attention mass of its rows (:meth:`row_span`) on spans of the prompt: the shared pass (or
    :func:`retrieval_heads.onepass.measure_spans`) measures every span of
    :func:`retrieval_heads.chance.prompt_spans` with its chance baseline, and the method gives one result per
    span kind the experiment asks for (:data:`SPAN_KINDS`; :meth:`result_names`), each with a chance
    baseline, lift and a test against a control span. Its :meth:`score_batch` is the needle's mass.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    success_only: ClassVar[bool] = False
    shared: ClassVar[bool] = False
    reads_null: ClassVar[bool] = False
    reads_needle_keys: ClassVar[bool] = False
    measures_spans: ClassVar[bool] = False

    def result_spans(self, spans: Sequence[str]) -> tuple[str, ...]:
        """The span kinds among ``spans`` (an experiment's ``span`` setting) this method gives a result for:
        all of them for a method that ``measures_spans``, else the needle alone."""
        return tuple(spans) if self.measures_spans else ("needle",)

    def result_name(self, success_only: bool = False) -> str:
        """The name the method's result is written under: ``{name}_success`` with ``success_only`` (only
        correctly answered samples counted), unless the method counts only those anyway."""
        return f"{self.name}_success" if success_only and not self.success_only else self.name

    def result_names(self, spans: Sequence[str] = ("needle",), success_only: bool = False) -> list[str]:
        """Every result this method gives in an experiment: one per span kind of :meth:`result_spans`.

        >>> METHODS.get("summed_attention").result_names(["needle", "answer"])
        ['summed_attention', 'summed_attention+answer']
        """
        return [span_result_name(self.result_name(success_only), sp) for sp in self.result_spans(spans)]

    def row_span(self, fmt: PromptFormat, p: PromptSample) -> tuple[int, int] | None:
        """[start, end): the rows of prompt ``p`` (all after its shared context) whose mean a shared pass reads."""
        return None

    def from_reads(self, model, real: RowReads | None, null: RowReads | None, batch: Sequence[PromptSample],
                   ctx: MethodContext) -> torch.Tensor:
        """Per-sample scores (B, L, H) from a shared pass's reads of the prompts' rows and (with
        ``reads_null``) of the content-free question's; only for a ``shared`` method."""
        raise NotImplementedError(f"method {self.name!r} has no shared-pass path")

    @abstractmethod
    def score_batch(self, model, batch: Sequence[PromptSample], ctx: MethodContext | None = None) -> torch.Tensor:
        """Per-sample scores (B, layers, heads) of a batch of equal-length prompts, on the model's device."""

    def check_context(self, ctx: MethodContext | None) -> MethodContext:
        """``ctx`` if it holds every field in ``needs``; else ValueError naming the missing ones."""
        ctx = ctx if ctx is not None else MethodContext()
        missing = sorted(n for n in self.needs if getattr(ctx, n) is None)
        if missing:
            raise ValueError(f"method {self.name!r} needs {', '.join(missing)} in its MethodContext")
        return ctx


METHODS: Registry[Method] = Registry("method")


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` under its name (ValueError on a name already taken, or a method that
    does not follow the contract)."""
    if not isinstance(method, Method):
        raise TypeError(f"{method!r} is not a Method")
    if not isinstance(method.needs, frozenset) or not method.needs <= CONTEXT_FIELDS:
        raise ValueError(f"method {method.name!r}: needs must be a frozenset of {sorted(CONTEXT_FIELDS)}, "
                         f"got {method.needs!r}")
    METHODS.register(method.name, method)
    return method


def unregister(name: str) -> Method:
    """Remove the method ``name`` from :data:`METHODS` (KeyError if none is registered) and return it."""
    return METHODS.unregister(name)


NULL_QUESTION = "N/A"  # the content-free question that calibrating methods ask over the same context


def null_prompt(fmt: PromptFormat, p: PromptSample, question: str = NULL_QUESTION) -> PromptSample:
    """The same prompt with the content-free question: ids up to ``context_end`` kept, the suffix rebuilt."""
    q0, q1 = fmt.question_span(question)
    ids = p.input_ids[: p.context_end] + fmt.suffix(question)
    return replace(p, input_ids=ids, question=question, question_start=p.context_end + q0,
                   question_end=p.context_end + q1)


def span_mask(batch: Sequence[PromptSample], device) -> torch.Tensor:
    """(B, N) float mask of the needle span of each prompt."""
    n = len(batch[0].input_ids)
    m = torch.zeros(len(batch), n, device=device)
    for i, s in enumerate(batch):
        m[i, s.needle_start : s.needle_end] = 1.0
    return m


def batches(prompts: Sequence[PromptSample], batch_size: int) -> list[list[int]]:
    """Indices of prompts, grouped by length (no padding needed) and cut into batches, in first-seen order."""
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p.input_ids), []).append(i)
    return [idx[j : j + batch_size] for idx in by_len.values() for j in range(0, len(idx), batch_size)]


def stack_ids(batch: Sequence[PromptSample], device) -> torch.Tensor:
    lengths = {len(s.input_ids) for s in batch}
    if len(lengths) != 1:
        raise ValueError(f"a batch must hold prompts of one length, got {sorted(lengths)}")
    return torch.tensor([s.input_ids for s in batch], device=device)  # (B, N)


@torch.no_grad()
def needle_mass(
    model, input_ids: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor | None = None, **forward_kwargs
) -> torch.Tensor:
    """Attention mass that the query rows ``positions`` (default: the last) put on the keys in ``key_mask``.

    input_ids (B, N); key_mask (B, N). Returns (B, L, H, S) on the model's device. One forward pass with
    ``use_cache=False`` and ``logits_to_keep=1``; nothing leaves the device. Raises NumericalError naming the
    first layer whose attention is not finite (e.g. float16 overflow), and UserError when a layer did not
    report exactly once (its attention bypasses the probe).
    """
    cfg = model.config.get_text_config()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    B = input_ids.shape[0]
    S = 1 if positions is None else positions.numel()
    out = torch.zeros(B, L, H, S, device=input_ids.device)  # (B, L, H, S)
    weights = key_mask.float()[:, None, None, :]  # (B, 1, 1, N)

    def on_layer(layer: int, probs: torch.Tensor) -> None:  # probs: (B, H, S, N)
        out[:, layer] = (probs * weights[..., : probs.shape[-1]].to(probs.device)).sum(-1).to(out.device)

    with attention_probe(model, on_layer, query_positions=positions) as probe:
        result = model(input_ids=input_ids, use_cache=False, logits_to_keep=1, **forward_kwargs)
        probe.end_pass(model)  # every layer reported exactly once
    check_finite(out, result.logits)
    return out


@torch.no_grad()
def span_masses(
    model, input_ids: torch.Tensor, key_masks: torch.Tensor, positions: torch.Tensor | None = None,
    **forward_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mass that the query rows ``positions`` (default: the last) put on each of M key spans, and
    each span's chance baseline, from one forward pass.

    input_ids (B, N); key_masks (B, M, N) 0/1. Returns (mass, baseline), both (B, L, H, S, M) on the model's
    device: ``mass`` is what the probe's rows put on the span; ``baseline`` is what a row spreading its
    attention evenly over the keys it may see would put there, |span ∩ visible| / |visible|, with the
    visible keys taken from the very mask the probe applies (causal, sliding windows, padding).
    """
    cfg = model.config.get_text_config()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    B, M, _ = key_masks.shape
    S = 1 if positions is None else positions.numel()
    mass = torch.zeros(B, L, H, S, M, device=input_ids.device)  # (B, L, H, S, M)
    baseline = torch.zeros(B, L, H, S, M, device=input_ids.device)  # (B, L, H, S, M)
    weights = key_masks.float()[:, None, None]  # (B, 1, 1, M, N)

    def on_layer(layer: int, probs: torch.Tensor) -> None:  # probs: (B, H, S, K)
        w = weights[..., : probs.shape[-1]].to(probs.device)  # (B, 1, 1, M, K)
        # the same product and sum as needle_mass, one span at a time: bit-identical to it
        mass[:, layer] = (probs[..., None, :] * w).sum(-1).to(mass.device)  # (B, H, S, M)

    def on_visible(layer: int, allowed: torch.Tensor) -> None:  # allowed: (B, 1 or H, S, K)
        a = allowed.double()[..., None, :]  # (B, 1 or H, S, 1, K)
        w = weights[..., : a.shape[-1]].to(a.device).double()  # (B, 1, 1, M, K)
        share = (a * w).sum(-1) / a.sum(-1).clamp(min=1)  # (B, 1 or H, S, M), exact counts
        baseline[:, layer] = share.expand(B, H, S, M).to(baseline.device, baseline.dtype)

    with attention_probe(model, on_layer, query_positions=positions, on_visible=on_visible) as probe:
        result = model(input_ids=input_ids, use_cache=False, logits_to_keep=1, **forward_kwargs)
        probe.end_pass(model)  # every layer reported exactly once
    check_finite(mass, result.logits)
    return mass, baseline


