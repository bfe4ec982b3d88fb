"""GET / serves the web page, app/static/index.html (its assets are mounted at /static)."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

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
