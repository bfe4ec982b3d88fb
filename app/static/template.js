/* Templates and text offsets: the page's text in the shapes the server reads. */

const GAP = /\[\[\s*(\d+)\s*\]\]/g; // [[40]] in a template: a gap of 40 tokens

/** "ROMEO. [[40]] and JULIET [[30]]." -> ["ROMEO. ", 40, " and JULIET ", 30, "."] (the /infill segments). */
export function parseTemplate(template) {
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
export function codePoints(text, utf16Offset) {
  return Array.from(text.slice(0, utf16Offset)).length;
}
