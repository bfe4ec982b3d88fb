/* Server-Sent-Events parser (the WHATWG event-stream format) and a reader of a fetch() response body.
 *
 * push(text) takes decoded text cut anywhere (inside a line, between CR and LF, ...) and returns the
 * events completed by it; end() returns an event left without its closing blank line. Lines end in
 * CRLF, LF or CR; lines starting with ":" are comments (heartbeats); `id` and `retry` are ignored.
 */
export class SSEParser {
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

/** Read an SSE response body, calling onEvent({event, data}) for each event; onEvent returning false stops. */
export async function readEvents(body, onEvent) {
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
