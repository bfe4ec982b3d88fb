"""GET / serves the web page, app/static/index.html; its assets (the style sheet and the ES modules the page
is made of) are served from /static by `static_files()`."""
from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)

NO_PAGE = """<!doctype html><meta charset="utf-8"><title>sedd-serve</title>
<p>sedd-serve is running. The web page (app/static/index.html) is not installed;
the API is described at <a href="docs">/docs</a>.</p>"""


@router.get("/")
async def index():
    page = STATIC_DIR / "index.html"
    if page.is_file():
        return FileResponse(page, media_type="text/html", headers={"Cache-Control": "no-cache"})
    return HTMLResponse(NO_PAGE)


def static_files() -> StaticFiles:
    """app/static as an ASGI app. Browsers run a module script only when it comes with a JavaScript type, and
    the type of `.js` comes from the host's MIME table (the Windows registry, /etc/mime.types), which may
    map it to text/plain: so it is set here."""
    mimetypes.add_type("text/javascript", ".js")
    return StaticFiles(directory=STATIC_DIR, check_dir=False)
