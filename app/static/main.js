/* SEDD text diffusion: the browser page. Native ES modules, no framework, no build step.
 *
 * It POSTs to /sample or /infill with "stream": true and draws the streamed denoising (run.js) into one
 * panel per sample (panels.js). Template mode sends {"segments": [...]} to /infill (template.js, form.js);
 * "Rewrite selection" sends a finished sample's text and the selected character range to /rewrite and
 * redraws only that panel (rewrite.js). This module wires the page's controls to them.
 */
import { api, describeDetail, describeHttpError, headers, keyStorage } from "./api.js";
import { buildBody, insertGap, syncMode } from "./form.js";
import { buildRewrite, syncRewrite } from "./rewrite.js";
import { setRunning, start, stop } from "./run.js";
import { SSEParser, readEvents } from "./sse.js";
import { el, page, setStatus } from "./state.js";
import { parseTemplate } from "./template.js";

/* ---- model information ---------------------------------------------------------- */
async function loadModel() {
  try {
    const response = await fetch(api("v1/model"), { headers: headers(true) });
    if (response.status === 503) {
      // Still loading (or warming up): ask again when the server says to.
      const retry = Number.parseInt(response.headers.get("Retry-After") || "", 10);
      const wait = Number.isFinite(retry) ? Math.min(Math.max(retry, 1), 30) : 5;
      el.modelInfo.textContent = `Model loading… (checking again in ${wait} s)`;
      setTimeout(loadModel, wait * 1000);
      return;
    }
    if (!response.ok) {
      if (response.status === 401 || response.status === 403) el.auth.open = true;
      el.modelInfo.textContent = `Model information unavailable: ${await describeHttpError(response)}`;
      return;
    }
    const model = await response.json();
    page.model = model;
    const parts = [model.name || "model"];
    if (model.tokenizer) parts.push(model.tokenizer === "char" ? "characters" : `${model.tokenizer} tokens`);
    if (model.length) parts.push(`length ${model.length}`);
    el.modelInfo.textContent = parts.join(" · ");
    el.modelInfo.title = "The model this server runs";
    if (Number.isInteger(model.length) && model.length > 0) {
      el.length.max = String(model.length);
      el.length.placeholder = `${model.length} (model's)`;
    }
    if (Number.isInteger(model.max_steps) && model.max_steps > 0) {
      el.steps.max = String(model.max_steps);
      if (Number(el.steps.value) > model.max_steps) el.steps.value = String(model.max_steps);
    }
    if (Number.isInteger(model.max_samples) && model.max_samples > 0) {
      el.samples.max = String(model.max_samples);
      if (Number(el.samples.value) > model.max_samples) el.samples.value = String(model.max_samples);
    }
  } catch (err) {
    el.modelInfo.textContent = `Model information unavailable: ${err.message || err}`;
  }
}

/* ---- API key ------------------------------------------------------------------------ */
el.apiKey.value = keyStorage.get();
if (el.apiKey.value) el.auth.open = true;
el.apiKey.addEventListener("change", () => {
  keyStorage.set(el.apiKey.value.trim());
  if (!page.model) loadModel(); // the model information may have been refused for want of a key
});
el.forgetKey.addEventListener("click", () => {
  el.apiKey.value = "";
  keyStorage.set("");
  el.apiKey.focus();
});

/* ---- mode and template ------------------------------------------------------------- */
el.mode.addEventListener("change", syncMode);
syncMode();
el.insertGap.addEventListener("click", insertGap);

/* ---- running ------------------------------------------------------------------------ */
/** `build()`'s request, or null after showing why the form cannot make one. */
function built(build) {
  try {
    return build();
  } catch (err) {
    setStatus(err.message, "error");
    return null;
  }
}

function generate() {
  if (page.controller) return;
  const request = built(buildBody);
  if (request) start({ ...request, target: null });
}

function rewrite() {
  if (page.controller || !page.selected) return;
  const request = built(buildRewrite);
  if (!request) return;
  getSelection().removeAllRanges();
  start(request);
}

document.addEventListener("selectionchange", () => syncRewrite());
// Pressing the button must not move focus or clear the selection it acts on.
el.rewrite.addEventListener("mousedown", (ev) => ev.preventDefault());
el.rewrite.addEventListener("click", rewrite);

el.form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  generate();
});
el.stop.addEventListener("click", stop);
// Enter submits from selects too (text and number inputs submit natively).
el.form.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && ev.target instanceof HTMLSelectElement && !ev.isComposing) {
    ev.preventDefault();
    el.form.requestSubmit();
  }
});
document.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape" && page.controller) {
    ev.preventDefault();
    stop();
  }
});

// For tests and for whoever wants to reuse them.
window.SEDD = { SSEParser, readEvents, describeDetail, parseTemplate };

setRunning(false);
loadModel();
