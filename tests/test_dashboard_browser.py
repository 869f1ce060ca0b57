"""The dashboard in a real headless Chromium (Debian's package), driven by Playwright.

Every tab is opened with data from real traffic through a test router; the overview updates by
itself when a node joins and leaves; a settings toggle round-trips; a pull started from
Recommendations completes; a router that wants an API key gets one asked for, and the live
overview follows. With HERD_SCREENSHOTS=1 the tests (these and
tests/test_dashboard_instruments_browser.py) refresh docs/screenshots/.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from playwright.sync_api import Dialog, Page, expect, sync_playwright

from herd.http.dashboard.api import catalog
from herd.node.agent import AgentConfig, NodeAgent
from herd.sim import SimConfig, SimModel, run_sim
from tests.conftest import EMBED, LLAMA_3B, QWEN_7B, Fleet, GiB, running_fleet, wait_until

CHROMIUM = os.environ.get("HERD_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).parent.parent / "docs" / "screenshots"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# Everything the curated table names can be pulled from the simulated registry.
REGISTRY = tuple(
    SimModel(f"{e['family']}:{s['tag']}", size_bytes=int(s["memory_gb"] * GiB))
    for e in catalog()
    for s in e["sizes"]
)


@pytest.fixture
def browser() -> str:
    """The Chromium binary. Missing is a failure with instructions, never a skip."""
    if not Path(CHROMIUM).exists() and not shutil.which(CHROMIUM):
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install Debian's chromium package "
            "(bash .ci/run does), or point HERD_CHROMIUM at a Chromium binary."
        )
    return CHROMIUM


async def in_browser(
    browser: str,
    url: str,
    steps: Callable[[Page], Any],
    dark: bool = False,
    flags: tuple[str, ...] = (),
    answer: Callable[[str], str] | None = None,
) -> Any:
    """Run blocking Playwright steps in a worker thread while the router serves. Playwright's
    sync objects belong to the thread that made them, so the browser starts there too. With
    ``answer``, the page's prompts are answered with ``answer(message)``; any other dialog is
    recorded as an error."""

    def run() -> Any:
        errors: list[str] = []
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=browser, args=[*FLAGS, *flags])
            context = chromium.new_context(
                viewport={"width": 1360, "height": 900}, color_scheme="dark" if dark else "light"
            )
            page = context.new_page()
            page.set_default_timeout(15_000)
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            def on_dialog(dialog: Dialog) -> None:
                if answer is not None and dialog.type == "prompt":
                    dialog.accept(answer(dialog.message))
                    return
                # The page alerts on a failed save: record it (and let the page go on).
                errors.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)
            try:
                page.goto(url)
                result = steps(page)
            finally:
                chromium.close()
        assert not errors, errors
        return result

    with trio.fail_after(90):
        return await trio.to_thread.run_sync(run)


def shot(page: Page, name: str) -> None:
    if os.environ.get("HERD_SCREENSHOTS"):
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"))


def specs() -> list[SimConfig]:
    return [
        SimConfig(
            name="studio",
            models=(LLAMA_3B, QWEN_7B, EMBED),
            loaded=("qwen2.5:7b",),
            memory_bytes=64 * GiB,
            registry=REGISTRY,
        ),
        SimConfig(
            name="laptop",
            models=(LLAMA_3B,),
            loaded=("llama3.2:3b",),
            memory_bytes=16 * GiB,
            registry=REGISTRY,
        ),
    ]


async def traffic(fleet: Fleet) -> None:
    async with httpx.AsyncClient(base_url=fleet.url, timeout=10, trust_env=False) as client:
        for tag, model in (
            ("notes-app", "llama3.2:3b"),
            ("notes-app", "qwen2.5:7b"),
            ("search", "llama3.2:3b"),
        ):
            await client.post(
                "/api/chat",
                headers={"X-Herd-Tags": tag},
                json={
                    "model": model,
                    "stream": False,
                    "messages": [{"role": "user", "content": "hello there"}],
                },
            )
        await client.post("/api/embed", json={"model": "nomic-embed-text", "input": "x"})
        await client.post(
            "/dashboard/api/benchmarks",
            json={"name": "nightly", "results": {"requests_per_second": 41.5}},
        )
    await wait_until(lambda: len(fleet.router.state.traces) == 4)


async def test_every_tab_renders_with_real_data(tmp_path: Path, browser: str) -> None:
    async with running_fleet(tmp_path, specs()) as fleet:
        await traffic(fleet)

        def visit(page: Page) -> None:
            expect(page.locator(".card.node")).to_have_count(2)
            hot = page.locator('.card[data-node="studio"] .chip.hot', has_text="qwen2.5:7b")
            expect(hot).to_have_text("qwen2.5:7b 4k ctx")  # with its context window
            expect(page.locator("#queues")).to_contain_text("[EMBED]")
            expect(page.locator("#live")).to_have_text("live")
            page.click('a[data-tab="trends"]')
            page.click('#trend-window button[data-window="24h"]')
            expect(page.locator("#trend-charts figure")).to_have_count(8)
            expect(page.locator('figure[data-chart="requests"] rect.bar')).to_have_count(1)
            expect(page.locator("#trend-totals")).to_contain_text("4")
            page.click('a[data-tab="requests"]')
            expect(page.locator("#feed tr.click")).to_have_count(4)
            page.click('a[data-tab="models"]')
            expect(page.locator("#models-table")).to_contain_text("llama3.2:3b")
            page.locator("#models-table tr.click", has_text="qwen2.5:7b").click()
            expect(page.locator("#model-detail")).to_contain_text("last 7 days")
            shot(page, "models")
            page.click('a[data-tab="apps"]')
            expect(page.locator("#apps-table")).to_contain_text("notes-app")
            page.locator("#apps-table tr.click", has_text="search").click()
            expect(page.locator("#app-detail")).to_contain_text("search")
            shot(page, "apps")
            page.click('a[data-tab="benchmarks"]')
            expect(page.locator("#bench-table")).to_contain_text("nightly")
            page.click('a[data-tab="health"]')
            expect(page.locator(".check")).to_have_count(19)
            expect(page.locator('.check[data-check="offline_nodes"]')).to_contain_text("connected")
            shot(page, "health")
            page.click('a[data-tab="recommendations"]')
            expect(page.locator('.node-recs[data-node="laptop"]')).to_contain_text("llama3.2")
            shot(page, "recommendations")
            page.click('a[data-tab="settings"]')
            expect(page.locator("#settings-nodes")).to_contain_text("laptop")
            expect(page.locator("#config")).to_contain_text("heartbeat_interval")
            shot(page, "settings")

        await in_browser(browser, fleet.url + "/dashboard", visit)

        def dark_health(page: Page) -> None:
            expect(page.locator(".check")).to_have_count(19)
            shot(page, "health-dark")

        # The dark theme renders too (and the page never needs the internet).
        await in_browser(browser, fleet.url + "/dashboard#health", dark_health, dark=True)


async def test_overview_follows_nodes_joining_and_leaving(tmp_path: Path, browser: str) -> None:
    async with (
        running_fleet(tmp_path, specs()[:1]) as fleet,
        run_sim(SimConfig(name="newcomer", models=(LLAMA_3B,))) as sim,
    ):
        joined = trio.Event()
        leave = trio.Event()
        left = trio.Event()

        async def node_life() -> None:
            with trio.CancelScope() as scope:
                agent = NodeAgent(
                    AgentConfig(router_url=fleet.url, ollama_url=sim.url, node_id="newcomer")
                )
                async with trio.open_nursery() as nursery:
                    await nursery.start(agent.run)
                    await fleet.router.wait_nodes(2)
                    joined.set()
                    await leave.wait()
                    scope.cancel()
            left.set()

        def watch(page: Page) -> None:
            expect(page.locator(".card.node")).to_have_count(1)
            trio.from_thread.run_sync(start_node)
            card = page.locator('.card[data-node="newcomer"]')
            expect(card).to_contain_text("online")
            trio.from_thread.run_sync(leave.set)
            expect(card).to_contain_text("offline")

        async with trio.open_nursery() as nursery:

            def start_node() -> None:
                nursery.start_soon(node_life)

            await in_browser(browser, fleet.url + "/dashboard", watch)
            await left.wait()


async def test_settings_toggle_round_trips(tmp_path: Path, browser: str) -> None:
    async with running_fleet(tmp_path, specs()) as fleet:

        def toggle(page: Page) -> None:
            switch = page.locator('input[data-setting="vram_fallback"]')
            expect(switch).not_to_be_checked()  # substitution is opt-in
            # The switch flips at once; the save is a request: wait for its answer before
            # reloading (a reload in between would abort it).
            with page.expect_response("**/dashboard/api/settings") as saved:
                page.locator(".toggle", has_text="VRAM-aware fallback").locator(
                    ".switch span"
                ).click()
            assert saved.value.status == 200, saved.value.text()
            expect(switch).to_be_checked()
            page.reload()
            expect(page.locator('input[data-setting="vram_fallback"]')).to_be_checked()

        await in_browser(browser, fleet.url + "/dashboard#settings", toggle)
        assert fleet.router.state.settings.vram_fallback is True
        assert (tmp_path / "settings.json").exists()


async def test_pull_from_recommendations_completes(tmp_path: Path, browser: str) -> None:
    async with running_fleet(tmp_path, specs()) as fleet:

        def pull(page: Page) -> str:
            section = page.locator('.node-recs[data-node="laptop"]')
            box = section.locator("input.pick").first
            model = box.get_attribute("data-model")
            assert model
            box.check()
            section.locator("button.pull").click()
            expect(section.locator(".progress")).to_have_text(f"pulled: {model}", timeout=20_000)
            return model

        model = await in_browser(browser, fleet.url + "/dashboard#recommendations", pull)
        await wait_until(lambda: fleet.router.fleet.node("laptop").has_model(model))  # type: ignore[union-attr]
        assert fleet.sims["laptop"].pulls == 1


async def test_empty_fleet_says_how_to_start(tmp_path: Path, browser: str) -> None:
    async with running_fleet(tmp_path, []) as fleet:

        def look(page: Page) -> None:
            expect(page.locator("#node-cards .empty")).to_contain_text("herd-node --router-url")
            expect(page.locator("#queues .empty")).to_contain_text("/v1")

        await in_browser(browser, fleet.url + "/dashboard", look)


async def test_the_live_overview_asks_for_the_api_key(tmp_path: Path, browser: str) -> None:
    """A router with an API key refuses the event stream (401) to a page without one: the page
    asks for the key, and asks again when the one given is wrong; with the right one the fleet
    overview renders, live, and the other tabs use the same key without asking."""
    asked: list[str] = []

    def answer(message: str) -> str:
        asked.append(message)
        return "wrong" if len(asked) == 1 else "sesame"

    async with running_fleet(tmp_path, specs(), api_keys=("sesame",)) as fleet:

        def look(page: Page) -> None:
            expect(page.locator(".card.node")).to_have_count(2)
            expect(page.locator('.card[data-node="studio"]')).to_contain_text("online")
            expect(page.locator("#live")).to_have_text("live")
            assert page.evaluate("localStorage.getItem('herd-key')") == "sesame"
            page.goto(fleet.url + "/dashboard#health")
            expect(page.locator(".check").first).to_be_visible()

        await in_browser(browser, fleet.url + "/dashboard", look, answer=answer)
    assert asked == ["This herd router needs an API key:"] * 2


async def test_a_router_pull_shows_with_its_progress(tmp_path: Path, browser: str) -> None:
    from herd.state.settings import RuntimeSettings

    gemma = SimModel("gemma3:1b", size_bytes=GiB)
    slow = [
        SimConfig(
            name="alpha",
            models=(LLAMA_3B,),
            registry=(gemma,),
            pull_bytes_per_second=GiB / 3600,  # an hour: still running while we look
        )
    ]
    settings = RuntimeSettings(auto_pull=True)
    async with running_fleet(tmp_path, slow, settings, queue_timeout=1.0) as fleet:
        async with httpx.AsyncClient(base_url=fleet.url, trust_env=False) as client:
            waited = await client.post("/api/generate", json={"model": "gemma3:1b", "prompt": "x"})
            assert waited.status_code == 503 and "being pulled" in waited.json()["error"]

        def look(page: Page) -> None:
            pulls = page.locator("#pulls")
            expect(pulls).to_contain_text("gemma3:1b")
            expect(pulls).to_contain_text("pulling")
            expect(pulls).to_contain_text("auto-pull")
            expect(pulls.locator(".meter")).to_have_count(1)

        await in_browser(browser, fleet.url + "/dashboard", look)


async def test_model_aliases_are_edited_in_settings(tmp_path: Path, browser: str) -> None:
    async with running_fleet(tmp_path, specs()) as fleet:

        def edit(page: Page) -> None:
            box = page.locator("#aliases")
            expect(box).to_have_value("")
            box.fill("claude-* = qwen2.5:7b, llama3.2:3b\nteam = llama3.2:3b")
            page.locator("#save-aliases").click()
            expect(page.locator("#aliases-status")).to_have_text("saved")
            page.reload()
            expect(page.locator("#aliases")).to_have_value(
                "claude-* = qwen2.5:7b, llama3.2:3b\nteam = llama3.2:3b"
            )
            # A bad line is refused with the rule, and nothing is saved.
            page.locator("#aliases").fill("broken =")
            page.locator("#save-aliases").click()
            expect(page.locator("#aliases-status")).to_contain_text("non-empty list")

        await in_browser(browser, fleet.url + "/dashboard#settings", edit)
        assert fleet.router.state.settings.model_aliases == {
            "claude-*": ["qwen2.5:7b", "llama3.2:3b"],
            "team": ["llama3.2:3b"],
        }
        async with httpx.AsyncClient(base_url=fleet.url, trust_env=False) as client:
            reply = await client.post(
                "/api/chat",
                json={
                    "model": "team",
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": False,
                },
            )
            assert reply.json()["model"] == "llama3.2:3b"


async def test_an_open_router_says_so_on_every_page(tmp_path: Path, browser: str) -> None:
    from herd.config import RouterConfig
    from herd.http.service import exposure_warnings

    exposed = exposure_warnings(RouterConfig(host="0.0.0.0"))
    assert len(exposed) == 2 and "no fleet token" in exposed[0] and "no API key" in exposed[1]
    assert exposure_warnings(RouterConfig(host="0.0.0.0", auth_token="t", api_keys=("k",))) == []
    assert exposure_warnings(RouterConfig(host="127.0.0.1")) == []
    assert exposure_warnings(RouterConfig(host="127.0.0.2")) == []  # all of 127/8 is loopback
    assert exposure_warnings(RouterConfig(host="::1")) == []
    assert len(exposure_warnings(RouterConfig(host="192.168.1.9"))) == 2
    async with running_fleet(tmp_path, specs()) as fleet:
        # (the test router listens on loopback; give it what a LAN-facing one would say)
        fleet.router.state.warnings = exposed

        def look(page: Page) -> None:
            banner = page.locator("#warnings .warning")
            expect(banner).to_have_count(2)
            expect(banner.first).to_contain_text("receive your prompts")

        await in_browser(browser, fleet.url + "/dashboard", look)
