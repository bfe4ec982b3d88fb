"""The browser page (app/static) in a real headless Chromium against the real server.

Debian's `chromium` driven by Playwright for Python; `playwright install` is never
needed. Without chromium or playwright every test here skips and says why.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_OUTPUT = REPO_ROOT / "test-output"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CONTROLS = ["mode", "prefix", "suffix", "steps", "predictor", "length", "seed", "samples", "temperature", "top-p"]
MASK = "\u2591"


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the page tests need it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, tiny_server):
    """A fresh page on the server's GET /, collecting console errors and uncaught exceptions."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.errors = []
    page.on("console", lambda msg: page.errors.append(f"console.{msg.type}: {msg.text}")
            if msg.type == "error" else None)
    page.on("pageerror", lambda exc: page.errors.append(f"pageerror: {exc}"))
    page.goto(tiny_server.rstrip("/") + "/")
    page.wait_for_function("document.getElementById('model-info').textContent.includes('tiny-five')")
    yield page
    context.close()


def record_steps(page) -> None:
    """Log, at every `step` event the page renders, what #output and the buttons show right then."""
    page.evaluate("""() => {
        window.__steps = [];
        document.addEventListener('sedd:step', (ev) => {
            const out = document.getElementById('output');
            window.__steps.push({
                step: ev.detail.step,
                masks: out.querySelectorAll('.mask').length,
                placeholders: (out.textContent.match(/\\u2591/g) || []).length,
                revealed: out.querySelectorAll('.revealed').length,
                prefix: Array.from(out.querySelectorAll('.fixed.prefix'), (e) => e.textContent).join(''),
                suffix: Array.from(out.querySelectorAll('.fixed.suffix'), (e) => e.textContent).join(''),
                status: document.getElementById('status').textContent,
                generateDisabled: document.getElementById('generate').disabled,
                stopDisabled: document.getElementById('stop').disabled,
            });
        });
    }""")


def test_page_loads_clean_and_accessible(page):
    for control in CONTROLS + ["generate", "stop", "output", "status"]:
        assert page.locator(f"#{control}").count() == 1, control
    for control in CONTROLS:  # every control has a label
        assert page.locator(f"label[for='{control}']").count() == 1, control
    assert page.get_attribute("#status", "aria-live") == "polite"
    assert page.is_enabled("#generate") and page.is_disabled("#stop")
    # Field limits come from GET /v1/model: tiny-five's length is 12.
    assert page.get_attribute("#length", "max") == "12"
    # The prompt fields are there only for infill.
    assert page.is_hidden("#prefix") and page.is_disabled("#prefix")
    page.select_option("#mode", "infill")
    assert page.is_visible("#prefix") and page.is_enabled("#suffix")
    page.select_option("#mode", "sample")
    assert page.is_hidden("#suffix")
    # Newlines inside pieces (a GPT-2 token, a "\n" character) must show as line breaks.
    assert page.evaluate("getComputedStyle(document.querySelector('.text') || (() => {"
                         " const d = document.createElement('div'); d.className = 'text';"
                         " document.getElementById('output').append(d); return d; })()).whiteSpace") == "pre-wrap"
    # Visible keyboard focus.
    page.focus("#steps")
    page.keyboard.press("Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none")
    assert page.errors == []


