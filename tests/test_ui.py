"""The operator page at /ui/ in a real headless Chromium, against a daemon and a real receiver.

CI installs the browser with `apt-get install -y chromium`; without it these tests fail
(they never skip). DISPATCHER_UPDATE_SCREENSHOT=1 rewrites docs/screenshot.png.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from dispatcher import tokens

from .helpers import (
    Receiver,
    daemon,
    missing_system_package,
    poll_until,
    publish,
    settings_for,
    subscribe,
)

CHROMIUM = Path(os.environ.get("DISPATCHER_CHROMIUM", "/usr/bin/chromium"))
INSTALL = "apt-get update && apt-get install -y chromium"
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshot.png"
WAIT_MS = 15_000
# How Chromium logs an API answer of 4xx; the page shows those itself.
LOAD_FAILED = "Failed to load resource: the server responded with a status of 4"
RED = "rgb(192, 38, 45)"
GREEN = "rgb(21, 127, 59)"
GREY = "rgb(91, 100, 114)"


@pytest.fixture
def chromium() -> Path:
    """The browser binary; its absence fails the test in CI (which installs it)."""
    if not CHROMIUM.is_file():
        missing_system_package(
            f"{CHROMIUM} is missing: the UI tests need Debian's Chromium ({INSTALL})"
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), args=ARGS, timeout=30_000
        )
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Site:
    base: str
    token: str
    db: asyncpg.Connection
    receiver: Receiver


@pytest.fixture
async def site(database: str, db: asyncpg.Connection, receiver: Receiver) -> AsyncIterator[Site]:
    settings = settings_for(database)
    token = await tokens.create(db, "shop-42")
    async with daemon(settings) as running:
        yield Site(running.admin_url, token, db, receiver)


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    opened = await context.new_page()
    problems: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error" and not message.text.startswith(LOAD_FAILED):
            problems.append(f"console: {message.text}")

    opened.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    opened.on("console", console)
    try:
        yield opened
        assert problems == []
    finally:
        await context.close()


async def sign_in(page: Page, site: Site) -> None:
    await page.goto(f"{site.base}/")
    assert page.url == f"{site.base}/ui/"
    await page.fill("#token", site.token)
    await page.click("#signin-submit")
    await page.wait_for_selector("#subs .sub", timeout=WAIT_MS)


async def finished(db: asyncpg.Connection, subscription: UUID, status: str, count: int) -> None:
    async def enough() -> bool:
        n = await db.fetchval(
            "SELECT count(*) FROM dispatcher.deliveries_done "
            "WHERE subscription_id = $1 AND status = $2",
            subscription,
            status,
        )
        return bool(n >= count)

    await poll_until(enough, timeout=15)


async def colour(page: Page, selector: str) -> Any:
    """The element's computed text colour. The page re-renders what it polls; an element
    replaced between the query and the style read is detached and has none, so the read is
    repeated (bounded) on the element the selector finds next."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        found = await page.eval_on_selector(selector, "el => getComputedStyle(el).color")
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def test_ui_is_served_as_static_files_with_a_strict_policy(site: Site) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{site.base}/", allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == "/ui/"
        async with http.get(f"{site.base}/ui/") as r:
            assert r.status == 200
            assert r.content_type == "text/html"
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
        async with http.get(f"{site.base}/ui/app.js") as r:
            assert r.status == 200
            assert "javascript" in r.content_type
        for path in ("/ui/nothing.js", "/ui/..%2f__init__.py", "/ui/__init__.py"):
            async with http.get(f"{site.base}{path}") as r:
                assert r.status == 404, path


