"""The dashboard's Planner tab in a real headless Chromium (Debian's package), driven by
Playwright, on a real router with simulated nodes and traffic recorded through it: changes are
built from the fleet's own nodes, presets and models, a plan runs and its figures show side by
side with the recording and the no-change replay, a change the fleet can't take is refused
with the reason, and the page states what the replay leaves out.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import httpx
from playwright.sync_api import Page, expect

from herd.sim import SimConfig, SimModel
from tests.conftest import LLAMA_3B, QWEN_7B, GiB, running_fleet, wait_until
from tests.test_dashboard_browser import browser, in_browser, shot

__all__ = ["browser"]  # the fixture, shared with the dashboard's browser tests

# Real-looking speeds (a request takes about a tenth of a second), so the page shows figures.
SMALL = attrs.evolve(LLAMA_3B, tokens_per_second=150.0, prefill_tokens_per_second=2000.0)
MID = attrs.evolve(QWEN_7B, tokens_per_second=90.0, prefill_tokens_per_second=900.0)
BIG = SimModel("llama3.3:70b", size_bytes=40 * GiB, parameter_size="70B", load_seconds=30.0)


def specs() -> list[SimConfig]:
    return [
        SimConfig(
            name="studio",
            models=(attrs.evolve(SMALL, load_seconds=1.5), MID, BIG),
            loaded=("qwen2.5:7b",),
            memory_bytes=64 * GiB,
            speed=1.5,
        ),
        SimConfig(name="laptop", models=(SMALL,), loaded=("llama3.2:3b",), memory_bytes=16 * GiB),
    ]


async def test_the_planner_compares_a_changed_fleet_with_the_recording(
    tmp_path: Path, browser: str
) -> None:
    async with running_fleet(tmp_path, specs()) as fleet:
        async with httpx.AsyncClient(base_url=fleet.url, timeout=10, trust_env=False) as client:
            for index in range(12):
                model = ("llama3.2:3b", "qwen2.5:7b")[index % 2]
                body = {
                    "model": model,
                    "stream": False,
                    "messages": [{"role": "user", "content": f"question {index} " * 20}],
                    "options": {"num_predict": 12},
                }
                assert (await client.post("/api/chat", json=body)).status_code == 200
        await wait_until(lambda: len(fleet.router.state.traces) == 12)

        def plan(page: Page) -> None:
            section = page.locator("#tab-planner")
            expect(section).to_be_visible()
            expect(page.locator('a[data-tab="planner"]')).to_have_class("active")
            expect(page.locator("#plan-kind option")).to_have_count(6)
            expect(page.locator("#plan-limits")).to_contain_text("thermal throttling")
            expect(page.locator("#plan-changes")).to_contain_text("No change yet")
            # Remove the laptop, and add a copy of the studio.
            page.select_option("#plan-kind", "remove-node")
            page.select_option("#plan-node", "laptop")
            page.click("#plan-add")
            page.select_option("#plan-kind", "add-node")
            expect(page.locator("#plan-preset option", has_text="RTX 4090")).to_have_count(1)
            page.select_option("#plan-preset", "copy:studio")
            page.click("#plan-add")
            expect(page.locator("#plan-changes .chip")).to_have_text(
                ["remove laptop \u00d7", "add a copy of studio \u00d7"]
            )
            with page.expect_response("**/dashboard/api/plan") as answer:
                page.click("#plan-run")
            assert answer.value.status == 200, answer.value.text()
            table = page.locator("#plan-table")
            expect(table.locator("thead th")).to_have_count(4)
            expect(table.locator("thead th.recorded")).to_have_text("recorded")
            expect(table.locator("thead th.baseline")).to_have_text("no change (replay)")
            expect(table.locator("thead th.scenario")).to_contain_text(
                "remove laptop; add a copy of studio"
            )
            expect(table.locator('tr[data-figure="requests"] td')).to_have_text(
                ["requests", "12", "12", "12"]
            )
            expect(table.locator('tr[data-figure="latency_p95"] td.scenario')).to_contain_text(" s")
            expect(page.locator("#plan-window")).to_contain_text(
                "12 requests of the last 24 h replayed"
            )
            expect(page.locator("#plan-fidelity")).to_contain_text("no-change replay")
            page.locator("details.plan-details summary").nth(1).click()
            expect(page.locator(".plan-fleet").nth(1)).to_contain_text("studio-copy")
            shot(page, "planner")
            # A change the fleet can't take is refused, with the reason.
            page.locator("#plan-changes button.remove").first.click()
            page.locator("#plan-changes button.remove").first.click()
            page.select_option("#plan-kind", "pin")
            page.select_option("#plan-node", "laptop")
            page.select_option("#plan-model", "llama3.3:70b")
            page.click("#plan-add")
            page.click("#plan-run")
            expect(page.locator("#plan-status")).to_contain_text(
                "failed: pin llama3.3:70b on laptop: llama3.3:70b needs 40.0 GiB, laptop has "
                "14.4 GiB for models"
            )

        await in_browser(browser, fleet.url + "/dashboard#planner", plan)
