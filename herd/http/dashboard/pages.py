"""The dashboard's page and assets, served from package data (no CDN, works offline)."""

from __future__ import annotations

from functools import cache
from importlib import resources

from quart import Blueprint, Response, redirect

from herd.core.errors import NotFound

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
TABS = (
    "overview",
    "trends",
    "requests",
    "models",
    "apps",
    "benchmarks",
    "health",
    "recommendations",
    "settings",
    "planner",
)


@cache
def asset(name: str) -> bytes:
    if "/" in name or name.startswith(".") or not any(name.endswith(t) for t in TYPES):
        raise NotFound(f"no dashboard asset named {name!r}")
    path = resources.files("herd").joinpath("http/dashboard/static", name)
    if not path.is_file():
        raise NotFound(f"no dashboard asset named {name!r}")
    return path.read_bytes()


def create_pages() -> Blueprint:
    bp = Blueprint("dashboard_pages", __name__)

    @bp.get("/dashboard")
    @bp.get("/dashboard/")
    async def index() -> Response:
        return Response(
            asset("index.html"), content_type=TYPES[".html"], headers={"Cache-Control": "no-cache"}
        )

    @bp.get("/dashboard/static/<name>")
    async def static_file(name: str) -> Response:
        body = asset(name)
        suffix = name[name.rfind(".") :]
        return Response(body, content_type=TYPES[suffix], headers={"Cache-Control": "no-cache"})

    @bp.get("/dashboard/<tab>")
    async def tab(tab: str) -> Response:
        if tab not in TABS:
            raise NotFound(f"no dashboard page {tab!r}")
        return redirect(f"/dashboard#{tab}")  # type: ignore[return-value]

    return bp
