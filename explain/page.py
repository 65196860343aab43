"""attention.html: one self-contained page where hovering a token shows its head's row and column."""
import json
import pathlib

import numpy as np

from .ascii import token_label  # one way to show a token, in every picture


def _checked(patterns_LNTT, labels: list[str], key_labels: list[str] | None = None) -> np.ndarray:
    """The patterns as float64 [L, N, T, T] (or [L, N, T, S] with key labels), or a
    ValueError naming what is wrong."""
    patterns = np.asarray(patterns_LNTT, dtype=np.float64)
    if key_labels is not None and patterns.ndim == 4 and patterns.shape[3] != len(key_labels):
        raise ValueError(f"got {len(key_labels)} key labels for {patterns.shape[3]} keys: "
                         f"pass one label per source token")
    if patterns.ndim != 4 or (key_labels is None and patterns.shape[2] != patterns.shape[3]):
        raise ValueError(f"patterns_LNTT must be [layers, heads, T, T] for one sequence, "
                         f"got shape {patterns.shape} (take cache['patterns'][b] for sequence b)")
    if 0 in patterns.shape:
        raise ValueError(f"nothing to draw: patterns_LNTT has shape {patterns.shape} "
                         f"(an empty prompt?); give at least one layer, head and token")
    if patterns.shape[2] != len(labels):
        raise ValueError(f"got {len(labels)} labels for {patterns.shape[2]} tokens: "
                         f"pass one label per token")
    if not np.all(np.isfinite(patterns)):
        raise ValueError("patterns_LNTT holds NaN or inf: the pattern to draw must be finite")
    return patterns


