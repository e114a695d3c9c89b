// The report's attention explorer (plain JS, no libraries, nothing fetched).
// Data: the JSON block #rh-data (see report/explorer.py). Heatmaps carry clickable overlays
// (.rh-hit with data-exp, data-rows, data-cols); a click opens the panel on that experiment and head.
// Token texts are set with textContent only. One span per token; a head change only restyles them.
(function () {
  "use strict";
  var node = document.getElementById("rh-data");
  if (!node) return;
  var D = JSON.parse(node.textContent);
  var $ = function (id) { return document.getElementById(id); };
  var panel = $("rh-explorer"), selExp = $("rh-exp"), selHead = $("rh-head"), selSample = $("rh-sample");
  var text = $("rh-text"), plot = $("rh-plot"), msg = $("rh-msg"), maxLabel = $("rh-max"), sink = $("rh-sink");
  var yMax = $("rh-ymax"), xAxis = $("rh-xaxis");
  var SVG = plot.namespaceURI;  // the SVG namespace, from the page's own <svg>
  var state = { exp: -1, head: null, sample: 0 };
  var built = { prompt: -1, spans: [], needle: null, answer: null };
  var promptCache = {}, rowCache = {};

  function b64bytes(s) {
    var bin = atob(s), n = bin.length, out = new Uint8Array(n);
    for (var i = 0; i < n; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  function promptTokens(p) {  // indices into D.strings
    if (!promptCache[p]) {
      var bytes = b64bytes(D.prompts[p]);
      promptCache[p] = D.prompt_dtype === "uint32" ? new Uint32Array(bytes.buffer) : new Uint16Array(bytes.buffer);
    }
    return promptCache[p];
  }
  function row(exp, sample, k) {  // Float32Array of attention values
    var key = exp + "/" + sample + "/" + k;
    if (!rowCache[key]) {
      var s = D.experiments[exp].saved.samples[sample], codes = b64bytes(s.rows[k]), scale = s.scale[k];
      var out = new Float32Array(codes.length);
      for (var i = 0; i < codes.length; i++) out[i] = codes[i] * scale;
      rowCache[key] = out;
    }
    return rowCache[key];
  }
  function headName(exp, flat) { var H = D.experiments[exp].heads; return "L" + Math.floor(flat / H) + "H" + (flat % H); }
  function headIndex(exp, name) {
    var m = /^L(\d+)H(\d+)$/.exec(name), e = D.experiments[exp];
    return m ? (+m[1]) * e.heads + (+m[2]) : -1;
  }
  function fmt(x) {
    if (x === 0) return "0";
    var a = Math.abs(x);
    return a >= 1000 ? x.toFixed(0) : a >= 0.001 ? String(+x.toPrecision(3)) : x.toExponential(2);
  }
  function rankOf(exp, name) { return D.experiments[exp].rank[headIndex(exp, name)]; }
  function option(sel, value, label) {
    var o = document.createElement("option");
    o.value = value; o.textContent = label; sel.appendChild(o);
  }

  // --- selects ------------------------------------------------------------------------------------------
  // the options name what tells experiments apart first (question, length, depth), the model and method after
  D.experiments.forEach(function (e, i) { option(selExp, i, (e.option || e.label) + (e.saved ? "" : " (no rows)")); });

  function fillHeads() {
    var e = D.experiments[state.exp];
    selHead.textContent = "";
    var names = e.saved ? e.saved.heads.slice() : [];
    if (state.head && names.indexOf(state.head) < 0) names.push(state.head);
    names.forEach(function (h) {
      var saved = e.saved && e.saved.heads.indexOf(h) >= 0;
      option(selHead, h, h + " (rank " + rankOf(state.exp, h) + ")" + (saved ? "" : " not saved"));
    });
    selHead.value = state.head || "";
  }
  function fillSamples() {
    var e = D.experiments[state.exp], n = e.saved ? e.saved.samples.length : 0;
    selSample.textContent = "";
    var k = e.saved && state.head ? e.saved.heads.indexOf(state.head) : -1;
    for (var s = 0; s < n; s++) {
      var label = "sample " + (s + 1);
      if (k >= 0) label += " (needle mass " + fmt(needleMass(state.exp, s, k)) + ")";
      option(selSample, s, label);
    }
    if (state.sample >= n) state.sample = 0;
    selSample.value = String(state.sample);
  }
  function needleMass(exp, s, k) {
    var r = row(exp, s, k), sp = D.experiments[exp].saved.samples[s].needle, m = 0;
    for (var i = sp[0]; i < sp[1]; i++) m += r[i];
    return m;
  }

  // --- the prompt's text ----------------------------------------------------------------------------------
  function buildText(exp, sample) {
    var smp = D.experiments[exp].saved.samples[sample];
    if (built.prompt === smp.prompt && built.needle + "" === smp.needle + "" && built.answer + "" === smp.answer + "") return;
    var toks = promptTokens(smp.prompt), n = toks.length, spans = new Array(n);
    var root = document.createDocumentFragment(), cur = root, ns = smp.needle[0], ne = smp.needle[1];
    var as = smp.answer ? smp.answer[0] : -1, ae = smp.answer ? smp.answer[1] : -1, needleBox = null;
    for (var i = 0; i < n; i++) {
      if (i === ns) {
        needleBox = document.createElement("span"); needleBox.className = "rh-needle"; needleBox.id = "rh-needle";
        var tag = document.createElement("span"); tag.className = "rh-tag"; tag.textContent = "needle";
        needleBox.appendChild(tag); root.appendChild(needleBox); cur = needleBox;
      }
      if (i === as) {
        var box = document.createElement("span"); box.className = "rh-answer"; box.id = "rh-answer";
        var atag = document.createElement("span"); atag.className = "rh-tag rh-a"; atag.textContent = "answer";
        box.appendChild(atag); cur.appendChild(box); cur = box;
      }
      var t = document.createElement("span");
      t.className = "rh-t"; t.textContent = D.strings[toks[i]]; t.title = "position " + i; t.dataset.pos = i;
      cur.appendChild(t); spans[i] = t;
      if (i + 1 === ae) cur = needleBox || root;
      if (i + 1 === ne) cur = root;
    }
    text.textContent = "";
    text.appendChild(root);
    built = { prompt: smp.prompt, spans: spans, needle: smp.needle, answer: smp.answer };
  }
  function scaleMax(r) {
    var m = 0;
    for (var i = sink.checked ? 1 : 0; i < r.length; i++) if (r[i] > m) m = r[i];
    return m > 0 ? m : 1;
  }
  function shade(r, vmax) {
    var spans = built.spans;
    for (var i = 0; i < spans.length; i++) {
      var a = Math.min(1, r[i] / vmax);
      spans[i].style.backgroundColor = a > 0.004 ? "rgba(9,105,218," + a.toFixed(3) + ")" : "";
      spans[i].style.color = a > 0.6 ? "#fff" : "";
    }
    text.dataset.head = state.head;
  }
  function clearShade() {
    for (var i = 0; i < built.spans.length; i++) { built.spans[i].style.backgroundColor = ""; built.spans[i].style.color = ""; }
    text.dataset.head = "";
  }
  // hover: a token's tooltip gives its position and the attention the shown head puts on it (set when
  // hovered, so that a head change restyles the spans only)
  text.addEventListener("mouseover", function (ev) {
    var t = ev.target;
    if (!t.classList || !t.classList.contains("rh-t")) return;
    var e = D.experiments[state.exp], k = e && e.saved ? e.saved.heads.indexOf(state.head) : -1, i = +t.dataset.pos;
    t.title = "position " + i + (k >= 0 && text.dataset.head ? " · attention " + fmt(row(state.exp, state.sample, k)[i])
      + " (" + state.head + ")" : "");
  });
  function massCentre(r) {  // start of the 32-token window with the most attention, past the first token
    var w = Math.min(32, r.length - 1), sum = 0, best = -1, at = 1;
    if (w <= 0) return 0;
    for (var i = 1; i < r.length; i++) {
      sum += r[i];
      if (i - w >= 1) sum -= r[i - w];
      if (i >= w && sum > best) { best = sum; at = i - w + 1; }
    }
    return at;
  }
  function scrollToPos(i) {
    var t = built.spans[Math.max(0, Math.min(built.spans.length - 1, i))];
    if (!t) return;
    var top = t.getBoundingClientRect().top - text.getBoundingClientRect().top + text.scrollTop;
    text.scrollTop = Math.max(0, top - text.clientHeight / 3);
    var prev = text.querySelector(".rh-at");
    if (prev) prev.classList.remove("rh-at");
    t.classList.add("rh-at");
  }

  // --- the line plot ---------------------------------------------------------------------------------------
  function clearPlot() {
    plot.textContent = ""; yMax.textContent = ""; xAxis.textContent = ""; maxLabel.textContent = "—";
  }
  function drawAxes(n, vmax) {  // y: 0 to the scale's top; x: token positions, five ticks
    yMax.textContent = fmt(vmax);
    xAxis.textContent = "";
    for (var q = 0; q <= 4; q++) {
      var pos = Math.round(q / 4 * (n - 1)), tick = document.createElement("span");
      tick.className = "rh-xtick"; tick.style.left = (q / 4 * 100) + "%"; tick.textContent = String(pos);
      xAxis.appendChild(tick);
    }
    var name = document.createElement("span");
    name.className = "rh-xname"; name.textContent = "token position"; xAxis.appendChild(name);
  }
  function drawPlot(r, vmax, smp) {
    plot.textContent = "";
    var n = r.length, W = 1000, H = 80;
    [0.5, 1].forEach(function (f) {  // grid lines at half and full scale
      var g = document.createElementNS(SVG, "line"), y = (H - 2 - f * (H - 6)).toFixed(1);
      g.setAttribute("x1", 0); g.setAttribute("x2", W); g.setAttribute("y1", y); g.setAttribute("y2", y);
      g.setAttribute("stroke", "#d0d7de"); g.setAttribute("stroke-dasharray", "4 4");
      g.setAttribute("vector-effect", "non-scaling-stroke"); g.setAttribute("class", "rh-grid");
      plot.appendChild(g);
    });
    function band(span, colour, label) {
      if (!span) return;
      var x0 = span[0] / n * W, x1 = Math.max(span[1] / n * W, x0 + 2);
      var b = document.createElementNS(SVG, "rect");
      b.setAttribute("x", x0); b.setAttribute("y", 0); b.setAttribute("width", x1 - x0); b.setAttribute("height", H);
      b.setAttribute("fill", colour); b.setAttribute("class", "rh-band-" + label);
      plot.appendChild(b);
    }
    band(smp.needle, "rgba(240,140,0,0.25)", "needle");
    band(smp.answer, "rgba(209,36,47,0.45)", "answer");
    // one vertex per pixel column (max over the positions it covers) keeps 8K-token plots light
    var cols = Math.min(n, W), pts = [];
    for (var c = 0; c < cols; c++) {
      var a = Math.floor(c * n / cols), b = Math.max(a + 1, Math.floor((c + 1) * n / cols)), m = 0;
      for (var i = a; i < b; i++) if (r[i] > m) m = r[i];
      pts.push(((c + 0.5) / cols * W).toFixed(1) + "," + (H - 2 - Math.min(1, m / vmax) * (H - 6)).toFixed(1));
    }
    var line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", pts.join(" ")); line.setAttribute("fill", "none");
    line.setAttribute("stroke", "#0969da"); line.setAttribute("stroke-width", "1.5");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    plot.appendChild(line);
    plot.dataset.n = n;
    drawAxes(n, vmax);
  }
  plot.addEventListener("click", function (ev) {
    var n = +plot.dataset.n || 0, box = plot.getBoundingClientRect();
    if (n) scrollToPos(Math.floor((ev.clientX - box.left) / box.width * n));
  });

  // --- render --------------------------------------------------------------------------------------------------
  function render(scroll) {
    var e = D.experiments[state.exp], h = state.head;
    markSelected();
    if (!e.saved) {
      msg.textContent = e.label + ": " + e.why + ".";
      msg.className = "rh-none"; text.textContent = ""; clearPlot(); built.prompt = -1; built.spans = [];
      panel.dataset.state = "none";
      return;
    }
    buildText(state.exp, state.sample);
    var k = e.saved.heads.indexOf(h), f = headIndex(state.exp, h);
    if (k < 0) {
      clearShade(); clearPlot();  // the legend shows no range for a head without rows
      msg.className = "rh-none";
      msg.textContent = h + " (rank " + rankOf(state.exp, h) + ", score " + fmt(e.scores[f]) + "): its attention rows "
        + "were not saved; only the top " + e.saved.heads.length + " heads' were (" + e.saved.heads.join(", ") + ").";
      panel.dataset.state = "unsaved";
      return;
    }
    var r = row(state.exp, state.sample, k), vmax = scaleMax(r), smp = e.saved.samples[state.sample];
    shade(r, vmax);
    drawPlot(r, vmax, smp);
    maxLabel.textContent = fmt(vmax);
    msg.className = "";
    msg.textContent = e.label + " · " + h + " (rank " + rankOf(state.exp, h) + ", score " + fmt(e.scores[f]) + ") · sample "
      + (state.sample + 1) + ": needle mass " + fmt(needleMass(state.exp, state.sample, k)) + ", first token "
      + fmt(r[0]) + ", " + r.length + " tokens";
    panel.dataset.state = "shown";
    if (scroll) scrollToPos(massCentre(r));
  }
  function open(exp, head, sample) {
    var t0 = performance.now();
    state.exp = exp;
    var e = D.experiments[exp];
    state.head = head || (e.saved ? e.saved.heads[0] : e.ranked[0]);
    state.sample = sample || 0;
    panel.hidden = false;
    document.body.style.paddingBottom = "58vh";
    selExp.value = String(exp); selExp.title = e.label;
    fillHeads(); fillSamples();
    render(true);
    panel.dataset.ms = (performance.now() - t0).toFixed(1);  // time to build and style the view
  }

  // --- heatmap overlays ----------------------------------------------------------------------------------------
  function cellAt(hit, ev) {
    var box = hit.getBoundingClientRect(), rows = +hit.dataset.rows, cols = +hit.dataset.cols;
    var l = Math.min(rows - 1, Math.floor((ev.clientY - box.top) / box.height * rows));
    var h = Math.min(cols - 1, Math.floor((ev.clientX - box.left) / box.width * cols));
    return [Math.max(0, l), Math.max(0, h)];
  }
  function markSelected() {
    var old = document.querySelectorAll(".rh-sel");
    for (var i = 0; i < old.length; i++) old[i].remove();
    var m = /^L(\d+)H(\d+)$/.exec(state.head || "");
    if (!m) return;
    var hits = document.querySelectorAll('.rh-hit[data-exp="' + state.exp + '"]');
    for (var j = 0; j < hits.length; j++) {
      var hit = hits[j], rows = +hit.dataset.rows, cols = +hit.dataset.cols, sel = document.createElement("div");
      sel.className = "rh-sel";
      sel.style.left = (parseFloat(hit.style.left) + (+m[2]) / cols * parseFloat(hit.style.width)) + "%";
      sel.style.top = (parseFloat(hit.style.top) + (+m[1]) / rows * parseFloat(hit.style.height)) + "%";
      sel.style.width = (parseFloat(hit.style.width) / cols) + "%";
      sel.style.height = (parseFloat(hit.style.height) / rows) + "%";
      hit.parentNode.appendChild(sel);
    }
  }
  var hits = document.querySelectorAll(".rh-hit");
  for (var i = 0; i < hits.length; i++) {
    hits[i].addEventListener("click", function (ev) {
      var c = cellAt(this, ev), exp = +this.dataset.exp;
      open(exp, "L" + c[0] + "H" + c[1], exp === state.exp ? state.sample : 0);
    });
    hits[i].addEventListener("mousemove", function (ev) {
      var c = cellAt(this, ev), exp = +this.dataset.exp, e = D.experiments[exp];
      var name = "L" + c[0] + "H" + c[1], saved = e.saved && e.saved.heads.indexOf(name) >= 0;
      this.title = name + ": score " + fmt(e.scores[c[0] * e.heads + c[1]]) + (saved ? " (rows saved: click)" : " (click)");
    });
  }

  selExp.addEventListener("change", function () { open(+selExp.value, null, 0); });
  selHead.addEventListener("change", function () { state.head = selHead.value; fillSamples(); render(true); });
  selSample.addEventListener("change", function () { state.sample = +selSample.value; render(true); });
  sink.addEventListener("change", function () { render(false); });
  $("rh-close").addEventListener("click", function () { panel.hidden = true; document.body.style.paddingBottom = ""; });
  $("rh-go-needle").addEventListener("click", function () {
    var e = D.experiments[state.exp]; if (e && e.saved) scrollToPos(e.saved.samples[state.sample].needle[0]);
  });
  $("rh-go-answer").addEventListener("click", function () {
    var e = D.experiments[state.exp], a = e && e.saved && e.saved.samples[state.sample].answer; if (a) scrollToPos(a[0]);
  });
  $("rh-go-mass").addEventListener("click", function () {
    var e = D.experiments[state.exp], k = e && e.saved ? e.saved.heads.indexOf(state.head) : -1;
    if (k >= 0) scrollToPos(massCentre(row(state.exp, state.sample, k)));
  });
  var opener = $("rh-open");
  if (opener) opener.addEventListener("click", function () {
    var first = 0;
    for (var i = 0; i < D.experiments.length; i++) if (D.experiments[i].saved) { first = i; break; }
    open(first, null, 0);
  });
  window.rhExplorer = { open: open, state: state };  // for tests and the console
})();
