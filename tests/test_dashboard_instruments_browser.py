"""The dashboard's instruments (#19) in a real headless Chromium, over a real router and simulated
nodes: Trends (windows, breakdowns, percentiles, gaps, events), the live Requests feed and a
request's trace, node cards, a pull followed and cancelled, benchmarks run and compared.

Most data is real traffic. Trends also needs traffic at earlier minutes than a test lasts: those
traces are made here and handed to the router's own record path (``RouterState.record_trace``:
memory, metrics, the store), marked in their request ids (``seeded-``). With HERD_SCREENSHOTS=1
these tests refresh docs/screenshots/ too.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from playwright.sync_api import Page, expect

from herd.core.models import Capacity
from herd.core.scoring import SIGNALS
from herd.core.timeline import FleetEvent
from herd.core.traces import TraceRecord
from herd.sim import SimConfig, SimModel
from herd.state.settings import RuntimeSettings
from tests import test_dashboard_browser
from tests.conftest import EMBED, LLAMA_3B, QWEN_7B, Fleet, GiB, running_fleet, wait_until
from tests.test_dashboard_browser import in_browser, shot

browser = test_dashboard_browser.browser  # the fixture: the Chromium binary

LLAMA = attrs.evolve(LLAMA_3B, tokens_per_second=300.0, context_length=8192)
QWEN = attrs.evolve(QWEN_7B, tokens_per_second=120.0, context_length=32768)
GEMMA = SimModel("gemma3:1b", size_bytes=GiB)


def specs(**laptop: Any) -> list[SimConfig]:
    return [
        SimConfig(
            name="studio",
            models=(LLAMA, QWEN, EMBED),
            loaded=("qwen2.5:7b",),
            memory_bytes=64 * GiB,
            registry=(GEMMA,),
        ),
        SimConfig(
            name="laptop",
            models=(LLAMA,),
            loaded=("llama3.2:3b",),
            memory_bytes=16 * GiB,
            registry=(GEMMA,),
            **laptop,
        ),
    ]


async def traffic(fleet: Fleet, count: int = 12) -> None:
    async with httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client:
        for index in range(count):
            model = ("llama3.2:3b", "qwen2.5:7b")[index % 2]
            reply = await client.post(
                "/api/chat",
                headers={"X-Herd-Tags": ("notes-app", "search", "")[index % 3]},
                json={
                    "model": model,
                    "stream": False,
                    "options": {"num_predict": 8 + index},
                    "messages": [{"role": "user", "content": f"question {index}"}],
                },
            )
            assert reply.status_code == 200, reply.text


SEEDED = itertools.count()


def seeded(
    node: str,
    model: str,
    at: float,
    latency: float,
    status: str = "completed",
    rate: float = 120.0,
) -> TraceRecord:
    ttft = latency * 0.2
    return TraceRecord(
        request_id=f"seeded-{next(SEEDED)}",
        model=model,
        original_model=model,
        node_id=node,
        score=60.0,
        scores_breakdown=dict.fromkeys(SIGNALS, 0.0) | {"thermal": 50.0, "context_fit": 10.0},
        status=status,
        latency_ms=latency,
        time_to_first_token_ms=ttft if status == "completed" else None,
        prompt_tokens=40,
        completion_tokens=int((latency - ttft) / 1000 * rate) if status == "completed" else None,
        retry_count=1 if status == "failed" else 0,
        fallback_used=False,
        excluded_nodes=(),
        original_format="ollama",
        kind="text",
        error_message="node studio answered 500" if status == "failed" else None,
        timestamp=at,
        tags=("notes-app",),
    )


def seed_day(fleet: Fleet, rng: random.Random) -> None:
    """A day of traffic for the 24 h picture: busier in the afternoon, nothing from 02:00 to
    06:00 hours ago (a gap), the studio slower under load."""
    now = time.time()
    for minute in range(24 * 60, 20, -4):
        hours_ago = minute / 60
        if 2 <= hours_ago < 6:
            continue
        load = 1.5 + math.sin(hours_ago / 24 * 2 * math.pi) + rng.random()
        for _ in range(int(load * 2)):
            node, model, base, speed = rng.choice(
                [("studio", "qwen2.5:7b", 1800.0, 60.0), ("laptop", "llama3.2:3b", 600.0, 140.0)]
            )
            status = "failed" if rng.random() < 0.02 else "completed"
            latency = base * (0.6 + load / 3) * rng.lognormvariate(0, 0.35)
            rate = speed / (0.8 + load / 5) * rng.lognormvariate(0, 0.1)
            at = now - minute * 60 + rng.random() * 60
            fleet.router.state.record_trace(seeded(node, model, at, latency, status, rate))
    for hours_ago, kind, event_node, event_model, detail in (
        (21.5, "model_evicted", "studio", "llama3.2:3b", ""),
        (17.0, "pull_started", "laptop", "gemma3:1b", "by dashboard"),
        (16.8, "pull_done", "laptop", "gemma3:1b", ""),
        (6.0, "node_degraded", "studio", None, "no heartbeat for heartbeat_timeout"),
        (5.9, "node_offline", "studio", None, "no heartbeat for heartbeat_offline"),
        (2.0, "node_joined", "studio", None, "after an update"),
        (1.2, "settings_changed", None, None, "vram_fallback: false → true"),
    ):
        fleet.router.state.timeline.add(
            FleetEvent(now - hours_ago * 3600, kind, event_node, event_model, detail)
        )


async def test_trends_break_down_and_draw_gaps_as_gaps_with_the_fleets_events(
    tmp_path: Path, browser: str
) -> None:
    async with running_fleet(tmp_path, specs()) as fleet:
        state = fleet.router.state
        now = time.time()
        # Two earlier minutes with traffic, three empty minutes between them and now.
        for minutes_ago, latency in ((9, 800.0), (9, 1000.0), (5, 1200.0)):
            state.record_trace(seeded("studio", "qwen2.5:7b", now - minutes_ago * 60, latency))
        # On the other node, what resilience did: a failure after a retry, a fallback, and a
        # substitution (each drawn as bars on its own chart).
        state.record_trace(seeded("laptop", "llama3.2:3b", now - 5 * 60, 300.0, "failed"))
        state.record_trace(
            attrs.evolve(
                seeded("laptop", "llama3.2:3b", now - 9 * 60, 400.0),
                original_model="llama3.1:8b",
                fallback_used=True,
            )
        )
        state.record_trace(
            attrs.evolve(
                seeded("laptop", "llama3.2:3b", now - 9 * 60, 500.0),
                original_model="qwen2.5:7b",
                substitution="vram",
            )
        )
        await traffic(fleet)
        async with httpx.AsyncClient(base_url=fleet.url, trust_env=False) as client:
            assert (
                await client.post("/dashboard/api/settings", json={"vram_fallback": True})
            ).status_code == 200

        def look(page: Page) -> None:
            page.click('#trend-window button[data-window="15m"]')
            latency = page.locator('figure[data-chart="latency"]')
            expect(latency.locator("figcaption")).to_have_text("Latency (ms)")
            expect(latency.locator(".legend")).to_contain_text("p50")
            # Two earlier minutes with requests, then empty minutes, then now's traffic (one
            # minute, or two if it crossed a minute's end): the earlier points stand alone, no
            # line is drawn across the empty minutes, and no point is at zero.
            p50 = latency.locator('path.series[data-series="p50"]')
            expect(p50).to_have_count(1)
            moves = (p50.get_attribute("d") or "").split("M")[1:]
            assert len(moves) == 3 and "L" not in moves[0] + moves[1], moves
            dots = latency.locator("circle.dot:not(.lone)")
            assert dots.count() in (9, 12)  # three percentiles at 3 (or 4) minutes
            bottom = page.evaluate(
                "Number(document.querySelector('figure[data-chart=latency] line.axis')"
                ".getAttribute('y1'))"
            )
            assert all(float(d.get_attribute("cy") or 0) < bottom for d in dots.all())
            # Requests as bars; the fleet's events as markers on every chart.
            bars = page.locator('figure[data-chart="requests"] rect.bar')
            expect(bars.first).to_be_visible()
            assert bars.count() in (3, 4)
            # Time to first token as percentiles, speed as a line, what went wrong as bars.
            ttft = page.locator('figure[data-chart="ttft"]')
            expect(ttft.locator('path.series[data-series="p95"]')).to_have_count(1)
            speed = page.locator('figure[data-chart="tps"]')
            expect(speed.locator("path.series")).not_to_have_count(0)
            for chart in ("errors", "retries", "fallbacks", "substitutions"):
                marks = page.locator(f'figure[data-chart="{chart}"] rect.bar')
                expect(marks.first).to_be_visible()
                assert marks.count() == 1, chart  # one minute each had one
            expect(latency.locator("g.event.cat-node")).to_have_count(2)  # two nodes joined
            expect(latency.locator("g.event.cat-settings")).to_have_count(1)
            expect(latency.locator("g.event.cat-settings title")).to_contain_text(
                "vram_fallback: false → true"
            )
            expect(page.locator("#trend-timeline")).to_contain_text("settings changed")
            expect(page.locator("#trend-timeline")).to_contain_text("joined")
            page.locator('#trend-events input[data-category="node"]').uncheck()
            expect(latency.locator("g.event.cat-node")).to_have_count(0)
            expect(latency.locator("g.event.cat-settings")).to_have_count(1)
            # By node, at the chosen percentile; every figure in the table per node.
            page.select_option("#trend-by", "node")
            page.select_option("#trend-pct", "99")
            expect(latency.locator("figcaption")).to_have_text("Latency, p99 (ms)")
            expect(latency.locator(".legend")).to_contain_text("studio")
            expect(latency.locator(".legend")).to_contain_text("laptop")
            totals = page.locator("#trend-totals")
            expect(totals.locator("tr.click")).to_have_count(2)
            studio = totals.locator("tr.click", has_text="studio")
            expect(studio.locator("td").nth(1)).to_have_text("9")  # 6 qwen + the 3 earlier
            # A row narrows every chart to it; its chip takes the filter away again.
            totals.locator("tr.click", has_text="studio").click()
            expect(page.locator("#trend-filters .chip")).to_have_text("node: studio ✕")
            expect(totals.locator("tr.click")).to_have_count(1)
            page.select_option("#trend-by", "model")
            expect(totals.locator("tr.click")).to_have_count(1)
            expect(totals).to_contain_text("qwen2.5:7b")
            page.locator("#trend-filters .chip").click()
            expect(totals.locator("tr.click")).to_have_count(2)
            page.select_option("#trend-by", "tag")
            for tag in ("notes-app", "search", "(untagged)"):
                expect(totals).to_contain_text(tag)
            page.click('#trend-window button[data-window="7d"]')
            expect(page.locator("#trend-bucket")).to_have_text("7d, one point per 1 h")

        await in_browser(browser, fleet.url + "/dashboard#trends", look)


async def test_the_picture_of_a_day(tmp_path: Path, browser: str) -> None:
    """The Trends screenshot: a day of seeded traces and events broken down by node, with live
    traffic and the fleet's real events at its right edge."""
    async with running_fleet(tmp_path, specs()) as fleet:
        seed_day(fleet, random.Random(19))
        await traffic(fleet, 6)

        def look(page: Page) -> None:
            page.click('#trend-window button[data-window="24h"]')
            page.select_option("#trend-by", "node")
            latency = page.locator('figure[data-chart="latency"]')
            expect(latency.locator('path.series[data-series="studio"]')).to_have_count(1)
            # the four empty hours split the day's line in two
            d = latency.locator('path.series[data-series="studio"]').get_attribute("d") or ""
            assert d.count("M") >= 2
            shot(page, "trends")

        await in_browser(browser, fleet.url + "/dashboard#trends", look)


