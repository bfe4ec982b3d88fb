#!/usr/bin/env python3
"""Screenshots of the web page for the README: a finished infill run, a run caught midway, and a
template run whose selected span is being rewritten.

    .venv/bin/python scripts/screenshot.py                                # the default model
    .venv/bin/python scripts/screenshot.py --model tests/data/reference/tiny-five
    .venv/bin/python scripts/screenshot.py --url http://127.0.0.1:8000    # a server already running
    .venv/bin/python scripts/screenshot.py --shots rewrite                # only the rewrite picture

Starts the server (uvicorn app.main:create_app) on a free local port with SEDD_MODEL=--model,
waits for /health, drives the page in Debian's headless `chromium` through Playwright, and
writes docs/screenshot.png (finished) and docs/screenshot-running.png (mid-run) for `infill`,
docs/screenshot-rewrite.png for `rewrite` (a Template run, then part of its first sample
selected and rewritten, caught midway). The mid-run shots are exact: the page's stream reader
is held at the chosen step while the picture is taken.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Holds the page's stream reader while window.__hold is a pending promise (set from a step listener).
HOLD_READS = """
(() => {
  const read = ReadableStreamDefaultReader.prototype.read;
  ReadableStreamDefaultReader.prototype.read = async function (...args) {
    while (window.__hold) await window.__hold;
    return read.apply(this, args);
  };
})();
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