async def test_operator_sees_a_failed_delivery_and_resends_it(site: Site, page: Page) -> None:
    receiver, db = site.receiver, site.db
    receiver.plan("/hook", 500, 500)
    sub = await subscribe(
        db,
        receiver.url("/hook"),
        ["products.*"],
        environment="shop-42",
        profile="tillhub",
        settings={"retry": {"max_attempts": 1}},
    )
    await db.execute(
        "UPDATE dispatcher.subscriptions SET name = 'Partner shop: products' WHERE id = $1", sub
    )
    legacy = await subscribe(db, receiver.url("/legacy"), ["orders.*"], environment="shop-42")
    await db.execute(
        "UPDATE dispatcher.subscriptions SET active = false, "
        "deactivated_reason = 'receiver answered 410' WHERE id = $1",
        legacy,
    )
    # Published one by one, so the two the receiver refuses are known: the first and second.
    await publish(db, {"id": "p-1", "sku": "A-1", "price": 12.5}, environment="shop-42")
    await finished(db, sub, "failed", 1)
    first: int = await db.fetchval(
        "SELECT id FROM dispatcher.deliveries_done WHERE subscription_id = $1", sub
    )
    await publish(
        db,
        {"id": "p-2", "sku": "<img src=x onerror=alert(1)>", "price": 7},
        event="products.update.v0",
        environment="shop-42",
    )
    await finished(db, sub, "failed", 2)
    for n in range(3, 6):
        await publish(db, {"id": f"p-{n}", "price": n * 2.5}, environment="shop-42")
    await finished(db, sub, "delivered", 3)

    await sign_in(page, site)
    await page.click(f'.sub[data-id="{sub}"]')
    row = f'tr.delivery[data-id="{first}"]'
    await page.wait_for_selector(f'{row}[data-status="failed"]', timeout=WAIT_MS)
    assert await colour(page, f"{row} .pill") == RED
    assert await page.locator("tr.delivery").count() == 5
    assert await page.locator('tr.delivery[data-status="delivered"]').count() == 3
    # API data is text: the payload's markup shows as characters, never as an element.
    await page.click(f'tr.delivery[data-id="{first + 1}"] .expander')
    await page.wait_for_selector(
        f'tr.expansion[data-for="{first + 1}"] .payload pre', timeout=WAIT_MS
    )
    payload = await page.inner_text(f'tr.expansion[data-for="{first + 1}"] .payload pre')
    assert "<img src=x onerror=alert(1)>" in payload
    assert await page.locator("#app img").count() == 0
    await page.click(f'tr.delivery[data-id="{first + 1}"] .expander')

    await page.click(f"{row} button.resend")
    await page.wait_for_selector(f'{row}[data-status="delivered"]', timeout=WAIT_MS)
    assert await colour(page, f"{row} .pill") == GREEN
    assert len(receiver.at("/hook")) == 6

    await page.click(f"{row} .expander")
    attempts = f'tr.expansion[data-for="{first}"] tr.attempt'
    await page.wait_for_selector(f"{attempts} >> nth=1", timeout=WAIT_MS)
    outcomes = await page.eval_on_selector_all(attempts, "rows => rows.map(r => r.dataset.outcome)")
    assert outcomes == ["failed", "delivered"]
    cells = await page.eval_on_selector_all(
        f"{attempts} td:nth-child(4)", "cells => cells.map(c => c.textContent)"
    )
    assert cells == ["500", "200"]
    assert await colour(page, f"{attempts} >> nth=0 >> .pill") == RED
    assert await colour(page, f"{attempts} >> nth=1 >> .pill") == GREEN
    sent = await page.inner_text(f'tr.expansion[data-for="{first}"] .payload pre')
    assert '"sku": "A-1"' in sent

    # The stats follow: two of the six attempts failed.
    await page.click("#refresh")
    await page.wait_for_function(
        "() => document.querySelector('#stats').textContent.includes('66.7%')", timeout=WAIT_MS
    )
    await page.wait_for_timeout(300)  # let the stats cards settle before the picture
    path = SCREENSHOT if os.environ.get("DISPATCHER_UPDATE_SCREENSHOT") == "1" else None
    picture = await page.screenshot(path=path)
    assert picture.startswith(b"\x89PNG")

    # Filter to what failed, resend all of it as a background job, follow it to delivered.
    second = f'tr.delivery[data-id="{first + 1}"]'
    await page.select_option("#status-filter", "failed")
    await page.wait_for_function(
        "() => document.querySelectorAll('tr.delivery').length === 1", timeout=WAIT_MS
    )
    assert await page.locator(f'{second}[data-status="failed"]').count() == 1
    await page.click("#resend-failed")
    await page.wait_for_selector('#job[data-status="done"]', timeout=WAIT_MS)
    assert "1 of 1" in await page.inner_text("#job-text")
    await page.wait_for_selector(f'{second}[data-status="delivered"]', timeout=WAIT_MS)

    # Resend selected: tick one delivered delivery and send it again.
    third = f'tr.delivery[data-id="{first + 2}"]'
    await page.check(f"{third} input.pick")
    assert await page.inner_text("#resend-selected") == "Resend selected (1)"
    await page.click("#resend-selected")
    await page.wait_for_function(
        "sel => { const r = document.querySelector(sel);"
        " return r && r.dataset.status === 'delivered'"
        " && r.querySelector('.col-num').textContent === '2'; }",
        arg=third,
        timeout=WAIT_MS,
    )
    assert len(receiver.at("/hook")) == 8

    await page.click("#sign-out")
    await page.wait_for_selector("#signin-form", state="visible")
    assert await page.evaluate("() => sessionStorage.length") == 0


