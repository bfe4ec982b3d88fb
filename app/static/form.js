/* The settings form: which fields a mode shows, the gap button, and the JSON body of a streamed request. */
import { el } from "./state.js";
import { parseTemplate } from "./template.js";

export function syncMode() {
  const infill = el.mode.value === "infill";
  const template = el.mode.value === "template";
  el.prompt.hidden = !infill;
  el.prompt.disabled = !infill;
  el.templateFields.hidden = !template;
  el.templateFields.disabled = !template;
  el.length.disabled = template; // a template's text and gaps make its length
}

/** Write a gap of the chosen size ([[20]]) at the template's caret. */
export function insertGap() {
  const size = Number.parseInt(el.gapSize.value, 10);
  const gap = `[[${Number.isInteger(size) && size > 0 ? size : 20}]]`;
  el.template.focus();
  el.template.setRangeText(gap, el.template.selectionStart, el.template.selectionEnd, "end");
  el.template.dispatchEvent(new Event("input", { bubbles: true }));
}

function readInt(input) {
  const raw = input.value.trim();
  if (raw === "") return null;
  return /^-?\d+$/.test(raw) ? raw : NaN;
}

/** JSON with the form's integers written as the digits typed, so big seeds keep every digit. */
function withIntegers(body, names) {
  const inputs = { num_samples: el.samples, steps: el.steps, length: el.length, seed: el.seed };
  let json = JSON.stringify(body);
  for (const name of names) {
    const input = inputs[name];
    const v = readInt(input);
    if (Number.isNaN(v)) throw new Error(`${input.labels[0].firstChild.textContent.trim()} must be a whole number`);
    json = json.replace(`"${name}":null`, `"${name}":${v === null ? "null" : BigInt(v).toString()}`);
  }
  return json;
}

/** A decimal field's number (the server checks its range and says what it allows). */
function readNumber(input) {
  const raw = input.value.trim();
  const value = Number(raw);
  if (raw === "" || !Number.isFinite(value)) {
    throw new Error(`${input.labels[0].firstChild.textContent.trim()} must be a number`);
  }
  return value;
}

/** A streamed request's JSON: `fields`, the form's predictor and sampling controls, and the named integers
 * from the form. */
export function streamedJson(fields, integers) {
  const body = { ...fields, predictor: el.predictor.value, temperature: readNumber(el.temperature),
    top_p: readNumber(el.topP), stream: true, stream_every: 1, pieces: true };
  for (const name of integers) body[name] = null; // withIntegers writes the typed digits in
  return withIntegers(body, integers);
}

/** The request the form describes: its JSON, its path, and the prefix/suffix the final text is drawn with. */
export function buildBody() {
  if (el.mode.value === "template") {
    const json = streamedJson({ segments: parseTemplate(el.template.value) }, ["num_samples", "steps", "seed"]);
    return { json, path: "infill", prefix: "", suffix: "" };
  }
  const infill = el.mode.value === "infill";
  const prompt = infill ? { prefix: el.prefix.value, suffix: el.suffix.value } : {};
  const json = streamedJson(prompt, ["num_samples", "steps", "length", "seed"]);
  return { json, path: infill ? "infill" : "sample", prefix: prompt.prefix || "", suffix: prompt.suffix || "" };
}
