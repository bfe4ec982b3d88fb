/* SEDD text diffusion: the browser page. Plain ES2020, no framework, no build step.
 *
 * It POSTs to /sample or /infill with "stream": true and reads the Server-Sent-Events
 * answer from response.body (EventSource cannot POST). Each `step` event redraws one
 * panel per sample from its per-position pieces; `done` leaves the final texts.
 * Template mode sends {"segments": [...]} to /infill; "Rewrite selection" sends a finished
 * sample's text and the selected character range to /rewrite and redraws only that panel.
 * Kept positions come from `fixed` (one boolean per position) in step events, kept text
 * from `spans` (the generated character ranges) in the done answer; without them the page
 * falls back to prefix_tokens/suffix_tokens and the prefix/suffix.
 */
(() => {
  "use strict";

  const MASK = "\u2591"; // ░, the server's placeholder for a masked position
  const GAP = /\[\[\s*(\d+)\s*\]\]/g; // [[40]] in a template: a gap of 40 tokens
  const KEY_STORE = "sedd-serve.apiKey";
  // API paths relative to this script (served from <base>/static/app.js), so the page
  // also works behind a reverse proxy that mounts the server under a sub-path.
  const scriptUrl = (document.currentScript && document.currentScript.src) || location.href;
  const API_BASE = new URL("..", scriptUrl);
  const api = (path) => new URL(path, API_BASE).toString();

  /* ---------------------------------------------------------------------------------
   * Server-Sent-Events parser (the WHATWG event-stream format).
   * push(text) takes decoded text cut anywhere (inside a line, between CR and LF, ...)
   * and returns the events completed by it; end() returns an event left without its
   * closing blank line. Lines end in CRLF, LF or CR; lines starting with ":" are
   * comments (heartbeats); `id` and `retry` are ignored.
   * ------------------------------------------------------------------------------- */
  class SSEParser {
    constructor() {
      this.buffer = "";
      this.reset();
    }

    reset() {
      this.type = "";
      this.data = [];
      this.hasData = false;
    }

    push(text) {
      this.buffer += text;
      const events = [];
      let start = 0;
      const buf = this.buffer;
      for (let i = 0; i < buf.length; i++) {
        const c = buf.charCodeAt(i);
        if (c !== 10 && c !== 13) continue;
        if (c === 13) {
          if (i + 1 === buf.length) break; // a CR at the end: wait to see whether LF follows
          this.line(buf.slice(start, i), events);
          if (buf.charCodeAt(i + 1) === 10) i++;
        } else {
          this.line(buf.slice(start, i), events);
        }
        start = i + 1;
      }
      this.buffer = buf.slice(start);
      return events;
    }

    end() {
      const events = [];
      if (this.buffer.length) {
        const rest = this.buffer.replace(/\r$/, "");
        this.buffer = "";
        if (rest) this.line(rest, events);
      }
      this.line("", events); // be lenient: dispatch an event that lacks its closing blank line
      return events;
    }

    line(line, events) {
      if (line === "") {
        if (this.hasData) events.push({ event: this.type || "message", data: this.data.join("\n") });
        this.reset();
        return;
      }
      if (line.charCodeAt(0) === 58) return; // ":" comment, e.g. ": ping"
      const colon = line.indexOf(":");
      let field = line;
      let value = "";
      if (colon >= 0) {
        field = line.slice(0, colon);
        value = line.slice(colon + 1);
        if (value.charCodeAt(0) === 32) value = value.slice(1);
      }
      if (field === "event") this.type = value;
      else if (field === "data") {
        this.data.push(value);
        this.hasData = true;
      }
    }
  }

  /** Read an SSE response body, calling onEvent({event, data}) for each event. */
  async function readEvents(body, onEvent) {
    const reader = body.getReader();
    const decoder = new TextDecoder("utf-8");
    const parser = new SSEParser();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const ev of parser.push(decoder.decode(value, { stream: true }))) {
          if (onEvent(ev) === false) return;
        }
      }
      for (const ev of parser.push(decoder.decode())) if (onEvent(ev) === false) return;
      for (const ev of parser.end()) if (onEvent(ev) === false) return;
    } finally {
      reader.releaseLock();
    }
  }

  /* ---------------------------------------------------------------------------------
   * Error messages
   * ------------------------------------------------------------------------------- */

  /** A readable line from FastAPI's {"detail": ...}: a string, or a list of validation errors. */
  function describeDetail(detail) {
    if (detail == null) return "";
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail
        .map((item) => {
          if (!item || typeof item !== "object") return String(item);
          const loc = Array.isArray(item.loc) ? item.loc.filter((p) => p !== "body").join(".") : "";
          const msg = item.msg || item.message || JSON.stringify(item);
          return loc ? `${loc}: ${msg}` : msg;
        })
        .join("; ");
    }
    if (typeof detail === "object") return detail.message || detail.error || JSON.stringify(detail);
    return String(detail);
  }

  async function describeHttpError(response) {
    let message = "";
    const text = await response.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      message = describeDetail(body.detail !== undefined ? body.detail : body.error !== undefined ? body.error : body);
    } catch (_) {
      message = text.trim().slice(0, 300);
    }
    if (!message) message = response.statusText || "request failed";
    const code = `HTTP ${response.status}`;
    if (response.status === 503) {
      const retry = response.headers.get("Retry-After");
      const wait = retry && /^\d+$/.test(retry.trim()) ? ` Try again in ${retry.trim()} s.` : " Try again shortly.";
      return `Server busy (${code}): ${message}.${wait}`.replace(/\.\./g, ".");
    }
    if (response.status === 401 || response.status === 403) {
      return `${message} (${code}). Enter the server's key under “API key”.`;
    }
    return `${message} (${code})`;
  }

  /* ---------------------------------------------------------------------------------
   * Templates: "ROMEO. [[40]] and JULIET [[30]]." -> ["ROMEO. ", 40, " and JULIET ", 30, "."]
   * ------------------------------------------------------------------------------- */
  function parseTemplate(template) {
    const segments = [];
    let last = 0;
    for (const match of template.matchAll(GAP)) {
      if (match.index > last) segments.push(template.slice(last, match.index));
      const size = Number(match[1]);
      if (!(size >= 1)) throw new Error(`The gap ${match[0]} needs at least 1 token.`);
      segments.push(size);
      last = match.index + match[0].length;
    }
    if (last < template.length) segments.push(template.slice(last));
    if (!segments.some((s) => typeof s === "number")) {
      throw new Error("Mark at least one gap in the template with [[N]], e.g. [[20]].");
    }
    return segments;
  }

  /** Code-point offsets (what the server counts) of UTF-16 offsets into `text` (what the DOM counts). */
  function codePoints(text, utf16Offset) {
    return Array.from(text.slice(0, utf16Offset)).length;
  }

  /* ---------------------------------------------------------------------------------
   * Page
   * ------------------------------------------------------------------------------- */
  const $ = (id) => document.getElementById(id);

  function init() {
    const el = {
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

    let controller = null; // AbortController of the run in progress
    let run = null; // what the run in progress has shown
    let model = null;

    /* ---- API key ---------------------------------------------------------------- */
    const storage = {
      get() {
        try { return localStorage.getItem(KEY_STORE) || ""; } catch (_) { return ""; }
      },
      set(value) {
        try {
          if (value) localStorage.setItem(KEY_STORE, value);
          else localStorage.removeItem(KEY_STORE);
        } catch (_) { /* storage disabled: the key lives in the field only */ }
      },
    };
    el.apiKey.value = storage.get();
    if (el.apiKey.value) el.auth.open = true;
    el.apiKey.addEventListener("change", () => {
      storage.set(el.apiKey.value.trim());
      if (!model) loadModel(); // the model information may have been refused for want of a key
    });
    el.forgetKey.addEventListener("click", () => {
      el.apiKey.value = "";
      storage.set("");
      el.apiKey.focus();
    });

    function headers(json) {
      const h = { Accept: json ? "application/json" : "text/event-stream" };
      if (!json) h["Content-Type"] = "application/json";
      const key = el.apiKey.value.trim();
      if (key) h.Authorization = `Bearer ${key}`;
      return h;
    }

    function askForKey() {
      el.auth.open = true;
    }

    /* ---- status ----------------------------------------------------------------- */
    function setStatus(text, kind = "") {
      el.status.textContent = text;
      el.status.className = kind;
    }

    function setProgress(fraction) {
      el.progress.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
    }

    /* ---- mode --------------------------------------------------------------------- */
    function syncMode() {
      const infill = el.mode.value === "infill";
      const template = el.mode.value === "template";
      el.prompt.hidden = !infill;
      el.prompt.disabled = !infill;
      el.templateFields.hidden = !template;
      el.templateFields.disabled = !template;
      el.length.disabled = template; // a template's text and gaps make its length
    }
    el.mode.addEventListener("change", syncMode);
    syncMode();

    el.insertGap.addEventListener("click", () => {
      const size = Number.parseInt(el.gapSize.value, 10);
      const gap = `[[${Number.isInteger(size) && size > 0 ? size : 20}]]`;
      el.template.focus();
      el.template.setRangeText(gap, el.template.selectionStart, el.template.selectionEnd, "end");
      el.template.dispatchEvent(new Event("input", { bubbles: true }));
    });

    /* ---- model information -------------------------------------------------------- */
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
          if (response.status === 401 || response.status === 403) askForKey();
          el.modelInfo.textContent = `Model information unavailable: ${await describeHttpError(response)}`;
          return;
        }
        model = await response.json();
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

    /* ---- output ------------------------------------------------------------------- */
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
      const info = run && run.panels.find((p) => p.panel === panel);
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

    /** The base class of each position: kept text at the start (prefix), at the end (suffix), between, or not. */
    function pieceClasses(n, fixed, prefixTokens, suffixTokens) {
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
    function drawPieces(info, pieces, classes) {
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
    function drawFinal(info, text, prefix, suffix, spans) {
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

    /** The panels a run draws into: one per sample, or for a rewrite the one panel being rewritten. */
    function targetPanels(count) {
      if (run.target === null) {
        ensurePanels(count);
        return run.panels;
      }
      return [run.panels[run.target]];
    }

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
      run.step = data.step;
      run.steps = data.steps;
      setProgress(data.steps ? data.step / data.steps : 0);
      setStatus(`Denoising: step ${data.step} of ${data.steps} · ${masks} ${masks === 1 ? "mask" : "masks"} left`, "running");
      document.dispatchEvent(new CustomEvent("sedd:step", { detail: data }));
    }

    function onDone(data, raw) {
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
      // The seed may exceed 2^53: take its digits from the raw JSON, not the parsed number.
      const seedMatch = /"seed"\s*:\s*(-?\d+)/.exec(raw);
      if (seedMatch) parts.push(`seed ${seedMatch[1]}`);
      setStatus(parts.join(" · "), "done");
      document.dispatchEvent(new CustomEvent("sedd:done", { detail: data }));
    }

    /* ---- running ------------------------------------------------------------------ */
    function setRunning(running) {
      const hadFocus = document.activeElement;
      el.generate.disabled = running;
      el.stop.disabled = !running;
      syncRewrite(running);
      el.form.setAttribute("aria-busy", running ? "true" : "false");
      // Keep keyboard focus on a usable button when the focused one becomes disabled.
      if (running && hadFocus === el.generate) el.stop.focus();
      if (!running && hadFocus === el.stop) el.generate.focus();
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

    /** A streamed request's JSON: `fields`, the form's predictor, and the named integers from the form. */
    function streamedJson(fields, integers) {
      const body = { ...fields, predictor: el.predictor.value, stream: true, stream_every: 1, pieces: true };
      for (const name of integers) body[name] = null; // withIntegers writes the typed digits in
      return withIntegers(body, integers);
    }

    function buildBody() {
      if (el.mode.value === "template") {
        const json = streamedJson({ segments: parseTemplate(el.template.value) }, ["num_samples", "steps", "seed"]);
        return { json, path: "infill", prefix: "", suffix: "" };
      }
      const infill = el.mode.value === "infill";
      const prompt = infill ? { prefix: el.prefix.value, suffix: el.suffix.value } : {};
      const json = streamedJson(prompt, ["num_samples", "steps", "length", "seed"]);
      return { json, path: infill ? "infill" : "sample", prefix: prompt.prefix || "", suffix: prompt.suffix || "" };
    }

    /* ---- rewriting a selected span -------------------------------------------------- */
    let selected = null; // {target, start, end} of the current selection inside one finished sample

    /** The selection as code-point offsets into one finished sample's text, or null. */
    function selectionInSample() {
      const sel = getSelection();
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

    function syncRewrite(running = controller !== null) {
      selected = running ? null : selectionInSample();
      el.rewrite.disabled = selected === null;
    }
    document.addEventListener("selectionchange", () => syncRewrite());
    // Pressing the button must not move focus or clear the selection it acts on.
    el.rewrite.addEventListener("mousedown", (ev) => ev.preventDefault());

    function buildRewrite() {
      const { target, start, end } = selected;
      const fields = { text: run.panels[target].final, spans: [[start, end]], num_samples: 1 };
      return { json: streamedJson(fields, ["steps", "seed"]), path: "rewrite", target, prefix: "", suffix: "" };
    }

    function rewrite() {
      if (controller || !selected) return;
      let request;
      try {
        request = buildRewrite();
      } catch (err) {
        setStatus(err.message, "error");
        return;
      }
      getSelection().removeAllRanges();
      start(request);
    }
    el.rewrite.addEventListener("click", rewrite);

    async function generate() {
      if (controller) return;
      let request;
      try {
        request = buildBody();
      } catch (err) {
        setStatus(err.message, "error");
        return;
      }
      start({ ...request, target: null });
    }

    /** Run one request: a fresh set of panels, or (target set) a rewrite drawn into that panel alone. */
    async function start(request) {
      controller = new AbortController();
      const mine = controller;
      const panels = request.target === null || !run ? [] : run.panels;
      run = { panels, target: request.target, step: 0, steps: 0, prefix: request.prefix, suffix: request.suffix,
              ended: false };
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
            askForKey();
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
        if (controller === mine) controller = null;
        mine.abort(); // make sure the connection is closed whatever ended the run
        if (run.target !== null) {
          const info = run.panels[run.target]; // a rewrite refused before its first step leaves the text as it was
          info.copy.hidden = info.text.textContent !== info.final;
        }
        setRunning(false);
      }
    }

    function stop() {
      if (controller) controller.abort();
    }

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
      if (ev.key === "Escape" && controller) {
        ev.preventDefault();
        stop();
      }
    });

    setRunning(false);
    loadModel();
  }

  // For tests and for whoever wants to reuse them.
  window.SEDD = { SSEParser, readEvents, describeDetail, parseTemplate };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