async def test_operator_reactivates_a_deactivated_subscription(site: Site, page: Page) -> None:
    receiver, db = site.receiver, site.db
    sub = await subscribe(db, receiver.url("/gone"), ["orders.*"], environment="shop-42")
    doomed = await subscribe(db, receiver.url("/other"), ["orders.*"], environment="shop-42")
    # Queued, then deactivated in the same transaction: the delivery waits, paused, for the
    # reactivation (the daemon never sees it due).
    async with db.transaction():
        await publish(db, {"id": "o-1"}, event="orders.create.v0", environment="shop-42")
        await db.execute(
            "UPDATE dispatcher.subscriptions SET active = false, "
            "deactivated_reason = 'receiver answered 410' WHERE id = ANY($1)",
            [sub, doomed],
        )

    await page.goto(f"{site.base}/ui/")
    await page.fill("#token", "dsp_not-a-token")
    await page.click("#signin-submit")
    await page.wait_for_selector("#signin-error:has-text('not accepted')", timeout=WAIT_MS)

    await sign_in(page, site)
    card = f'.sub[data-id="{sub}"]'
    assert "receiver answered 410" in await page.inner_text(card)
    await page.click(card)
    await page.wait_for_selector('tr.delivery[data-status="paused"]', timeout=WAIT_MS)
    assert await colour(page, 'tr.delivery[data-status="paused"] .pill') == GREY
    assert "answered 410" in await page.inner_text("#deactivated")

    await page.click("#reactivate")
    await page.wait_for_selector("#deactivated", state="hidden", timeout=WAIT_MS)
    assert await page.inner_text("#sub-state") == "Active"
    assert await db.fetchval("SELECT active FROM dispatcher.subscriptions WHERE id = $1", sub)
    await page.wait_for_selector('tr.delivery[data-status="delivered"]', timeout=WAIT_MS)
    assert len(receiver.at("/gone")) == 1

    # An API error reaches the person: the other subscription is deleted behind the page.
    await page.click(f'.sub[data-id="{doomed}"]')
    await page.wait_for_selector("#deactivated", state="visible")
    await db.execute("DELETE FROM dispatcher.subscriptions WHERE id = $1", doomed)
    await page.click("#reactivate")
    await page.wait_for_selector("#banner.error", timeout=WAIT_MS)
    text = await page.inner_text("#banner")
    assert "Could not reactivate the subscription" in text
    assert "subscription not found" in text
    assert "not_found" in text


async def test_history_pages_with_load_more(site: Site, page: Page) -> None:
    db = site.db
    sub = await subscribe(db, site.receiver.url("/many"), environment="shop-42")
    await publish(db, {"id": "p-1"}, environment="shop-42", count=60)
    await finished(db, sub, "delivered", 60)

    await sign_in(page, site)
    await page.click(f'.sub[data-id="{sub}"]')
    await page.wait_for_function(
        "() => document.querySelectorAll('tr.delivery').length === 50", timeout=WAIT_MS
    )
    await page.click("#more")
    await page.wait_for_function(
        "() => document.querySelectorAll('tr.delivery').length === 60", timeout=WAIT_MS
    )
    assert await page.locator("#more").is_hidden()
    ids = await page.eval_on_selector_all(
        "tr.delivery", "rows => rows.map(r => Number(r.dataset.id))"
    )
    assert ids == sorted(ids, reverse=True)
    assert len(set(ids)) == 60


DOCS = SCREENSHOT.parent


async def shot(page: Page, name: str) -> None:
    """A picture of the view for the README (written with DISPATCHER_UPDATE_SCREENSHOT=1)."""
    await page.wait_for_timeout(300)
    path = DOCS / name if os.environ.get("DISPATCHER_UPDATE_SCREENSHOT") == "1" else None
    picture = await page.screenshot(path=path, full_page=True)
    assert picture.startswith(b"\x89PNG")


