"""Saved attention rows: the last prompt token's attention over the whole prompt, for an experiment's top heads.

``detect --save-attention K`` (and ``sweep --save-attention K``) write, beside each result
``{model}_{question}_{tokens}.json``, a file ``{model}_{question}_{tokens}.attention.npz`` holding, for every
sample, the attention row of the last prompt token of the result's top-K heads (by the result's own final
ranking) over every position of the prompt, with the prompt's token ids, each distinct token's text, and the
needle's and the answer's spans. The report's explorer shows them.

How the rows are captured (:mod:`retrieval_heads.attention_capture`): the ranking is known only once every
sample is scored, so the rows come from one extra probed forward pass per sample after ranking, on the very
ids that were scored, through the same exact probe (:mod:`retrieval_heads.capture`). Keeping every head's row during the
scoring pass instead would cost O(samples x layers x heads x N) memory (4.4 GB in float32 for Llama-3-8B at
8K with 131 samples) against O(layers x heads x N) for one more pass; the extra pass costs one prefill per
sample and only when asked for. With several methods (or span kinds, or a sweep unit's results), one pass per
prompt serves the union of their top heads.

This module is the file format only (numpy): reading a saved file (the report) imports no torch.

Storage: each row is quantised to 8 bits with its own scale, ``q = round(p / s)`` with ``s = max(p) / 255``,
so a stored value is within ``s / 2`` of the probe's (the quantisation step is ``s``; tested). The file is
a deflated zip of ``.npy`` arrays (numpy's ``.npz``, written with fixed timestamps, so the
same rows give the same bytes):

===================  ==========  ===========================================================================
array                dtype       shape / meaning
===================  ==========  ===========================================================================
``meta``             uint8       UTF-8 JSON: format, the result's checksum, method, model, question, tokens,
                                 needle position, seed, head names
``heads``            int32       (K, 2): layer, head of each saved head, best first
``offsets``          int64       (S + 1,): sample s holds positions ``offsets[s]:offsets[s+1]`` of the axis T
``ids``              int32       (T,): the prompts' token ids, concatenated
``rows``             uint8       (K, T): quantised attention of each head, samples concatenated
``scale``            float32     (S, K): the scale ``s`` of each sample's row of each head
``spans``            int64       (S, 4): needle start, end, answer start, end (end exclusive; -1 when no answer
                                 span is found in the needle)
``vocab_ids``        int32       (V,): every distinct id of ``ids``, sorted
``vocab_offsets``    int64       (V + 1,): token ``vocab_ids[v]`` reads ``vocab_text[vocab_offsets[v]:...]``
``vocab_text``       uint8       (B,): the tokens' texts, UTF-8, concatenated
===================  ==========  ===========================================================================

A token's text is ``tokenizer.decode([id])`` (SentencePiece's word-start marker restored as a space); a
byte-level token that holds part of a multi-byte character shows as U+FFFD.

Size: about ``(K + 4) * T`` bytes plus the distinct tokens' texts; for the default sweep grid see docs/sweeps.md.

Reading (:func:`load`) treats the file as untrusted: no pickles, only the arrays above with their dtypes,
a cap on the unpacked size, and every offset, span and id checked; anything else is one UserError.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .errors import UserError
from .io import atomic_write_bytes, read_regular
from .results import head_name, parse_head

if TYPE_CHECKING:
    import torch

    from .data.prompt import PromptSample

FORMAT = "retrieval-heads attention rows 1"
LEVELS = 255
MAX_UNPACKED = 1 << 31  # 2 GiB: far above the default sweep grid (a few MB per file); a zip bomb stops here
ARRAYS = {"meta": np.uint8, "heads": np.int32, "offsets": np.int64, "ids": np.int32, "rows": np.uint8,
          "scale": np.float32, "spans": np.int64, "vocab_ids": np.int32, "vocab_offsets": np.int64,
          "vocab_text": np.uint8}


def attention_path(result: str | Path) -> Path:
    """The attention file beside a result JSON."""
    return Path(result).with_suffix(".attention.npz")


def top_heads(record: dict, k: int) -> list[tuple[int, int]]:
    """The result's top ``k`` heads as (layer, head), by its own final ranking."""
    return [parse_head(r["head"]) for r in record["head_rankings"][:k]]


