"""The report's explorer: click a head in a heatmap, see where its last-token attention falls in the prompt.

Data: the ``.attention.npz`` files beside the results (``--save-attention K``; see
:mod:`retrieval_heads.attention`). Each is checked against its result (checksum, experiment, samples, head
grid): a malformed file stops the report; one made for another result is left out with a note.

Everything goes into report.html itself (no network): one ``<script type="application/json">`` block with

- ``experiments``: per result (in the report's order, the heatmaps' ``data-exp`` index) its labels, model,
  question, tokens, needle depth, head grid, scores (4 significant digits) and, where saved, ``saved``:
  the saved heads and per sample the prompt's index, needle and answer spans, and each head's row as
  base64 uint8 codes with their scale (value = code x scale);
- ``prompts``: each distinct prompt as base64 indices (uint16 or uint32, little-endian) into ``strings``;
- ``strings``: each distinct token text once.

and the page's script (``explorer.js``, package data) renders the panel. Token texts are only ever set as
text (``textContent``), never parsed as HTML; the JSON is escaped so it cannot close its script element.
"""

from __future__ import annotations

import base64
import json
from importlib import resources

import numpy as np

from ..attention import attention_path, check_matches, load
from ..results import parse_head
from .collect import Collection, Experiment

NO_ROWS = "no attention rows saved (run detect or sweep with --save-attention K)"


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()).decode("ascii")


def _ranks(e: Experiment) -> list[int]:
    """Each head's rank in the result's own ranking (1 = best), flat index layer * heads + head."""
    L, H = e.shape
    out = [0] * (L * H)
    for r, name in enumerate(e.ranked, 1):
        layer, head = parse_head(name)
        if 0 <= layer < L and 0 <= head < H:
            out[layer * H + head] = r
    return out


def label(e: Experiment) -> str:
    return f"{e.method} · {e.model} · {e.question} · {e.tokens} tokens · depth {e.depth:g}"


def option_label(e: Experiment) -> str:
    """The experiment drop-down's text: what tells the experiments apart first (question, length, depth),
    so that a narrow select cuts off the model and method, never the depth."""
    return f"{e.question} · {e.tokens} tokens · depth {e.depth:g} · {e.model} · {e.method}"


def payload(col: Collection) -> tuple[dict, list[dict], list[str]]:
    """(the embedded data, one summary entry per experiment for report.json, notes)."""
    strings: dict[str, int] = {}
    prompts: dict[bytes, int] = {}
    prompt_list: list[np.ndarray] = []
    exps, summary, notes = [], [], []
    for i, e in enumerate(col.experiments):
        L, H = e.shape
        entry: dict = {"label": label(e), "option": option_label(e), "method": e.method, "model": e.model, "question": e.question,
                       "tokens": e.tokens, "depth": e.record["needle_position"], "layers": L, "heads": H,
                       "scores": [_sig(float(x)) for x in e.scores.ravel()], "ranked": e.ranked[:20],
                       "rank": _ranks(e),
                       "samples_processed": e.record["samples_processed"]}
        path = attention_path(e.path)
        rel = attention_path(e.rel).as_posix()
        if not path.exists():
            entry["why"] = NO_ROWS
            summary.append({"index": i, "file": None})
            exps.append(entry)
            continue
        saved = load(path, e.record)  # sizes checked against the result before reading
        why = check_matches(saved, e.record)
        if why:
            entry["why"] = f"attention file {rel} not used: {why}"
            notes.append(f"{e.method} · {e.title}: `{rel}` not used in the explorer, {why}.")
            summary.append({"index": i, "file": rel, "skipped": why})
            exps.append(entry)
            continue
        samples = []
        for s in range(saved.samples):
            idx = np.asarray([strings.setdefault(saved.vocab[int(t)], len(strings)) for t in saved.sample_ids(s)],
                             dtype=np.uint32)
            key = idx.tobytes()
            if key not in prompts:
                prompts[key] = len(prompt_list)
                prompt_list.append(idx)
            a, b = saved.offsets[s], saved.offsets[s + 1]
            ns, ne, as_, ae = (int(x) for x in saved.spans[s])
            samples.append({"prompt": prompts[key], "needle": [ns, ne], "answer": [as_, ae] if as_ >= 0 else None,
                            "rows": [_b64(saved.rows[k, a:b]) for k in range(len(saved.heads))],
                            "scale": [float(x) for x in saved.scale[s]]})
        entry["saved"] = {"heads": saved.heads, "samples": samples}
        summary.append({"index": i, "file": rel, "heads": saved.heads, "samples": saved.samples})
        exps.append(entry)
    wide = len(strings) > 0xFFFF
    data = {"experiments": exps, "strings": list(strings),
            "prompt_dtype": "uint32" if wide else "uint16",
            "prompts": [_b64(p if wide else p.astype(np.uint16)) for p in prompt_list]}
    return data, summary, notes


def script() -> str:
    return resources.files(__package__).joinpath("explorer.js").read_text(encoding="utf-8")