def test_sse_parser_handles_any_chunking(page):
    """Chunk boundaries anywhere (inside CRLF, inside a UTF-8 character), CR/LF/CRLF, comments."""
    result = page.evaluate("""async () => {
        const stream = ': ping\\r\\n\\r\\n' +
            'event: step\\r\\ndata: {"step": 1, "text": "a\\u2591"}\\r\\n\\r\\n' +
            ': ping\\n\\n' +
            'event: step\\ndata:{"step": 2,\\ndata: "text": "\\u00e9\\u2591"}\\n\\n' +
            'event: done\\rdata: {"ok": true}\\r\\r' +
            'data: no-event-name\\n\\n';
        const parse = (chunks) => {
            const parser = new SEDD.SSEParser();
            const events = [];
            for (const c of chunks) events.push(...parser.push(c));
            events.push(...parser.end());
            return JSON.stringify(events);
        };
        const whole = parse([stream]);
        const bad = [];
        for (let i = 0; i <= stream.length; i++) {
            for (let j = i; j <= stream.length; j += 7) {
                const got = parse([stream.slice(0, i), stream.slice(i, j), stream.slice(j)]);
                if (got !== whole) bad.push([i, j]);
            }
        }
        if (parse(Array.from(stream)) !== whole) bad.push('one character at a time');
        // Bytes: split every UTF-8 sequence through readEvents (TextDecoder in stream mode).
        const bytes = new TextEncoder().encode(stream);
        const body = new ReadableStream({ start(ctl) {
            for (const b of bytes) ctl.enqueue(new Uint8Array([b]));
            ctl.close();
        }});
        const fromBytes = [];
        await SEDD.readEvents(body, (ev) => { fromBytes.push(ev); });
        return { whole: JSON.parse(whole), bad, bytes: JSON.stringify(fromBytes) === whole };
    }""")
    assert result["bad"] == []
    assert result["bytes"] is True
    events = result["whole"]
    assert [e["event"] for e in events] == ["step", "step", "done", "message"]
    assert json.loads(events[0]["data"]) == {"step": 1, "text": "a" + MASK}
    assert json.loads(events[1]["data"]) == {"step": 2, "text": "\u00e9" + MASK}
    assert events[3]["data"] == "no-event-name"


def test_infill_streams_masks_then_final_text(page):
    page.select_option("#mode", "infill")
    page.fill("#prefix", "di")
    page.fill("#suffix", "ok")
    page.fill("#samples", "2")
    page.fill("#steps", "32")
    record_steps(page)
    page.press("#steps", "Enter")  # Enter in a field submits
    page.wait_for_selector("#status.done")
    steps = page.evaluate("window.__steps")

    assert steps, "no step event was rendered"
    masked = [s for s in steps if s["masks"] > 0]
    assert masked, f"no intermediate state with placeholders: {steps}"
    first = masked[0]
    assert first["placeholders"] == first["masks"]  # one ░ cell per masked position
    assert "of 32" in first["status"] and "masks left" in first["status"]
    assert first["prefix"] == "di" * 2 and first["suffix"] == "ok" * 2  # the prompt is styled apart
    assert any(s["revealed"] > 0 for s in steps)  # freshly revealed positions are highlighted
    assert all(s["generateDisabled"] and not s["stopDisabled"] for s in steps)

    texts = page.locator("#output .sample .text").all_text_contents()
    assert len(texts) == 2
    for text in texts:
        assert len(text) == 12 and text.startswith("di") and text.endswith("ok") and MASK not in text
    assert page.locator("#output .fixed.prefix").all_text_contents() == ["di", "di"]
    assert page.locator("#output .fixed.suffix").all_text_contents() == ["ok", "ok"]
    assert page.is_enabled("#generate") and page.is_disabled("#stop")
    TEST_OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(TEST_OUTPUT / "web-page-infill.png"), full_page=True)
    assert page.errors == []


def test_stop_aborts_the_stream(page):
    max_steps = page.evaluate("fetch('v1/model').then((r) => r.json()).then((m) => m.max_steps || 1000)")
    steps = min(1000, max_steps)
    page.fill("#steps", str(steps))
    record_steps(page)
    page.focus("#generate")
    page.keyboard.press("Enter")
    page.wait_for_function("window.__steps.length >= 2")
    # Keyboard users land on Stop when Generate disables itself.
    assert page.evaluate("document.activeElement.id") == "stop"
    page.keyboard.press("Enter")
    page.wait_for_selector("#status.stopped")
    assert "stopped" in page.text_content("#status").lower()
    assert page.is_enabled("#generate") and page.is_disabled("#stop")
    seen = page.evaluate("window.__steps.length")
    page.wait_for_timeout(300)
    assert page.evaluate("window.__steps.length") == seen  # nothing more is drawn
    assert seen < steps
    assert page.locator("#output .mask").count() > 0  # the partial state stays on screen
    assert page.errors == []


