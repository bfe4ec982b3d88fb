/* The page's elements (by id) and what it holds between events: the run in progress, the model, the
 * selection to rewrite. Every other module reads and writes the page through these. */

const $ = (id) => document.getElementById(id);

export const el = {
  form: $("form"),
  mode: $("mode"),
  prompt: $("prompt"),
  templateFields: $("template-fields"),
  template: $("template"),
  gapSize: $("gap-size"),
  insertGap: $("insert-gap"),
  rewrite: $("rewrite"),
  prefix: $("prefix"),
  suffix: $("suffix"),
  steps: $("steps"),
  predictor: $("predictor"),
  length: $("length"),
  seed: $("seed"),
  temperature: $("temperature"),
  topP: $("top-p"),
  samples: $("samples"),
  generate: $("generate"),
  stop: $("stop"),
  output: $("output"),
  status: $("status"),
  progress: $("progress-bar"),
  modelInfo: $("model-info"),
  auth: $("auth"),
  apiKey: $("api-key"),
  forgetKey: $("forget-key"),
};

export const page = {
  controller: null, // AbortController of the run in progress
  run: null, // what the run in progress (or the last one) has shown: {panels, target, step, steps, prefix, suffix, ended}
  model: null, // GET /v1/model's answer, once it came
  selected: null, // {target, start, end} of the current selection inside one finished sample
};

export function setStatus(text, kind = "") {
  el.status.textContent = text;
  el.status.className = kind;
}

export function setProgress(fraction) {
  el.progress.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
}
