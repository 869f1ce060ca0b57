"""CORS as Ollama does it, in a real headless Chromium: a web app on another origin calls the
router (preflight included) when its origin is allowed, and is refused when it isn't."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import trio
from playwright.sync_api import Page

from herd.server import serve_app
from tests.conftest import running_fleet, two_node_specs
from tests.test_dashboard_browser import browser, in_browser  # noqa: F401 (the fixture)

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PAGE = b"""<!doctype html><title>app</title><script>
async function ask(router) {
  try {
    const reply = await fetch(router + "/api/chat", {
      method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer none"},
      body: JSON.stringify({model: "llama3.2:3b", stream: false,
                            messages: [{role: "user", content: "hi"}]}),
    });
    const data = await reply.json();
    return {status: reply.status, model: data.model, header: reply.headers.get("X-Herd-Model")};
  } catch (err) {
    return {error: String(err)};
  }
}
</script>"""


async def app_page(scope: MutableMapping[str, Any], receive: Any, send: Send) -> None:
    """A web app on its own origin: one page."""
    if scope["type"] == "lifespan":
        while True:
            event = (await receive())["type"]
            await send({"type": f"{event}.complete"})
            if event == "lifespan.shutdown":
                return
    headers = [(b"content-type", b"text/html")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": PAGE})


def ask(page: Page, router: str) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate("router => ask(router)", router)
    return result


async def test_allowed_origins_may_call_and_others_may_not(
    tmp_path: Path,
    browser: str,  # noqa: F811
) -> None:
    async with (
        running_fleet(tmp_path, two_node_specs(), origins=("http://friend.test:*",)) as fleet,
        trio.open_nursery() as nursery,
    ):
        page_url = await nursery.start(serve_app, app_page, "127.0.0.1", 0)
        port = page_url.rsplit(":", 1)[1]
        # Fake host names for two more origins, all on loopback inside Chromium only.
        rules = ("--host-resolver-rules=MAP friend.test 127.0.0.1, MAP stranger.test 127.0.0.1",)

        def visit(page: Page) -> dict[str, Any]:
            return ask(page, fleet.url)

        local = await in_browser(browser, page_url, visit, flags=rules)
        assert local == {"status": 200, "model": "llama3.2:3b", "header": "llama3.2:3b"}
        friend = await in_browser(browser, f"http://friend.test:{port}/", visit, flags=rules)
        assert friend["status"] == 200  # added with --origins
        stranger = await in_browser(browser, f"http://stranger.test:{port}/", visit, flags=rules)
        assert "Failed to fetch" in stranger["error"]
        # What the browser saw, from curl's side: the preflight and the refusal.
        async with httpx.AsyncClient(base_url=fleet.url, trust_env=False) as client:
            preflight = await client.options(
                "/v1/chat/completions",
                headers={
                    "Origin": "http://localhost:3000",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type, x-stainless-os",
                },
            )
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
            assert "x-stainless-os" in preflight.headers["access-control-allow-headers"]
            refused = await client.get("/api/tags", headers={"Origin": "https://evil.example"})
            assert refused.status_code == 403
            for app_origin in ("app://obsidian.md", "vscode-webview://abc", "tauri://localhost"):
                ok = await client.get("/api/tags", headers={"Origin": app_origin})
                assert ok.headers["access-control-allow-origin"] == app_origin
            # Never the dashboard's API or the fleet views, whatever the origin.
            closed = await client.get(
                "/dashboard/api/traces", headers={"Origin": "http://localhost:3000"}
            )
            assert closed.status_code == 403
        nursery.cancel_scope.cancel()