def test_temperature_and_top_p_fields(page):
    """The API's defaults; temperature 0 gives one text whatever the seed; they go into every request."""
    assert page.input_value("#temperature") == "1" and page.input_value("#top-p") == "1"
    sent = []
    page.on("request", lambda req: sent.append(json.loads(req.post_data)) if req.method == "POST" else None)
    page.fill("#samples", "2")
    page.fill("#steps", "12")
    page.fill("#temperature", "0")
    texts = []
    for seed in ("1", "2"):
        page.fill("#seed", seed)
        page.click("#generate")
        page.wait_for_selector("#status.done")
        texts.append(page.locator("#output .sample .text").all_text_contents())
    assert texts[0] == texts[1] and len(set(texts[0])) == 1 and MASK not in texts[0][0]
    assert "deterministic" in page.text_content("#status")
    assert [(body["temperature"], body["top_p"]) for body in sent] == [(0, 1), (0, 1)]
    page.fill("#temperature", "0.7")
    page.fill("#top-p", "0.9")
    page.click("#generate")
    page.wait_for_selector("#status.done")
    assert (sent[-1]["temperature"], sent[-1]["top_p"]) == (0.7, 0.9)
    assert "temperature 0.7" in page.text_content("#status") and "top-p 0.9" in page.text_content("#status")
    # out of range (past the browser's own validation): the server's message, which states the range
    page.evaluate("document.getElementById('form').noValidate = true")
    page.fill("#top-p", "1.5")
    page.click("#generate")
    page.wait_for_selector("#status.error")
    assert "top_p" in page.text_content("#status") and "at most 1" in page.text_content("#status")
    assert [e for e in page.errors if "status of 4" not in e] == []


@pytest.mark.parametrize("bad, expected", [
    ("prefix", "cannot encode"),  # a character outside tiny-five's vocabulary
    ("steps", "steps"),  # steps 0, past the browser's own validation
])
def test_bad_input_shows_the_servers_message(page, bad, expected):
    page.select_option("#mode", "infill")
    page.fill("#suffix", "ok")
    if bad == "prefix":
        page.fill("#prefix", "caf\u00e9")
    else:
        page.evaluate("document.getElementById('form').noValidate = true")
        page.fill("#steps", "0")
    page.click("#generate")
    page.wait_for_selector("#status.error")
    status = page.text_content("#status")
    assert expected in status and "HTTP 4" in status, status
    assert page.is_enabled("#generate") and page.is_disabled("#stop")
    # The browser logs the failed request itself; nothing else may go wrong.
    assert [e for e in page.errors if "status of 4" not in e] == []


def test_busy_and_unauthorized_answers(page):
    """503 + Retry-After and 401 (faked in the browser: the server's own answers are tested elsewhere);
    the API key typed in is then sent as a bearer token and kept in localStorage."""
    answers = [(503, {"Retry-After": "3"}, "the server is busy: 32 requests are waiting (the limit)"),
               (401, {"WWW-Authenticate": "Bearer"}, "this server needs an API key")]

    def fake(route):
        if not answers:
            return route.continue_()
        status, headers, detail = answers.pop(0)
        return route.fulfill(status=status, headers=headers, content_type="application/json",
                             body=json.dumps({"detail": detail}))

    page.route("**/sample", fake)
    sent = []
    page.on("request", lambda req: sent.append(req.headers.get("authorization")) if req.method == "POST" else None)
    page.fill("#steps", "4")
    page.click("#generate")
    page.wait_for_selector("#status.error")
    status = page.text_content("#status")
    assert "busy" in status and "503" in status and "3 s" in status, status
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.includes('401')")
    assert "needs an API key" in page.text_content("#status")
    assert page.is_visible("#api-key") and page.evaluate("document.activeElement.id") == "api-key"
    page.keyboard.type("page-test-key")
    page.keyboard.press("Enter")
    page.wait_for_selector("#status.done")
    assert sent == [None, None, "Bearer page-test-key"]
    page.reload()
    page.wait_for_function("document.getElementById('model-info').textContent.includes('tiny-five')")
    assert page.input_value("#api-key") == "page-test-key"
    assert [e for e in page.errors if "status of 401" not in e and "status of 503" not in e] == []


def char_box(page, panel: int, offset: int) -> dict:
    """The on-screen box of the character at `offset` in the text of sample panel `panel`."""
    return page.evaluate("""([panel, offset]) => {
        const text = document.querySelectorAll('#output .sample .text')[panel];
        const walker = document.createTreeWalker(text, NodeFilter.SHOW_TEXT);
        let left = offset;
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            if (left < node.length) {
                const range = document.createRange();
                range.setStart(node, left);
                range.setEnd(node, left + 1);
                const r = range.getBoundingClientRect();
                return { x: r.x, y: r.y, width: r.width, height: r.height };
            }
            left -= node.length;
        }
        throw new Error(`no character ${offset}`);
    }""", [panel, offset])