async def api_get(site: Site, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.get(site.base + path, headers={"Authorization": f"Bearer {site.token}"}) as r,
    ):
        assert r.status == 200, await r.text()
        return await r.json()


async def publish_entity(
    db: asyncpg.Connection, entity: str, event: str = "products.update.v0"
) -> None:
    await db.execute(
        "SELECT dispatcher.publish('shop-42', $1, $2::text::jsonb, $3)",
        event,
        f'{{"id": "{entity}", "price": 9.5}}',
        entity,
    )


async def test_trend_charts_show_the_counts_of_a_real_run(site: Site, page: Page) -> None:
    receiver, db = site.receiver, site.db
    # Two 500s: the first delivery is retried once and then gives up, the second is retried
    # once and delivered; six more are delivered at once.
    receiver.plan("/shop", 500, 500, 500)
    sub = await subscribe(
        db,
        receiver.url("/shop"),
        ["products.*"],
        environment="shop-42",
        settings={"retry": {"delays": [0], "max_attempts": 2}},
    )
    await db.execute(
        "UPDATE dispatcher.subscriptions SET name = 'Shop: products' WHERE id = $1", sub
    )
    await publish(db, {"id": "p-0"}, environment="shop-42")
    await finished(db, sub, "failed", 1)
    await publish(db, {"id": "p-1"}, environment="shop-42")
    await finished(db, sub, "delivered", 1)
    await publish(db, {"id": "p-2"}, environment="shop-42", count=6)
    await finished(db, sub, "delivered", 7)
    expected = await api_get(site, f"/v1/subscriptions/{sub}/stats?window=86400&bucket=3600")
    totals = {
        key: sum(b[key] for b in expected["series"]) for key in ("delivered", "retried", "failed")
    }
    assert totals == {"delivered": 7, "retried": 2, "failed": 1}

    await sign_in(page, site)
    await page.click(f'.sub[data-id="{sub}"]')
    await page.wait_for_selector("#outcomes-plot g.bucket", timeout=WAIT_MS)
    assert await page.locator("#outcomes-plot g.bucket").count() == 24
    drawn = await page.eval_on_selector_all(
        "#outcomes-plot g.bucket",
        "gs => ['delivered', 'retried', 'failed'].map("
        "k => gs.reduce((n, g) => n + Number(g.dataset[k]), 0))",
    )
    assert drawn == [totals["delivered"], totals["retried"], totals["failed"]]
    legend = await page.eval_on_selector_all(
        "#outcomes-legend .legend-item", "items => items.map(i => i.textContent)"
    )
    assert legend == ["Delivered 7", "Retried 2", "Failed 1"]
    assert await page.locator("#outcomes-plot rect.bar.bad").count() == 1
    assert await page.locator("#latency-plot path.line.p95").count() == 1
    # The queue now: nothing waits.
    assert await page.inner_text('#queue-grid [data-key="depth"] dd') == "0"
    await shot(page, "trends.png")

    await page.click("#window-week")
    await page.wait_for_function(
        "() => document.querySelectorAll('#outcomes-plot g.bucket').length === 28",
        timeout=WAIT_MS,
    )
    assert await page.inner_text('#outcomes-legend [data-key="delivered"] strong') == "7"


