/* "Rewrite selection": a selection inside one finished sample becomes a /rewrite request for that span. */
import { streamedJson } from "./form.js";
import { el, page } from "./state.js";
import { codePoints } from "./template.js";

/** The selection as code-point offsets into one finished sample's text, or null. */
function selectionInSample() {
  const sel = getSelection();
  const run = page.run;
  if (!run || !sel || sel.rangeCount === 0 || sel.isCollapsed) return null;
  const range = sel.getRangeAt(0);
  const target = run.panels.findIndex((p) => p.text.contains(range.commonAncestorContainer));
  const info = run.panels[target];
  if (!info || !info.final || info.text.textContent !== info.final) return null; // finished text only
  const before = document.createRange();
  before.selectNodeContents(info.text);
  before.setEnd(range.startContainer, range.startOffset);
  const from = before.toString().length;
  const start = codePoints(info.final, from);
  const end = codePoints(info.final, from + range.toString().length);
  return end > start ? { target, start, end } : null;
}

/** Enable the button while a finished sample has a selection and nothing runs. */
export function syncRewrite(running = page.controller !== null) {
  page.selected = running ? null : selectionInSample();
  el.rewrite.disabled = page.selected === null;
}

/** The request that rewrites the selected span in its panel. */
export function buildRewrite() {
  const { target, start, end } = page.selected;
  const fields = { text: page.run.panels[target].final, spans: [[start, end]], num_samples: 1 };
  return { json: streamedJson(fields, ["steps", "seed"]), path: "rewrite", target, prefix: "", suffix: "" };
}