@contextmanager
def server(model: str, timeout: float, env_extra: dict[str, str]):
    """Start `uvicorn app.main:create_app` on a free port; yield its URL once GET /health answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SEDD_MODEL=model, **env_extra)
    with tempfile.NamedTemporaryFile("w+", prefix="sedd-screenshot-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
                                 "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    log.flush()
                    raise SystemExit(f"the server exited with {proc.returncode}:\n"
                                     f"{Path(log.name).read_text()[-3000:]}")
                try:
                    get_json(url + "/health", timeout=2)
                    break
                except urllib.error.HTTPError as exc:  # 503 while loading; status "failed" if it cannot
                    health = json.loads(exc.read() or b"{}")
                    if health.get("status") == "failed":
                        raise SystemExit(f"the model failed to load: {health.get('error')}") from None
                    time.sleep(0.25)
                except (urllib.error.URLError, OSError):
                    time.sleep(0.25)
                if time.monotonic() > deadline:
                    raise SystemExit(f"the server was not ready in {timeout:.0f} s; its log: {log.name}")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    Path(log.name).unlink(missing_ok=True)


# Set window.__hold (see HOLD_READS) once about half of the masked positions are revealed.
HOLD_HALFWAY = """() => {
    let first = null;
    const onStep = (ev) => {
        const left = ev.detail.samples.reduce((n, s) => n + s.masks_left, 0);
        if (first === null) first = Math.max(left, 1);
        if (left <= first * 0.55 && left > 0) {
            document.removeEventListener('sedd:step', onStep);
            window.__hold = new Promise((resolve) => { window.__release = resolve; });
            window.__held = true;
        }
    };
    window.__held = false;
    document.addEventListener('sedd:step', onStep);
}"""

# Select the middle of the first generated span of sample 1 (whole words where it can), as a mouse would.
SELECT_IN_FIRST_GAP = """() => {
    const text = document.querySelector('#output .sample .text');
    const gap = text.querySelector('.tok.generated');
    const node = gap.firstChild;
    const value = node.textContent;
    let start = Math.floor(value.length * 0.3);
    let end = Math.max(start + 1, Math.floor(value.length * 0.75));
    const before = value.lastIndexOf(' ', start);
    const after = value.indexOf(' ', end);
    if (before > 0 && start - before < 12) start = before + 1;
    if (after > 0 && after - end < 12) end = after;
    getSelection().setBaseAndExtent(node, start, node, end);
    return value.slice(start, end);
}"""


def defaults_for(info: dict, args) -> dict:
    """Prompt and sizes that suit the model unless given: tiny models get the tiny-five corpus words."""
    length = info.get("length") or 12
    short = length <= 32
    return {
        "prefix": args.prefix if args.prefix is not None else ("di" if short else "Once upon a time, "),
        "suffix": args.suffix if args.suffix is not None else ("ok" if short else " The end."),
        "length": args.length if args.length is not None else (None if length <= 256 else 128),
        "steps": args.steps if args.steps is not None else (32 if short else 128),
        "samples": args.samples if args.samples is not None else (4 if short else 2),
        "template": args.template if args.template is not None else (
            "h[[3]]o w[[4]]!" if short else "ROMEO. [[40]]\nJULIET. [[40]]\nROMEO. [[24]]"),
    }


def shoot_held(page, out: Path, what: str, full_page: bool) -> None:
    """After a click that starts a run with HOLD_HALFWAY armed: the picture of the held state, then let it finish."""
    page.wait_for_function("window.__held === true || document.querySelector('#status.done, #status.error')")
    if page.evaluate("window.__held === true"):
        page.evaluate("window.scrollTo(0, 0)")  # the status line and the output's head in view
        page.wait_for_timeout(150)  # let the reveal highlight show
        page.screenshot(path=str(out), full_page=full_page)
        print(f"wrote {out}: {page.text_content('#status')}")
        page.evaluate("window.__hold = null; window.__release()")
    else:
        print(f"the {what} ended before a mid-run state could be held; {out.name} not written", file=sys.stderr)
    page.wait_for_selector("#status.done, #status.error")
    if page.locator("#status.error").count():
        raise SystemExit(f"the {what} failed: {page.text_content('#status')}")


def shoot_infill(page, run: dict, out_dir: Path, args) -> None:
    page.select_option("#mode", "infill")
    page.fill("#prefix", run["prefix"])
    page.fill("#suffix", run["suffix"])
    page.fill("#steps", str(run["steps"]))
    page.fill("#samples", str(run["samples"]))
    page.fill("#length", "" if run["length"] is None else str(run["length"]))
    if args.seed is not None:
        page.fill("#seed", str(args.seed))
    page.evaluate(HOLD_HALFWAY)
    page.click("#generate")
    page.mouse.move(0, 0)  # no hover styles in the pictures
    shoot_held(page, out_dir / "screenshot-running.png", "run", args.full_page)
    page.wait_for_timeout(1300)  # the last reveal highlights fade out
    page.screenshot(path=str(out_dir / "screenshot.png"), full_page=args.full_page)
    print(f"wrote {out_dir / 'screenshot.png'}: {page.text_content('#status')}")


def shoot_rewrite(page, run: dict, out_dir: Path, args) -> None:
    page.select_option("#mode", "template")
    page.fill("#template", run["template"])
    page.fill("#steps", str(run["steps"]))
    page.fill("#samples", "2")
    if args.seed is not None:
        page.fill("#seed", str(args.seed))
    page.click("#generate")
    page.mouse.move(0, 0)
    page.wait_for_selector("#status.done, #status.error")
    if page.locator("#status.error").count():
        raise SystemExit(f"the template run failed: {page.text_content('#status')}")
    page.wait_for_timeout(1300)
    selected = page.evaluate(SELECT_IN_FIRST_GAP)
    page.wait_for_function("!document.getElementById('rewrite').disabled")
    page.evaluate(HOLD_HALFWAY)
    page.click("#rewrite")
    page.mouse.move(0, 0)
    shoot_held(page, out_dir / "screenshot-rewrite.png", "rewrite", args.full_page)
    print(f"rewrote {selected!r}: {page.text_content('#status')}")


def shoot(url: str, args) -> None:
    from playwright.sync_api import sync_playwright

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    request = urllib.request.Request(url.rstrip("/") + "/v1/model", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        info = json.load(response)
    run = defaults_for(info, args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": args.width, "height": args.height},
                                      device_scale_factor=args.scale, color_scheme=args.color_scheme)
        page = context.new_page()
        page.set_default_timeout(args.run_timeout * 1000)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.add_init_script(HOLD_READS)
        if args.api_key:
            page.add_init_script(f"localStorage.setItem('sedd-serve.apiKey', {json.dumps(args.api_key)})")
        for shot in args.shots:
            page.goto(url.rstrip("/") + "/")
            page.wait_for_function("document.getElementById('model-info').textContent.includes(' · ')")
            (shoot_infill if shot == "infill" else shoot_rewrite)(page, run, out_dir, args)
        if errors:
            print("page errors:\n  " + "\n  ".join(errors), file=sys.stderr)
        browser.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("SEDD_MODEL", "default"),
                    help="SEDD_MODEL for the server it starts (default: $SEDD_MODEL or 'default')")
    ap.add_argument("--url", help="use this running server instead of starting one")
    ap.add_argument("--api-key", default=os.environ.get("SEDD_API_KEY"), help="the server's API key, if any")
    ap.add_argument("--prefix")
    ap.add_argument("--suffix")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--samples", type=int)
    ap.add_argument("--length", type=int)
    ap.add_argument("--template", help="the Template run's text, gaps as [[N]] (for the rewrite picture)")
    ap.add_argument("--shots", type=lambda v: v.split(","), default=["infill", "rewrite"],
                    help="which pictures, comma-separated: infill (screenshot.png, screenshot-running.png), "
                         "rewrite (screenshot-rewrite.png); default both")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out-dir", default=str(REPO_ROOT / "docs"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=760)
    ap.add_argument("--scale", type=float, default=1.0, help="device pixel ratio (2 for sharper, larger PNGs)")
    ap.add_argument("--color-scheme", choices=["light", "dark"], default="light")
    ap.add_argument("--full-page", action="store_true", help="the whole page, not only the window")
    ap.add_argument("--device", help="SEDD_DEVICE for the server it starts (cpu, cuda)")
    ap.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for the model to load")
    ap.add_argument("--run-timeout", type=float, default=600, help="seconds to wait for the run")
    args = ap.parse_args(argv)
    if not set(args.shots) <= {"infill", "rewrite"}:
        ap.error(f"--shots: choose from infill, rewrite (got {','.join(args.shots)})")
    if args.url:
        shoot(args.url, args)
        return 0
    env = {"SEDD_DEVICE": args.device} if args.device else {}
    if args.api_key:
        env["SEDD_API_KEY"] = args.api_key
    with server(args.model, args.start_timeout, env) as url:
        shoot(url, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