async def test_search_finds_a_delivery_by_entity_and_a_shared_link_opens_it(
    site: Site, page: Page, browser: Browser
) -> None:
    receiver, db = site.receiver, site.db
    receiver.plan("/down", 503, 503)
    down = await subscribe(
        db,
        receiver.url("/down"),
        ["products.*"],
        environment="shop-42",
        profile="tillhub",
        settings={"retry": {"delays": [0], "max_attempts": 2}},
    )
    later = await subscribe(
        db,
        receiver.url("/later"),
        ["orders.*"],
        environment="shop-42",
        settings={"retry": {"delays": [3600]}},
    )
    receiver.plan("/later", 500)
    await publish_entity(db, "sku-77")
    await finished(db, down, "failed", 1)
    await publish_entity(db, "sku-78")
    await finished(db, down, "delivered", 1)
    await publish_entity(db, "order-5", "orders.create.v0")
    failed: int = await db.fetchval(
        "SELECT d.id FROM dispatcher.deliveries_done d JOIN dispatcher.events e "
        "ON e.id = d.event_id WHERE d.status = 'failed'"
    )

    async def retrying() -> bool:
        return bool(
            await db.fetchval(
                "SELECT attempts = 1 FROM dispatcher.deliveries WHERE subscription_id = $1", later
            )
        )

    await poll_until(retrying, timeout=15)
    waiting: int = await db.fetchval(
        "SELECT id FROM dispatcher.deliveries WHERE subscription_id = $1", later
    )

    await sign_in(page, site)
    await page.fill("#search", "sku-77")
    await page.click("#search-submit")
    await page.wait_for_selector("#search-view tr.found", timeout=WAIT_MS)
    found = await page.eval_on_selector_all(
        "tr.found", "rows => rows.map(r => Number(r.dataset.id))"
    )
    assert found == [failed]
    assert "#/search?entity_instance_id=sku-77" in page.url
    await shot(page, "search.png")

    await page.click(f'tr.found a[href="#/deliveries/{failed}"]')
    await page.wait_for_selector('#next-step[data-status="failed"]', timeout=WAIT_MS)
    assert page.url.endswith(f"#/deliveries/{failed}")
    assert "Gave up after 2 attempts" in await page.inner_text("#next-step")
    cards = await page.eval_on_selector_all(
        ".attempt-card[data-outcome]", "cards => cards.map(c => c.dataset.outcome)"
    )
    assert cards == ["retry", "failed"]
    codes = await page.eval_on_selector_all(
        ".attempt-card .status-code", "cells => cells.map(c => c.textContent)"
    )
    assert codes == ["503", "503"]
    headers = await page.inner_text(".attempt-card.request")
    assert "Tillhub-Signature" in headers
    assert "v1=••••••••" in headers
    await shot(page, "delivery.png")

    # Someone else opens the shared link in a fresh tab and signs in: the same delivery.
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        other = await context.new_page()
        await other.goto(f"{site.base}/ui/#/deliveries/{waiting}")
        await other.fill("#token", site.token)
        await other.click("#signin-submit")
        await other.wait_for_selector('#next-step[data-status="retrying"]', timeout=WAIT_MS)
        text = await other.inner_text("#next-step")
        assert "Retry at" in text
        assert "(attempt 2)" in text
        assert await other.inner_text("#dv-title") == f"Delivery #{waiting}"
    finally:
        await context.close()

    # By status code, across the environment's subscriptions.
    await page.fill("#search", "")
    await page.fill("#search-code", "500")
    await page.click("#search-submit")
    await page.wait_for_function(
        "id => [...document.querySelectorAll('tr.found')].map(r => Number(r.dataset.id))"
        ".join() === String(id)",
        arg=waiting,
        timeout=WAIT_MS,
    )


async def test_the_test_button_sends_a_delivery_and_the_page_stays_live(
    site: Site, page: Page
) -> None:
    receiver, db = site.receiver, site.db
    sub = await subscribe(db, receiver.url("/tested"), ["products.*"], environment="shop-42")
    await sign_in(page, site)
    await page.click(f'.sub[data-id="{sub}"]')
    await page.wait_for_selector("#rows-empty", state="visible", timeout=WAIT_MS)
    await page.click("#send-test")
    await page.wait_for_selector('tr.delivery[data-status="delivered"] .tag.test', timeout=WAIT_MS)
    await receiver.wait_for(1, "/tested")
    body = receiver.at("/tested")[0].json()
    assert body["type"] == "products.create.v0"
    assert body["data"]["id"] == "product_789"
    # A test stays out of the trends.
    stats = await api_get(site, f"/v1/subscriptions/{sub}/stats?window=86400&bucket=3600")
    assert sum(b["delivered"] for b in stats["series"]) == 0

    # Published behind the page's back: it appears without a click, and the page says when
    # it last looked.
    before = await page.get_attribute("#updated", "data-at")
    await publish(db, {"id": "p-live"}, environment="shop-42")
    await page.wait_for_function(
        "() => document.querySelectorAll('tr.delivery').length === 2", timeout=WAIT_MS
    )
    after = await page.get_attribute("#updated", "data-at")
    assert before is not None
    assert after is not None
    assert int(after) > int(before)
    assert (await page.inner_text("#updated")).startswith("Updated ")