def select_with_mouse(page, panel: int, start: int, end: int) -> None:
    """Drag from the left edge of character `start` to the right edge of character `end - 1`."""
    first, last = char_box(page, panel, start), char_box(page, panel, end - 1)
    page.mouse.move(first["x"] + 1, first["y"] + first["height"] / 2)
    page.mouse.down()
    page.mouse.move(last["x"] + last["width"] / 2, last["y"] + last["height"] / 2, steps=5)
    page.mouse.move(last["x"] + last["width"] - 0.5, last["y"] + last["height"] / 2)
    page.mouse.up()


def test_template_run_keeps_its_text(page):
    page.select_option("#mode", "template")
    assert page.is_visible("#template") and page.is_disabled("#length")
    page.fill("#template", "h[[3]]o w")
    page.fill("#gap-size", "3")
    page.focus("#template")
    page.evaluate("document.getElementById('template').setSelectionRange(9, 9)")
    page.click("#insert-gap")  # the button writes [[3]] at the caret
    page.type("#template", "!")
    assert page.input_value("#template") == "h[[3]]o w[[3]]!"
    page.fill("#samples", "2")
    page.fill("#steps", "24")
    page.fill("#seed", "4")
    record_steps(page)
    page.evaluate("""() => document.addEventListener('sedd:step', () => window.__steps.at(-1).kept =
        Array.from(document.querySelectorAll('#output .fixed.kept'), (e) => e.textContent).join(''))""")
    sent = []
    page.on("request", lambda req: sent.append(json.loads(req.post_data)) if req.method == "POST" else None)
    page.click("#generate")
    page.wait_for_selector("#status.done")
    assert sent[0]["segments"] == ["h", 3, "o w", 3, "!"]
    steps = page.evaluate("window.__steps")
    assert steps and any(s["masks"] > 0 for s in steps)
    for step in steps:  # kept text is tinted live, from the step events' `fixed` flags
        assert (step["prefix"], step["kept"], step["suffix"]) == ("h" * 2, "o w" * 2, "!" * 2), step
    texts = page.locator("#output .sample .text").all_text_contents()
    assert len(texts) == 2
    for text in texts:
        assert len(text) == 11 and MASK not in text
        assert text[0] == "h" and text[4:7] == "o w" and text[10] == "!", text
    assert page.locator("#output .fixed.kept").all_text_contents() == ["o w", "o w"]
    assert [len(t) for t in page.locator("#output .tok.generated").all_text_contents()] == [3, 3, 3, 3]
    assert page.errors == []


def test_rewrite_changes_only_the_selected_span(page):
    page.fill("#samples", "2")
    page.fill("#steps", "24")
    page.fill("#seed", "8")
    page.click("#generate")
    page.wait_for_selector("#status.done")
    before = page.locator("#output .sample .text").all_text_contents()
    assert page.is_disabled("#rewrite")  # nothing selected yet
    select_with_mouse(page, panel=1, start=3, end=8)
    assert page.evaluate("getSelection().toString()") == before[1][3:8]
    assert page.is_enabled("#rewrite")
    sent = []
    page.on("request", lambda req: sent.append(json.loads(req.post_data)) if req.method == "POST" else None)
    record_steps(page)
    page.click("#rewrite")
    page.wait_for_selector("#status.done")
    assert sent == [{"text": before[1], "spans": [[3, 8]], "num_samples": 1, "steps": 24, "predictor": "analytic",
                     "temperature": 1, "top_p": 1, "seed": 8, "stream": True, "stream_every": 1, "pieces": True}]
    steps = page.evaluate("window.__steps")
    assert steps and steps[0]["masks"] == 5  # the span went back to masks, only it
    assert "Rewrote a span of sample 2" in page.text_content("#status")
    after = page.locator("#output .sample .text").all_text_contents()
    assert after[0] == before[0]  # the other sample is untouched
    assert len(after[1]) == len(before[1]) and MASK not in after[1]
    assert after[1][:3] == before[1][:3] and after[1][8:] == before[1][8:]
    assert page.locator("#output .sample").nth(1).locator(".tok.generated").all_text_contents() == [after[1][3:8]]
    TEST_OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(TEST_OUTPUT / "web-page-rewrite.png"), full_page=True)
    assert page.errors == []