def embed_json(data: dict) -> str:
    """JSON safe inside <script type="application/json">: no '<', '>' or '&' (escaped as \\u003c ...)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


INTRO = ("Click a head in any heatmap (the grid above or one per experiment below) to see, for a chosen sample, "
         "the prompt with each token shaded by the attention of the last prompt token in that head, the needle "
         "and the answer marked, and the attention over positions as a line; the experiment, head and sample "
         "can be switched in the panel. Rows are shown for the heads saved with `--save-attention K` "
         "(the experiment's top K); {n} of {m} experiment(s) have them.")

PANEL = """
<div id="rh-explorer" class="rh-panel" hidden>
 <div class="rh-bar">
  <strong>Explorer</strong>
  <label>experiment <select id="rh-exp"></select></label>
  <label>head <select id="rh-head"></select></label>
  <label>sample <select id="rh-sample"></select></label>
  <label title="scale the shading and the plot to the row's largest value past the first token (the attention sink)"><input type="checkbox" id="rh-sink" checked> scale past 1st token</label>
  <span>go to <button type="button" id="rh-go-needle">needle</button> <button type="button" id="rh-go-answer">answer</button> <button type="button" id="rh-go-mass" title="the 32 tokens with the most attention">mass</button></span>
  <button type="button" id="rh-close" title="close">&#x2715;</button>
 </div>
 <div class="rh-info"><span id="rh-msg"></span><span class="rh-legend"><span>0</span><span class="rh-ramp"></span><span id="rh-max"></span><span class="rh-key rh-needle">needle</span><span class="rh-key rh-answer">answer</span></span></div>
 <div class="rh-plotbox"><div class="rh-yaxis" title="attention of the last prompt token"><span id="rh-ymax"></span><span class="rh-yname">attention</span><span>0</span></div>
 <svg id="rh-plot" viewBox="0 0 1000 80" preserveAspectRatio="none" aria-label="attention over position"></svg></div>
 <div id="rh-xaxis" class="rh-xaxis"></div>
 <div id="rh-text" class="rh-text"></div>
</div>
"""

CSS = """
.rh-hm { position: relative; display: inline-block; line-height: 0; }
.rh-hit { position: absolute; cursor: crosshair; }
.rh-hit:hover { outline: 1px dashed rgba(255,255,255,.6); }
.rh-sel { position: absolute; border: 2px solid #ff2d55; pointer-events: none; box-sizing: border-box; }
.rh-panel { position: fixed; left: 0; right: 0; bottom: 0; height: 56vh; background: #fff; z-index: 10;
            border-top: 3px solid #0969da; box-shadow: 0 -4px 16px rgba(0,0,0,.15); display: flex;
            flex-direction: column; font-size: 13px; }
.rh-panel[hidden] { display: none; }
.rh-bar { display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center; padding: 6px 12px;
          background: #f6f8fa; border-bottom: 1px solid #d0d7de; }
.rh-bar select { max-width: min(620px, 92vw); }
#rh-close { margin-left: auto; }
.rh-info { padding: 3px 12px; display: flex; justify-content: space-between; gap: 12px; color: #1f2328; }
.rh-legend { display: inline-flex; align-items: center; gap: 5px; white-space: nowrap; }
.rh-ramp { display: inline-block; width: 120px; height: 10px; border: 1px solid #999;
           background: linear-gradient(to right, rgba(9,105,218,0), rgba(9,105,218,1)); }
.rh-key { padding: 0 4px; margin-left: 8px; }
.rh-plotbox { display: flex; flex: none; padding: 0 12px 0 0; }
.rh-yaxis { width: 64px; height: 64px; display: flex; flex-direction: column; justify-content: space-between;
            align-items: flex-end; padding-right: 4px; font-size: 11px; color: #57606a; box-sizing: border-box; }
.rh-yname { font-style: italic; }
#rh-plot { flex: 1; min-width: 0; height: 64px; border-left: 1px solid #57606a; border-bottom: 1px solid #57606a;
           cursor: pointer; }
.rh-xaxis { position: relative; height: 16px; flex: none; margin: 0 12px 0 64px; font-size: 11px; color: #57606a; }
.rh-xtick { position: absolute; top: 1px; transform: translateX(-50%); white-space: nowrap; }
.rh-xtick:first-child { transform: none; }
.rh-xtick:nth-last-child(2) { transform: translateX(-100%); }
.rh-xname { position: absolute; top: 1px; left: 62%; font-style: italic; }
.rh-text { flex: 1; overflow-y: auto; padding: 8px 12px; white-space: pre-wrap; word-break: break-word;
           font: 13px/1.7 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; position: relative; }
.rh-needle { outline: 2px solid #f08c00; background-clip: padding-box; }
span.rh-needle { border-radius: 2px; }
.rh-answer { outline: 2px solid #d1242f; font-weight: bold; }
.rh-tag { font: bold 10px/1 system-ui, sans-serif; color: #fff; background: #f08c00; padding: 1px 3px;
          border-radius: 3px; margin-right: 2px; user-select: none; }
.rh-tag.rh-a { background: #d1242f; }
.rh-t.rh-at { box-shadow: inset 0 -3px 0 #ff2d55; }
.rh-none { color: #57606a; font-style: italic; }
"""


def intro_html(n_saved: int, n: int) -> str:
    import html as _html

    text = _html.escape(INTRO.format(n=n_saved, m=n)).replace("`--save-attention K`",
                                                              "<code>--save-attention K</code>")
    return f'<p>{text}</p><p><button type="button" id="rh-open">Open the explorer</button></p>'


def panel_html(data: dict) -> str:
    return (f'<style>{CSS}</style>{PANEL}<script type="application/json" id="rh-data">{embed_json(data)}</script>'
            f"<script>{script()}</script>")