async def test_the_feed_updates_live_and_each_request_opens_its_trace(
    tmp_path: Path, browser: str
) -> None:
    settings = RuntimeSettings(model_aliases={"team": ["llama3.2:3b"]})
    async with (
        running_fleet(tmp_path, specs(), settings) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        await traffic(fleet, 4)

        async def ask(model: str) -> None:
            body = {"model": model, "stream": False, "messages": [{"role": "user", "content": "x"}]}
            await client.post("/api/chat", json=body)

        async with trio.open_nursery() as nursery:

            def look(page: Page) -> None:
                rows = page.locator("#feed tr.click")
                expect(rows).to_have_count(4)
                # A request made while the page is open shows up by itself, on top.
                trio.from_thread.run_sync(nursery.start_soon, ask, "team")
                expect(rows).to_have_count(5)
                top = rows.first
                expect(top).to_contain_text("team → llama3.2:3b")
                expect(top).to_contain_text("completed")
                expect(top.locator(".why")).to_contain_text("thermal")
                top.click()
                panel = page.locator("#trace")
                expect(panel).to_be_visible()
                expect(panel.locator(".signal")).to_have_count(len(SIGNALS))
                expect(panel.locator(".facts")).to_contain_text("team")
                # llama is on both nodes: the one that didn't serve is the runner-up
                served = (panel.locator(".facts dd").nth(3).text_content() or "").strip()
                other = "studio" if served == "laptop" else "laptop"
                expect(panel.locator("table")).to_contain_text(other)
                expect(panel.locator(".why")).to_contain_text(f"beat {other}")
                shot(page, "requests")
                # Errors only: the failure that follows, alone.
                for sim in fleet.sims.values():
                    sim.fail("http500", times=1)
                trio.from_thread.run_sync(nursery.start_soon, ask, "qwen2.5:7b")
                expect(rows).to_have_count(6)
                page.check("#feed-errors")
                expect(rows).to_have_count(1)
                expect(rows.first).to_contain_text("failed")
                expect(rows.first.locator(".why")).to_contain_text("then: node studio")

            await in_browser(browser, fleet.url + "/dashboard#requests", look)


async def test_node_cards_show_throughput_queue_context_and_states(
    tmp_path: Path, browser: str
) -> None:
    async with running_fleet(tmp_path, specs()) as fleet:
        await traffic(fleet, 6)

        def pause_laptop() -> None:
            agent = fleet.agents["laptop"]
            agent.capacity = lambda cpu, memory: Capacity(paused=True)
            agent.wake()

        def look(page: Page) -> None:
            studio = page.locator('.card[data-node="studio"]')
            expect(studio.locator(".figure.throughput")).to_contain_text("tok/s")
            expect(studio.locator(".figure.throughput")).to_contain_text("req/min")
            expect(studio.locator(".figure.queue")).to_contain_text("0 / 4 slots busy")
            expect(studio.locator(".chip.hot", has_text="qwen2.5:7b")).to_contain_text("32k ctx")
            trio.from_thread.run(fleet.agents["studio"].drain)
            expect(studio.locator(".badge", has_text="draining")).to_be_visible()
            trio.from_thread.run_sync(pause_laptop)
            laptop = page.locator('.card[data-node="laptop"]')
            expect(laptop.locator(".badge", has_text="paused")).to_be_visible()
            # Another view can add to every card (the accelerator memory goes here).
            page.evaluate(
                "nodeSections.push(n => `<div class='probe'>${n.node_id} extra</div>`);"
                "nodeBadges.push(n => '<span class=\"badge probe\">spilled</span>')"
            )
            expect(laptop.locator(".probe", has_text="laptop extra")).to_be_visible()
            expect(laptop.locator(".badge.probe")).to_have_text("spilled")

        await in_browser(browser, fleet.url + "/dashboard", look)
        kinds = {(e.kind, e.node_id) for e in fleet.router.state.timeline.ring}
        assert {("drain_started", "studio"), ("node_paused", "laptop")} <= kinds


async def test_node_cards_show_accelerator_memory_and_a_spilled_copy(
    tmp_path: Path, browser: str
) -> None:
    """A gaming PC (64 GiB of RAM, a 24 GiB GPU) holding a 42 GiB model that spills, and a Mac
    whose GPU working set holds it whole: each card shows the memory models run in there, and
    only the PC's says its copy is spilled and how much of it runs on the CPU."""
    big = SimModel("big:70b", size_bytes=42 * GiB, tokens_per_second=40.0, parameter_size="70B")
    fleet_specs = [
        SimConfig(
            name="gpu-box",
            models=(big, LLAMA),
            loaded=("big:70b",),
            memory_bytes=64 * GiB,
            vram_bytes=24 * GiB,
        ),
        SimConfig(
            name="mac-studio",
            models=(big,),
            loaded=("big:70b",),
            memory_bytes=192 * GiB,
            vram_bytes=144 * GiB,
            unified_memory=True,
        ),
    ]
    async with running_fleet(tmp_path, fleet_specs) as fleet:
        box = fleet.router.state.registry.get("gpu-box")
        assert box is not None
        (copy,) = [m for m in box.report.loaded_models if m.name == "big:70b"]
        assert 0 < copy.vram_bytes < copy.size_bytes  # the simulator split it
        on_cpu = round((1 - copy.vram_bytes / copy.size_bytes) * 100)

        def look(page: Page) -> None:
            pc = page.locator('.card[data-node="gpu-box"]')
            expect(pc.locator(".meter", has_text="VRAM")).to_contain_text("/ 24.0 GiB")
            expect(pc.locator("h3 .badge.spilled")).to_have_text("spilled")
            expect(pc.locator(".chip.hot", has_text="big:70b")).to_contain_text(f"{on_cpu}% CPU")
            mac = page.locator('.card[data-node="mac-studio"]')
            expect(mac.locator(".meter", has_text="GPU working set")).to_contain_text("/ 144.0 GiB")
            expect(mac.locator(".badge.spilled")).to_have_count(0)
            expect(mac.locator(".chip.hot", has_text="big:70b")).not_to_contain_text("CPU")
            shot(page, "accelerators")

        await in_browser(browser, fleet.url + "/dashboard", look)


async def test_a_pull_shows_its_progress_and_is_cancelled_from_the_page(
    tmp_path: Path, browser: str
) -> None:
    slow = specs(pull_bytes_per_second=GiB / 600)  # ten minutes: still going while we look
    async with running_fleet(tmp_path, slow) as fleet:
        await traffic(fleet, 6)

        def look(page: Page) -> None:
            page.fill("#pull-model", "gemma3:1b")
            page.select_option("#pull-node", "laptop")
            page.click("#pull-form button")
            row = page.locator("#pulls tr", has_text="gemma3:1b")
            expect(row).to_contain_text("pulling")
            expect(row).to_contain_text("dashboard")
            expect(row.locator(".meter")).to_contain_text("MiB/s", timeout=20_000)
            expect(row.locator(".meter")).to_contain_text("min")  # the time left
            expect(row.locator(".meter")).to_contain_text("left")
            shot(page, "overview")
            row.locator("button.cancel-pull").click()
            expect(row).to_contain_text("cancelled")
            expect(row).to_contain_text("cancelled by an operator")
            expect(row.locator("button.cancel-pull")).to_have_count(0)

        await in_browser(browser, fleet.url + "/dashboard", look)
        await wait_until(lambda: fleet.sims["laptop"].pulls_cancelled == 1)
        assert fleet.router.link.pulls is not None
        assert fleet.router.link.pulls.statistics().cancelled == 1


async def test_benchmarks_run_from_the_page_and_compare_over_time(
    tmp_path: Path, browser: str
) -> None:
    fleet_specs = [
        *specs(),
        # A slow machine: 128 tokens take about 2.5 s, so a run there can be cancelled.
        SimConfig(name="pi", models=(attrs.evolve(LLAMA, tokens_per_second=50.0),), loaded=()),
    ]
    async with running_fleet(tmp_path, fleet_specs) as fleet:

        def run(page: Page) -> None:
            targets = page.locator("#bench-targets")
            expect(targets.locator("input.target")).to_have_count(6)  # any node, or each node
            targets.locator('input[data-model="llama3.2:3b"][data-node="laptop"]').check()
            targets.locator('input[data-model="qwen2.5:7b"][data-node=""]').check()
            page.fill("#bench-name", "first")
            page.click("#bench-start")
            expect(page.locator("#bench-status")).to_have_text("first: done", timeout=30_000)
            expect(page.locator("#bench-progress")).to_contain_text("8 / 8 requests")
            expect(page.locator("#bench-progress")).to_contain_text("llama3.2:3b @ laptop")
            runs = page.locator("#bench-table tr.click")
            expect(runs).to_have_count(1)
            expect(runs.first).to_contain_text("done")
            page.fill("#bench-name", "second")
            page.click("#bench-start")
            expect(page.locator("#bench-status")).to_have_text("second: done", timeout=30_000)
            expect(runs).to_have_count(2)
            expect(page.locator("#bench-charts figure")).to_have_count(3)
            expect(page.locator("#bench-charts svg path.series")).to_have_count(6)  # 2 x 3
            runs.first.click()
            expect(page.locator("#bench-detail")).to_contain_text("compared with #1")
            expect(page.locator("#bench-detail td", has_text="%").first).to_be_visible()
            shot(page, "benchmarks")
            # A run on the slow machine, cancelled from the page once it has begun.
            targets.locator('input[data-model="llama3.2:3b"][data-node="laptop"]').uncheck()
            targets.locator('input[data-model="qwen2.5:7b"][data-node=""]').uncheck()
            targets.locator('input[data-model="llama3.2:3b"][data-node="pi"]').check()
            page.fill("#bench-name", "slow")
            page.click("#bench-start")
            expect(page.locator("#bench-cancel")).to_be_visible()
            progress = page.locator("#bench-progress")
            expect(progress).to_contain_text("1 / 4 requests", timeout=20_000)
            page.click("#bench-cancel")
            expect(page.locator("#bench-status")).to_have_text("slow: cancelled")
            expect(runs).to_have_count(3)
            expect(runs.first).to_contain_text("cancelled")

        await in_browser(browser, fleet.url + "/dashboard#benchmarks", run)
        await wait_until(fleet.counters_idle)