def _payload(patterns: np.ndarray, labels: list[str], key_labels: list[str] | None) -> str:
    """The page's data as JSON that is safe inside a <script> element.

    Weights go in as integers in ten-thousandths (4 decimals, a third of the bytes of floats).
    Every '<', '>' and '&' is written as a \\u escape, so no label can close the script element."""
    keys = labels if key_labels is None else key_labels
    data = {"labels": [token_label(str(label)) for label in labels],
            "raw": [str(label) for label in labels],
            "keys": [token_label(str(label)) for label in keys],
            "keysRaw": [str(label) for label in keys],
            "cross": key_labels is not None,
            "scale": 10_000,
            "patterns": np.rint(patterns * 10_000).astype(np.int64).tolist()}
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def attention_html(patterns_LNTT, labels: list[str], path,
                   key_labels: list[str] | None = None) -> pathlib.Path:
    """Write attention.html for one sequence and return its path.

    patterns_LNTT: [layers, heads, T, T], row t = query t's weights over the keys (so rows sum
    to 1 and a causal model's future keys are exactly 0), e.g. run_with_cache(...)[1]["patterns"][0].
    labels: the T tokens as text. The page needs nothing but itself: no network, no fonts.
    Cross-attention: patterns [layers, heads, T, S] and `key_labels`, the S source tokens; the
    'to' strip then shows the source, the 'from' strip the queries, and nothing is masked."""
    key_labels = None if key_labels is None else list(key_labels)
    patterns = _checked(patterns_LNTT, list(labels), key_labels)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_PAGE.replace("/*DATA*/", _payload(patterns, list(labels), key_labels)),
                    encoding="utf-8")
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>headwise: attention patterns</title>
<style>
body { font-family: sans-serif; margin: 16px; color: #222; background: #fff; }
#controls { margin-bottom: 8px; }
#controls label { margin-right: 16px; }
.legend { margin: 6px 0; font-size: 14px; }
.key-to { background: rgba(31, 119, 180, 0.6); padding: 0 4px; }
.key-from { background: rgba(230, 85, 13, 0.6); padding: 0 4px; }
.strip-name { font-size: 13px; color: #555; margin-top: 10px; }
.strip { line-height: 2.6; font-family: monospace; font-size: 15px; }
.tok { display: inline-block; margin: 2px 1px; padding: 2px 5px; border: 1px solid #ccc;
       cursor: default; text-align: center; min-width: 14px; }
/* Room for the weight from the start: a token that grew on hover would slide from under the mouse. */
.tok .w { display: block; font-size: 10px; line-height: 1.1; color: #333; min-height: 11px;
          min-width: 6ch; }
.tok.hovered { outline: 2px solid #000; outline-offset: -1px; }
#readout { font-size: 13px; margin: 8px 0; min-height: 18px; }
#heat { border-collapse: collapse; margin-top: 10px; font-family: monospace; font-size: 11px; }
#heat td, #heat th { border: 1px solid #e4e4e4; }
#heat td { width: 34px; height: 22px; text-align: center; }
#heat th { font-weight: normal; padding: 0 4px; white-space: pre; }
#heat thead th { writing-mode: vertical-rl; transform: rotate(180deg); padding: 4px 0;
                 vertical-align: bottom; }
#heat td.hl-row { box-shadow: inset 0 2px 0 #000, inset 0 -2px 0 #000; }
#heat td.hl-col { box-shadow: inset 2px 0 0 #e6550d, inset -2px 0 0 #e6550d; }
#heat td.hl-row.hl-col { box-shadow: inset 0 0 0 2px #000; }
#heat th.hl { background: #ffe9a8; }
.axis { font-size: 12px; color: #555; }
</style>
</head>
<body>
<h1 style="font-size: 18px">Attention patterns</h1>
<div id="controls">
<label>Layer <select id="layer"></select></label>
<label>Head <select id="head"></select></label>
</div>
<p class="legend">Hover a token. <span class="key-to">Blue</span>: what it attends to (its row
of the pattern). <span class="key-from">Orange</span>: what attends to it (its column).
\u2423 is a space, \u23ce a newline, \u21e5 a tab.</p>
<div class="strip-name">attends to (the hovered token's row: its weights over the keys)</div>
<div id="to" class="strip"></div>
<div class="strip-name">attended to by (the hovered token's column: each query's weight on it)</div>
<div id="from" class="strip"></div>
<div id="readout"></div>
<div class="axis" id="axis">The selected head's pattern: rows are queries (each row sums to 1), columns
are keys; future keys are masked (blank).</div>
<table id="heat"></table>
<script type="application/json" id="data">/*DATA*/</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const T = DATA.labels.length, S = DATA.keys.length;
const BLUE = [31, 119, 180], ORANGE = [230, 85, 13];
// The hovered query (its row) and key (its column): one token for self-attention; for
// cross-attention a query or a source token, whichever the mouse is on.
let hovered = -1, hoveredKey = -1;

function weight(l, n, q, k) { return DATA.patterns[l][n][q][k] / DATA.scale; }
function selected() {
  return [Number(document.getElementById("layer").value),
          Number(document.getElementById("head").value)];
}
function paint(el, rgb, w) {
  el.style.backgroundColor = w > 0 ? "rgba(" + rgb.join(", ") + ", " + w + ")" : "";
  el.dataset.w = w.toFixed(4);
}
function fillPicker(id, count, name) {
  const select = document.getElementById(id);
  for (let i = 0; i < count; i++) {
    const option = document.createElement("option");
    option.value = String(i);
    option.textContent = name + " " + i;
    select.appendChild(option);
  }
  select.addEventListener("change", render);
}
function tokenSpan(i, isKey) {
  const span = document.createElement("span");
  span.className = "tok";
  span.dataset.i = String(i);
  const text = document.createElement("span");
  text.className = "txt";
  text.textContent = isKey ? DATA.keys[i] : DATA.labels[i];
  const w = document.createElement("span");
  w.className = "w";
  span.append(text, w);
  span.title = "token " + i + ": " + JSON.stringify(isKey ? DATA.keysRaw[i] : DATA.raw[i]);
  span.addEventListener("mouseenter", () => isKey ? hoverKey(i) : hover(i));
  return span;
}
function buildStrips() {
  const to = document.getElementById("to"), from = document.getElementById("from");
  for (let k = 0; k < S; k++) to.appendChild(tokenSpan(k, DATA.cross));
  for (let q = 0; q < T; q++) from.appendChild(tokenSpan(q, false));
}
function headerCell(i, tag, isKey) {
  const th = document.createElement(tag);
  th.textContent = isKey ? DATA.keys[i] : DATA.labels[i];
  th.dataset.i = String(i);
  th.dataset.axis = isKey ? "key" : "query";
  th.title = "token " + i + ": " + JSON.stringify(isKey ? DATA.keysRaw[i] : DATA.raw[i]);
  return th;
}
function buildHeat() {
  const table = document.getElementById("heat");
  const head = table.createTHead().insertRow();
  head.appendChild(document.createElement("th"));
  for (let k = 0; k < S; k++) {
    const th = headerCell(k, "th", DATA.cross);
    if (DATA.cross) th.addEventListener("mouseenter", () => hoverKey(k));
    head.appendChild(th);
  }
  const body = table.createTBody();
  for (let q = 0; q < T; q++) {
    const row = body.insertRow();
    const th = headerCell(q, "th", false);
    th.addEventListener("mouseenter", () => hover(q));
    row.appendChild(th);
    for (let k = 0; k < S; k++) {
      const td = row.insertCell();
      td.dataset.q = String(q);
      td.dataset.k = String(k);
      td.addEventListener("mouseenter", () => hover(q));
    }
  }
}
function paintHeat(l, n) {
  for (const td of document.querySelectorAll("#heat td")) {
    const q = Number(td.dataset.q), k = Number(td.dataset.k), w = weight(l, n, q, k);
    paint(td, BLUE, w);
    td.textContent = T <= 24 && w > 0 ? w.toFixed(2) : "";
    td.style.color = w > 0.6 ? "#fff" : "";
    td.title = "query " + q + " " + DATA.labels[q] + " \\u2192 key " + k + " " +
               DATA.keys[k] + ": " + w.toFixed(4);
    td.classList.toggle("hl-row", q === hovered);
    td.classList.toggle("hl-col", k === hoveredKey);
  }
  for (const th of document.querySelectorAll("#heat th[data-i]")) {
    const mine = th.dataset.axis === "key" ? hoveredKey : hovered;
    th.classList.toggle("hl", Number(th.dataset.i) === mine);
  }
}
function paintStrip(id, rgb, weightOf, active, isKey) {
  for (const span of document.querySelectorAll("#" + id + " .tok")) {
    const i = Number(span.dataset.i);
    span.classList.toggle("hovered", i === (isKey ? hoveredKey : hovered));
    if (active < 0) {
      span.style.backgroundColor = "";
      span.querySelector(".w").textContent = "";
      continue;
    }
    const w = weightOf(i);
    paint(span, rgb, w);
    span.querySelector(".w").textContent = w.toFixed(4);
  }
}
function render() {
  const [l, n] = selected();
  paintStrip("to", BLUE, k => weight(l, n, hovered, k), hovered, DATA.cross);
  paintStrip("from", ORANGE, q => weight(l, n, q, hoveredKey), hoveredKey, false);
  paintHeat(l, n);
  const readout = document.getElementById("readout");
  if (DATA.cross) {
    readout.textContent = hovered >= 0 ? "layer " + l + ", head " + n + ": " +
      DATA.labels[hovered] + " attends to the blue source tokens." : hoveredKey >= 0 ?
      "layer " + l + ", head " + n + ": the orange tokens attend to source token " +
      DATA.keys[hoveredKey] + "." : "Hover a token.";
    return;
  }
  readout.textContent = hovered < 0 ? "Hover a token." : "layer " + l + ", head " + n +
    ": token " + hovered + " " + DATA.labels[hovered] + " attends to the blue tokens, " +
    "and the orange ones attend to it.";
}
function hover(i) { hovered = i; hoveredKey = DATA.cross ? -1 : i; render(); }
function hoverKey(k) { hoveredKey = k; hovered = -1; render(); }

if (DATA.cross) {
  document.getElementById("axis").textContent = "The selected head's cross-attention: rows " +
    "are the queries (each row sums to 1), columns the source tokens (keys); none is masked.";
}
fillPicker("layer", DATA.patterns.length, "layer");
fillPicker("head", DATA.patterns[0].length, "head");
buildStrips();
buildHeat();
render();
</script>
</body>
</html>
"""
