/* One request at a time: POST it with "stream": true, read the Server-Sent-Events answer from
 * response.body (EventSource cannot POST), draw each `step` event and then the `done` answer. */
import { api, describeDetail, describeHttpError, headers } from "./api.js";
import { MASK, drawFinal, drawPieces, pieceClasses, targetPanels } from "./panels.js";
import { syncRewrite } from "./rewrite.js";
import { readEvents } from "./sse.js";
import { el, page, setProgress, setStatus } from "./state.js";

function onStep(data) {
  const samples = Array.isArray(data.samples) ? data.samples : [];
  const panels = targetPanels(samples.length);
  const prefixTokens = Number(data.prefix_tokens) || 0;
  const suffixTokens = Number(data.suffix_tokens) || 0;
  let masks = 0;
  samples.slice(0, panels.length).forEach((sample, i) => {
    const pieces = Array.isArray(sample.pieces) ? sample.pieces.map(String) : Array.from(String(sample.text || ""));
    const fixed = Array.isArray(sample.fixed) ? sample.fixed : data.fixed;
    drawPieces(panels[i], pieces, pieceClasses(pieces.length, fixed, prefixTokens, suffixTokens));
    const left = Number.isFinite(sample.masks_left) ? sample.masks_left : pieces.filter((p) => p === MASK).length;
    masks += left;
    panels[i].meta.textContent = `${left} masked`;
  });
  page.run.step = data.step;
  page.run.steps = data.steps;
  setProgress(data.steps ? data.step / data.steps : 0);
  setStatus(`Denoising: step ${data.step} of ${data.steps} · ${masks} ${masks === 1 ? "mask" : "masks"} left`, "running");
  document.dispatchEvent(new CustomEvent("sedd:step", { detail: data }));
}

function onDone(data, raw) {
  const run = page.run;
  const samples = Array.isArray(data.samples) ? data.samples : [];
  const panels = targetPanels(samples.length);
  const prefix = typeof data.prefix === "string" ? data.prefix : run.prefix;
  const suffix = typeof data.suffix === "string" ? data.suffix : run.suffix;
  samples.slice(0, panels.length).forEach((sample, i) => {
    const info = panels[i];
    const text = String(sample.text ?? "");
    drawFinal(info, text, prefix, suffix, sample.spans);
    const chars = Array.from(text).length;
    info.meta.textContent = `${chars} ${chars === 1 ? "character" : "characters"}`;
    info.copy.hidden = false;
  });
  el.output.classList.add("finished");
  setProgress(1);
  const parts = [run.target === null ? `Done: ${samples.length} ${samples.length === 1 ? "sample" : "samples"}`
    : `Rewrote a span of sample ${run.target + 1}`];
  const timing = data.timing || {};
  const seconds = timing.total_s ?? timing.run_s;
  if (Number.isFinite(seconds)) parts.push(`${seconds.toFixed(2)} s`);
  if (data.steps) parts.push(`${data.steps} steps`);
  if (data.predictor) parts.push(data.predictor);
  if (data.temperature === 0) parts.push("deterministic");
  else if (data.temperature !== undefined && data.temperature !== 1) parts.push(`temperature ${data.temperature}`);
  if (data.top_p !== undefined && data.top_p !== 1) parts.push(`top-p ${data.top_p}`);
  // The seed may exceed 2^53: take its digits from the raw JSON, not the parsed number.
  const seedMatch = /"seed"\s*:\s*(-?\d+)/.exec(raw);
  if (seedMatch) parts.push(`seed ${seedMatch[1]}`);
  setStatus(parts.join(" · "), "done");
  document.dispatchEvent(new CustomEvent("sedd:done", { detail: data }));
}

export function setRunning(running) {
  const hadFocus = document.activeElement;
  el.generate.disabled = running;
  el.stop.disabled = !running;
  syncRewrite(running);
  el.form.setAttribute("aria-busy", running ? "true" : "false");
  // Keep keyboard focus on a usable button when the focused one becomes disabled.
  if (running && hadFocus === el.generate) el.stop.focus();
  if (!running && hadFocus === el.stop) el.generate.focus();
}

/** Run one request: a fresh set of panels, or (target set) a rewrite drawn into that panel alone. */
export async function start(request) {
  page.controller = new AbortController();
  const mine = page.controller;
  const panels = request.target === null || !page.run ? [] : page.run.panels;
  const run = { panels, target: request.target, step: 0, steps: 0, prefix: request.prefix, suffix: request.suffix,
                ended: false };
  page.run = run;
  if (request.target === null) {
    el.output.replaceChildren();
    el.output.classList.remove("finished", "stopped");
    delete el.output.dataset.count;
  } else {
    panels[request.target].copy.hidden = true; // until the panel shows finished text again
  }
  setProgress(0);
  setRunning(true);
  setStatus("Waiting for the server…", "running");
  try {
    const response = await fetch(api(request.path), {
      method: "POST",
      headers: headers(false),
      body: request.json,
      signal: mine.signal,
      cache: "no-store",
    });
    if (!response.ok) {
      setStatus(await describeHttpError(response), "error");
      if (response.status === 401 || response.status === 403) {
        el.auth.open = true;
        el.apiKey.focus();
      }
      return;
    }
    const type = response.headers.get("Content-Type") || "";
    if (!type.includes("text/event-stream")) {
      // A server that answered in one piece: treat it as the final result.
      const raw = await response.text();
      onDone(JSON.parse(raw), raw);
      run.ended = true;
      return;
    }
    setStatus("Started; waiting for the first step…", "running");
    await readEvents(response.body, (ev) => {
      if (mine.signal.aborted) return false; // stopped: ignore what was already received
      let data;
      try {
        data = JSON.parse(ev.data);
      } catch (_) {
        if (ev.event === "error") data = { error: ev.data };
        else return true; // not JSON: not one of ours
      }
      if (ev.event === "step") onStep(data);
      else if (ev.event === "done") {
        onDone(data, ev.data);
        run.ended = true;
        return false;
      } else if (ev.event === "error") {
        setStatus(`Error: ${describeDetail(data.error ?? data.detail ?? data)}`, "error");
        el.output.classList.add("stopped");
        run.ended = true;
        return false;
      }
      return true;
    });
    if (mine.signal.aborted) throw new DOMException("stopped", "AbortError");
    if (!run.ended) {
      setStatus("The server closed the stream before the run finished.", "error");
    }
  } catch (err) {
    if (mine.signal.aborted) {
      const where = run.steps ? ` at step ${run.step} of ${run.steps}` : " before the first step";
      setStatus(`Stopped${where}.`, "stopped");
      el.output.classList.add("stopped");
    } else {
      setStatus(`Could not reach the server: ${err.message || err}`, "error");
    }
  } finally {
    if (page.controller === mine) page.controller = null;
    mine.abort(); // make sure the connection is closed whatever ended the run
    if (run.target !== null) {
      const info = run.panels[run.target]; // a rewrite refused before its first step leaves the text as it was
      info.copy.hidden = info.text.textContent !== info.final;
    }
    setRunning(false);
  }
}

export function stop() {
  if (page.controller) page.controller.abort();
}
