"""The dashboard in a real headless browser (Playwright driving the system's Chromium)
against real in-process workers and the real HTTP app: the map, a worker going down,
a chat that streams, API keys. Screenshots go to tests/screenshots/ (not committed)."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOTS = Path(__file__).parent / "screenshots"
API_KEY = "sk-dashboard"
SECONDS = 1000  # Playwright counts milliseconds

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (scripts/test.sh installs it as root)"
)


@pytest.fixture
async def page() -> AsyncIterator[playwright_api.Page]:
    async with playwright_api.async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20 * SECONDS)
        yield page
        await browser.close()


async def screenshot(page: playwright_api.Page, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    await page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def worker_card(page: playwright_api.Page, name: str) -> playwright_api.Locator:
    return page.locator(f'.worker[data-worker="{name}"]')


async def test_the_map_shows_every_worker_and_one_killed_turns_red(
    serve_cluster, start_workers, page
):
    url, cluster = await serve_cluster(workers=3, counts=[2, 4, 2])
    await page.goto(url)
    expected = {"worker-0": "[0, 2)", "worker-1": "[2, 6)", "worker-2": "[6, 8)"}
    for name, layers in expected.items():
        card = worker_card(page, name)
        await card.locator("text=serving").wait_for()
        assert layers in await card.inner_text()
    await playwright_api.expect(page.locator(".depth-bar .segment")).to_have_count(3)
    await screenshot(page, "map")

    killed = cluster.stages[1].client.address
    await start_workers.servers[killed].stop(grace=None)
    down = page.locator('.worker[data-worker="worker-1"][data-status="unavailable"]')
    await down.wait_for(timeout=10 * SECONDS)
    assert await down.evaluate("e => getComputedStyle(e).borderColor") == "rgb(214, 47, 47)"
    assert await worker_card(page, "worker-0").get_attribute("data-status") == "ok"
    await screenshot(page, "worker-down")


async def test_a_chat_message_streams_an_answer_and_stop_ends_one(serve_cluster, page):
    url, _ = await serve_cluster()
    await page.goto(url)
    await page.locator("summary").click()
    await page.fill("#max-tokens", "24")
    await page.fill("#seed", "7")
    await page.fill("#prompt", "What is the capital of France?")
    await page.click("#send")
    answer = page.locator(".message.assistant")
    first = answer.first
    await first.locator(".figures", has_text="TTFT").wait_for()
    assert await first.locator(".text").inner_text()
    assert "tokens/s" in await first.locator(".figures").inner_text()
    assert not await page.locator("#send").is_disabled()
    # The next snapshots chart the answer's decode steps.
    await page.locator("#split-legend", has_text="compute").wait_for(timeout=5 * SECONDS)
    stages = await page.locator("#split-stages").inner_text()
    assert "worker-0" in stages and "worker-1" in stages, stages  # each stage's compute
    await screenshot(page, "chat")

    # A long answer to stop. The random model may end one early (its end-of-text token),
    # even between the first piece and the click: then the next seed is tried.
    await page.fill("#max-tokens", "4000")
    for attempt, seed in enumerate(range(8, 14), start=1):
        await page.fill("#seed", str(seed))
        await page.fill("#prompt", "Tell me more.")
        await page.click("#send")
        figures = answer.nth(attempt).locator(".figures")
        await figures.filter(has_text=re.compile("pieces|TTFT|failed")).wait_for()
        if "pieces" not in await figures.inner_text():
            continue
        await page.click("#stop")
        await figures.filter(has_text=re.compile("stopped|TTFT")).wait_for(timeout=5 * SECONDS)
        if "stopped" in await figures.inner_text():
            break
    else:
        pytest.fail("every long answer ended before it could be stopped")
    assert not await page.locator("#send").is_disabled()


async def test_with_api_keys_the_page_asks_for_one_and_works_once_given(serve_cluster, page):
    url, _ = await serve_cluster(api_keys=[API_KEY])
    await page.goto(url)
    dialog = page.locator("#key-dialog")
    await dialog.wait_for(state="visible")
    await screenshot(page, "asks-for-key")
    await page.fill("#key-input", "sk-wrong")
    await page.click("#key-form button")
    await page.locator("#key-error").wait_for(state="visible")
    await page.fill("#key-input", API_KEY)
    await page.click("#key-form button")
    await worker_card(page, "worker-1").locator("text=serving").wait_for()
    await page.locator("summary").click()
    await page.fill("#seed", "7")  # seeded: a random first token could end the answer at once
    await page.fill("#prompt", "hi")
    await page.click("#send")
    await page.locator(".message.assistant .figures", has_text="TTFT").wait_for()
    await screenshot(page, "with-key")
