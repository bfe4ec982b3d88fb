/* The sample panels: one per sample, redrawn from each step's per-position pieces, then the final text.
 * Kept positions come from `fixed` (one boolean per position) in step events, kept text from `spans`
 * (the generated character ranges) in the done answer; without them the panels fall back to
 * prefix_tokens/suffix_tokens and the prefix/suffix. */
import { el, page } from "./state.js";

export const MASK = "\u2591"; // ░, the server's placeholder for a masked position

function makePanel(index) {
  const panel = document.createElement("article");
  panel.className = "sample";
  const head = document.createElement("header");
  const title = document.createElement("h3");
  title.textContent = `Sample ${index + 1}`;
  const meta = document.createElement("span");
  meta.className = "meta";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "Copy";
  copy.hidden = true;
  copy.setAttribute("aria-label", `Copy sample ${index + 1}`);
  copy.addEventListener("click", () => copyText(panel, copy));
  head.append(title, meta, copy);
  const text = document.createElement("div");
  text.className = "text";
  panel.append(head, text);
  return { panel, meta, copy, text, spans: [], pieces: [], final: "" };
}

async function copyText(panel, button) {
  const info = page.run && page.run.panels.find((p) => p.panel === panel);
  const value = info ? info.final : panel.querySelector(".text").textContent;
  try {
    await navigator.clipboard.writeText(value);
    button.textContent = "Copied";
  } catch (_) {
    const range = document.createRange(); // no clipboard (plain http): select it instead
    range.selectNodeContents(panel.querySelector(".text"));
    const sel = getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    button.textContent = "Selected";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function ensurePanels(count) {
  const run = page.run;
  if (run.panels.length === count) return;
  el.output.replaceChildren();
  run.panels = [];
  for (let i = 0; i < count; i++) {
    const info = makePanel(i);
    run.panels.push(info);
    el.output.append(info.panel);
  }
  el.output.dataset.count = String(count);
}

/** The panels a run draws into: one per sample, or for a rewrite the one panel being rewritten. */
export function targetPanels(count) {
  const run = page.run;
  if (run.target === null) {
    ensurePanels(count);
    return run.panels;
  }
  return [run.panels[run.target]];
}

/** The base class of each position: kept text at the start (prefix), at the end (suffix), between, or not. */
export function pieceClasses(n, fixed, prefixTokens, suffixTokens) {
  if (!Array.isArray(fixed) || fixed.length !== n) {
    fixed = Array.from({ length: n }, (_, i) => i < prefixTokens || i >= n - suffixTokens);
  }
  const lead = fixed.indexOf(false) === -1 ? n : fixed.indexOf(false);
  const trail = fixed.lastIndexOf(false) + 1;
  return fixed.map((kept, i) => {
    if (!kept) return "tok";
    if (i < lead) return "tok fixed prefix";
    if (i >= trail) return "tok fixed suffix";
    return "tok fixed kept";
  });
}

/** Redraw one panel from this step's pieces; only positions that changed are touched. */
export function drawPieces(info, pieces, classes) {
  const n = pieces.length;
  const layout = classes.join("|");
  const pieceClass = (i) => classes[i];
  const rebuild = info.spans.length !== n || info.layout !== layout;
  if (rebuild) {
    // First drawing: with masks about (an absorbing model), what is already filled was revealed just now.
    const fresh = pieces.includes(MASK) ? " revealed" : "";
    const frag = document.createDocumentFragment();
    info.spans = new Array(n);
    for (let i = 0; i < n; i++) {
      const span = document.createElement("span");
      const piece = pieces[i];
      const base = pieceClass(i);
      span.className = base + (piece === MASK ? " mask" : base === "tok" ? fresh : "");
      span.textContent = piece;
      info.spans[i] = span;
      frag.append(span);
    }
    info.text.replaceChildren(frag);
    info.layout = layout;
    info.pieces = pieces.slice();
    return;
  }
  const old = info.pieces;
  for (let i = 0; i < n; i++) {
    const piece = pieces[i];
    if (piece === old[i]) continue;
    // A fresh element restarts the highlight animation even if this position changed last step too.
    const span = document.createElement("span");
    const base = pieceClass(i);
    span.className = piece === MASK ? `${base} mask` : `${base} revealed`;
    span.textContent = piece;
    info.spans[i].replaceWith(span);
    info.spans[i] = span;
  }
  info.pieces = pieces.slice();
}

/** Kept text and generated gaps of a final text from the gaps' character ranges, or null. */
function splitBySpans(text, spans) {
  if (!Array.isArray(spans)) return null;
  const chars = Array.from(text);
  const parts = [];
  let at = 0;
  for (const range of spans) {
    const [start, end] = Array.isArray(range) ? range.map(Number) : [NaN, NaN];
    if (!(Number.isInteger(start) && Number.isInteger(end) && at <= start && start <= end && end <= chars.length)) {
      return null; // not what the page expects: draw without them
    }
    if (start > at) parts.push({ kept: true, text: chars.slice(at, start).join("") });
    if (end > start) parts.push({ kept: false, text: chars.slice(start, end).join("") });
    at = end;
  }
  if (at < chars.length) parts.push({ kept: true, text: chars.slice(at).join("") });
  return parts;
}

/** The final text, with kept text styled apart: from the gaps' spans, else the prefix/suffix it starts/ends with. */
export function drawFinal(info, text, prefix, suffix, spans) {
  info.final = text;
  const frag = document.createDocumentFragment();
  const parts = splitBySpans(text, spans);
  if (parts) {
    parts.forEach((part, i) => {
      if (!part.kept) frag.append(span("tok generated", part.text));
      else if (i === 0) frag.append(span("tok fixed prefix", part.text));
      else if (i === parts.length - 1) frag.append(span("tok fixed suffix", part.text));
      else frag.append(span("tok fixed kept", part.text));
    });
    info.text.replaceChildren(frag);
    info.spans = [];
    info.pieces = [];
    return;
  }
  let body = text;
  let head = "";
  let tail = "";
  if (prefix && body.startsWith(prefix)) {
    head = prefix;
    body = body.slice(prefix.length);
  }
  if (suffix && body.endsWith(suffix)) {
    tail = suffix;
    body = body.slice(0, body.length - suffix.length);
  }
  if (head) frag.append(span("tok fixed prefix", head));
  frag.append(span("tok generated", body));
  if (tail) frag.append(span("tok fixed suffix", tail));
  info.text.replaceChildren(frag);
  info.spans = [];
  info.pieces = [];
}

function span(className, text) {
  const s = document.createElement("span");
  s.className = className;
  s.textContent = text;
  return s;
}