def quantize(rows: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rows (..., N) of non-negative values -> (uint8 codes (..., N), float32 scale (...)): ``q = round(p / s)``,
    ``s = max(p) / 255`` (a row of zeros gets scale 0)."""
    p = np.asarray(rows, dtype=np.float64)
    s = p.max(axis=-1) / LEVELS  # (...)
    safe = np.where(s > 0, s, 1.0)
    q = np.clip(np.rint(p / safe[..., None]), 0, LEVELS).astype(np.uint8)
    return q, s.astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[..., None]


def token_texts(tokenizer, ids: Sequence[int]) -> dict[int, str]:
    """The display text of each distinct id (see the module's docstring)."""
    uniq = sorted(set(int(i) for i in ids))
    pieces = tokenizer.convert_ids_to_tokens(uniq)
    out = {}
    for i, piece in zip(uniq, pieces):
        text = tokenizer.decode([i])
        if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        out[i] = text
    return out


def answer_span(tokenizer, prompt: PromptSample) -> tuple[int, int] | None:
    from .data.spans import gold_span

    return gold_span(tokenizer, prompt) if prompt.answer else None


def pack(record: dict, prompts: Sequence[PromptSample], rows: Sequence[torch.Tensor], tokenizer) -> bytes:
    """The attention file of one result: ``rows`` (one (K, N) tensor per prompt, the result's top-K heads
    in ranking order) with the prompts' tokens and spans. Same inputs, same bytes."""
    K = int(rows[0].shape[0]) if rows else 0
    heads = top_heads(record, K)
    lengths = [len(p.input_ids) for p in prompts]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.asarray([i for p in prompts for i in p.input_ids], dtype=np.int32)
    # one scale per sample and head: each sample's part of the axis is quantised on its own
    codes = np.zeros((K, len(ids)), dtype=np.uint8)
    scales = np.zeros((len(prompts), K), dtype=np.float32)
    for s, r in enumerate(rows):
        codes[:, offsets[s]:offsets[s + 1]], scales[s] = quantize(r.numpy())
    spans = np.full((len(prompts), 4), -1, dtype=np.int64)
    for s, p in enumerate(prompts):
        spans[s, :2] = p.needle_start, p.needle_end
        a = answer_span(tokenizer, p)
        if a is not None:
            spans[s, 2:] = a
    texts = token_texts(tokenizer, ids.tolist())
    vocab_ids = np.asarray(sorted(texts), dtype=np.int32)
    encoded = [texts[int(i)].encode("utf-8") for i in vocab_ids]
    vocab_offsets = np.concatenate([[0], np.cumsum([len(b) for b in encoded])]).astype(np.int64)
    meta = {"format": FORMAT, "result_checksum": record.get("checksum"), "method": record["method"],
            "model_key": record["model_key"], "question": record["question"],
            "total_tokens": record["total_tokens"], "needle_position": record["needle_position"],
            "seed": record.get("seed"), "heads": [head_name(l, h) for l, h in heads]}
    arrays = {
        "meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8),
        "heads": np.asarray(heads, dtype=np.int32).reshape(K, 2), "offsets": offsets, "ids": ids,
        "rows": codes, "scale": scales, "spans": spans, "vocab_ids": vocab_ids, "vocab_offsets": vocab_offsets,
        "vocab_text": np.frombuffer(b"".join(encoded), dtype=np.uint8),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr, dtype=ARRAYS[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, member.getvalue())
    return buf.getvalue()


def save(path: str | Path, data: bytes) -> Path:
    atomic_write_bytes(path, data)
    return Path(path)


@dataclass
class SavedAttention:
    """A loaded attention file (arrays as in the module's docstring)."""

    meta: dict
    heads: list[str]
    offsets: np.ndarray
    ids: np.ndarray
    rows: np.ndarray
    scale: np.ndarray
    spans: np.ndarray
    vocab: dict[int, str]

    @property
    def samples(self) -> int:
        return len(self.offsets) - 1

    def row(self, sample: int, k: int) -> np.ndarray:
        """Dequantised row (N,) of saved head ``k`` on ``sample``."""
        a, b = self.offsets[sample], self.offsets[sample + 1]
        return self.rows[k, a:b].astype(np.float32) * self.scale[sample, k]

    def sample_ids(self, sample: int) -> np.ndarray:
        return self.ids[self.offsets[sample]:self.offsets[sample + 1]]


def load(path: str | Path, record: dict | None = None) -> SavedAttention:
    """Read and check an attention file; UserError (naming the file) for anything malformed. With the
    ``record`` of its result, arrays larger than its samples and tokens allow are refused before they are
    read."""
    path = Path(path)
    try:
        data = read_regular(path)
    except OSError as e:
        raise UserError(f"cannot read attention file {path}: {e.strerror or e}") from None
    return loads(data, str(path), record)


def _header(f, info) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype in a member's ``.npy`` header; ValueError unless they account for exactly the
    member's size (so that no array is allocated larger than its bytes)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"npy version {version}")
    header = f.tell()
    if dtype.hasobject or fortran or math.prod(shape) * dtype.itemsize != info.file_size - header:
        raise ValueError(f"{info.filename} header claims shape {shape} in {info.file_size - header} bytes")
    return shape, dtype


def _limits(shapes: dict, record: dict) -> str | None:
    """Why the arrays' shapes exceed what ``record`` (the result) allows, before they are read."""
    S, N = record.get("samples_processed"), record.get("total_tokens")
    L, H = record.get("num_layers"), record.get("num_heads")
    if not all(isinstance(x, int) for x in (S, N, L, H)):
        return None
    T, K = shapes["ids"][0] if shapes["ids"] else 0, shapes["heads"][0] if shapes["heads"] else 0
    if shapes["offsets"] != (S + 1,):
        return f"{max(0, (shapes['offsets'] or (1,))[0] - 1)} samples, the result has {S}"
    if T > S * N:
        return f"{T} tokens, more than the result's {S} samples of {N} tokens"
    if K > L * H:
        return f"{K} heads, more than the result's {L}x{H}"
    return None


MAX_META = 1 << 20


def _meta(arr: np.ndarray, bad) -> dict:
    from .io import parse_json

    try:
        meta = parse_json(arr.tobytes())
    except UserError as e:
        raise bad(f"meta: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("heads"), list):
        raise bad("unknown format")
    return meta


def _unread(meta: dict) -> SavedAttention:
    """A file whose arrays were not read (made for another result): its meta alone, no samples."""
    return SavedAttention(meta, [str(h) for h in meta["heads"]], np.zeros(1, np.int64), np.zeros(0, np.int32),
                          np.zeros((0, 0), np.uint8), np.zeros((0, 0), np.float32), np.zeros((0, 4), np.int64), {})


def loads(data: bytes, where: str = "attention file", record: dict | None = None) -> SavedAttention:
    """Check and unpack an attention file's bytes (see :func:`load`); with ``record``, a file made for
    another result (its checksum differs) comes back unread, with its meta only."""
    def bad(why: str) -> UserError:
        return UserError(f"{where}: not a valid attention file ({why})")

    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            names = sorted(i.filename for i in infos)
            if names != sorted(f"{n}.npy" for n in ARRAYS):
                raise bad(f"members {', '.join(names[:12])}")
            if sum(i.file_size for i in infos) > MAX_UNPACKED:
                raise bad("unpacks to more than 2 GiB")
            shapes = {}
            for info in infos:  # every header first: shapes are checked before any array is allocated
                name = info.filename[:-4]
                with z.open(info) as f:
                    shapes[name], dtype = _header(f, info)
                if dtype != np.dtype(ARRAYS[name]):
                    raise bad(f"{name} has dtype {dtype}")
            if shapes["meta"][0] > MAX_META:
                raise bad("meta is larger than 1 MiB")
            with z.open("meta.npy") as f:
                meta = _meta(np.lib.format.read_array(f, allow_pickle=False), bad)
            if record is not None and meta.get("result_checksum") != record.get("checksum"):
                return _unread(meta)  # another result's file (check_matches says so): its arrays are not read
            why = _limits(shapes, record) if record is not None else None
            if why:
                raise bad(why)
            for info in infos:
                name = info.filename[:-4]
                with z.open(info) as f:
                    arr = np.lib.format.read_array(f, allow_pickle=False)
                arrays[name] = arr
    except UserError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, NotImplementedError, RuntimeError,
            MemoryError) as e:
        raise bad(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    heads, offsets, ids, rows = arrays["heads"], arrays["offsets"], arrays["ids"], arrays["rows"]
    scale, spans = arrays["scale"], arrays["spans"]
    K = len(meta["heads"])
    if heads.shape != (K, 2) or [head_name(int(l), int(h)) for l, h in heads] != meta["heads"]:
        raise bad("heads do not match their names")
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or np.any(np.diff(offsets) <= 0):
        raise bad("offsets")
    S, T = len(offsets) - 1, int(offsets[-1])
    if ids.shape != (T,) or rows.shape != (K, T) or scale.shape != (S, K) or spans.shape != (S, 4):
        raise bad("array shapes disagree")
    if not np.all(np.isfinite(scale)) or np.any(scale < 0):
        raise bad("scales")
    lengths = np.diff(offsets)
    ns, ne, as_, ae = spans.T
    if np.any(ns < 0) or np.any(ne <= ns) or np.any(ne > lengths):
        raise bad("needle spans")
    none = (as_ == -1) & (ae == -1)
    if np.any(~none & ((as_ < 0) | (ae <= as_) | (ae > lengths))):
        raise bad("answer spans")
    vids, voff, vtext = arrays["vocab_ids"], arrays["vocab_offsets"], arrays["vocab_text"]
    if (vids.ndim != 1 or voff.shape != (len(vids) + 1,) or voff[0] != 0 or np.any(np.diff(voff) < 0)
            or voff[-1] != len(vtext) or np.any(np.diff(vids) <= 0)):
        raise bad("token table")
    if T and not np.all(np.isin(ids, vids)):
        raise bad("a token id has no text")
    raw = vtext.tobytes()
    try:
        vocab = {int(i): raw[voff[v]:voff[v + 1]].decode("utf-8") for v, i in enumerate(vids)}
    except UnicodeDecodeError:
        raise bad("token text is not UTF-8") from None
    return SavedAttention(meta, list(meta["heads"]), offsets, ids, rows, scale, spans, vocab)


def check_matches(saved: SavedAttention, record: dict) -> str | None:
    """Why ``saved`` does not belong to ``record`` (None when it does): it must carry the result's checksum
    and name the same experiment, and its samples must be the result's."""
    m = saved.meta
    if m.get("result_checksum") != record.get("checksum"):
        return "made for another result (checksum differs; stale file?)"
    for k in ("method", "model_key", "question", "total_tokens"):
        if m.get(k) != record.get(k):
            return f"its {k} {m.get(k)!r} is not the result's {record.get(k)!r}"
    if saved.samples != record.get("samples_processed"):
        return f"{saved.samples} samples, the result has {record.get('samples_processed')}"
    longest = int(np.diff(saved.offsets).max(initial=0))
    if longest > record.get("total_tokens", 0):
        return f"a prompt of {longest} tokens, the result's are {record.get('total_tokens')}"
    L, H = record["num_layers"], record["num_heads"]
    for name in saved.heads:
        layer, head = parse_head(name)
        if not (0 <= layer < L and 0 <= head < H):
            return f"head {name} is outside the result's {L}x{H} grid"
    return None
