"""The web chat: GET / and the page's own files under /static/, each sent with a Content-Security-Policy."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"chat.js": "text/javascript; charset=utf-8", "markdown.js": "text/javascript; charset=utf-8", "chat.css": "text/css; charset=utf-8"}
# The page runs only its own scripts and talks only to this server: even text that got past the
# renderer as markup could run no script and load nothing (no images, frames, fonts, other hosts).
PAGE_POLICY = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

router = APIRouter()


@router.get("/")
async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers={"Content-Security-Policy": PAGE_POLICY})


@router.get("/static/{name}")
async def static_file(name: str):
    if name not in STATIC_FILES:
        raise StarletteHTTPException(404)
    return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers={"Content-Security-Policy": PAGE_POLICY})
