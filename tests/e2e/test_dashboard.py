"""The dashboard end to end in headless Chromium (Debian's, driven by Playwright): empty states
on a fresh project, charts with a time axis and a unit on the value axis that move with live
data, nothing wider than the window at 1024, 1280 and 1920 px, Check now, Replay, and a
visible banner when the server goes away.

``VECTORSYNC_SCREENSHOT=docs/dashboard.png`` also writes the README's screenshot (1280 px
wide, live data; a relative path is taken from the repository root)."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from tests.helpers import App, wait_for, write_config
from vectorsync.falkordb_server import free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
FAULTY_TEXT = "{{ title }}\\n{{ body }}{% if published == 0 %}{{ 1 // published }}{% endif %}"
DEADLINE_MS = 120_000  # conditions with generous deadlines: the machine may be loaded
CHART_UNITS = {"lag": "seconds", "pending": "changes", "throughput": "changes/s"}
CHECK_COLUMNS = ["missing", "orphaned", "outdated", "stale", "payload", "dead-lettered"]
TIME_LABEL = re.compile("\u2212[0-9]+ s")  # a minus sign: "\u221260 s"

LAYOUT = """() => ({
  page: document.documentElement.scrollWidth,
  overflowing: [...document.querySelectorAll('.card')]
    .filter(c => c.scrollWidth > c.clientWidth).map(c => c.dataset.card),
  scrolling: [...document.querySelectorAll('.card .scroll')]
    .filter(s => s.scrollWidth > s.clientWidth).map(s => s.closest('.card').dataset.card),
})"""
AXES = """() => [...document.querySelectorAll('svg[data-chart]')].map(svg => ({
  chart: svg.dataset.chart,
  times: [...svg.querySelectorAll('[data-axis=x] .tick-label')].map(t => t.textContent),
  unit: svg.querySelector('[data-axis=y] .unit')?.textContent,
  values: svg.querySelectorAll('[data-axis=y] .tick-label').length,
  gridlines: svg.querySelectorAll('.grid line').length,
}))"""
EMPTY_STATES = """() => Object.fromEntries([...document.querySelectorAll('.card')]
  .map(c => [c.dataset.card, c.querySelector('p.empty')?.textContent ?? null]))"""
LOADED = """() => ![...document.querySelectorAll('p.empty')]
  .some(p => p.textContent.startsWith('loading'))"""
LIVE_THROUGHPUT = """(points) => [...document.querySelectorAll('#chart-throughput polyline.series')]
  .some(line => +line.dataset.count >= points && +line.dataset.max > 0)"""


def up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def assert_axes(page: Page) -> None:
    """Each chart: time labels on its x axis ending at "now", its unit on the y axis, and
    gridlines."""
    charts = page.evaluate(AXES)
    assert sorted(c["chart"] for c in charts) == sorted(CHART_UNITS)
    for chart in charts:
        assert chart["unit"] == CHART_UNITS[chart["chart"]], chart
        assert chart["times"][-1] == "now", chart
        assert sum(bool(TIME_LABEL.fullmatch(t)) for t in chart["times"]) >= 3, chart
        assert chart["values"] >= 2 and chart["gridlines"] >= 4, chart


def assert_fits(page: Page, width: int, *, tables_fit: bool = True) -> None:
    """At ``width`` px nothing overflows the page or a card; with ``tables_fit``, no table
    needs its own scrollbar either."""
    page.set_viewport_size({"width": width, "height": 800})
    layout = page.evaluate(LAYOUT)
    assert layout["page"] <= width, layout
    assert layout["overflowing"] == [], layout
    if tables_fit:
        assert layout["scrolling"] == [], layout


def open_browser(pw: Playwright) -> Browser:
    return pw.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )


def test_dashboard_shows_live_data_and_replays_a_dead_letter(workdir: Path, app: App) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    write_config(
        workdir, text=FAULTY_TEXT, extra_mapping=f"[http]\nport = {port}\nmax_lag_seconds = 60"
    )
    log = (workdir / "serve.log").open("wb")  # a file, not a pipe a long run could fill
    server = subprocess.Popen(
        [sys.executable, "-m", "vectorsync", "serve"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    stop = threading.Event()

    def write_load() -> None:
        writer = App(workdir / "app.db")
        rng = random.Random(3)
        while not stop.is_set():
            writer.update(rng.randint(20, 40), author=rng.choice(["ann", "bob"]))
            time.sleep(0.02)  # pacing the load, not synchronisation
        writer.close()

    loader = threading.Thread(target=write_load)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: up(base + "/healthz"), 120)
        with sync_playwright() as pw:
            browser = open_browser(pw)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(DEADLINE_MS)
            page.goto(base + "/")

            # a fresh project, no rows yet: every panel says what it is waiting for
            page.wait_for_function(LOADED, polling=250)
            empty = page.evaluate(EMPTY_STATES)
            assert empty["dlq"] == "no dead letters", empty
            assert empty["conflicts"] == "no conflicts", empty
            assert (empty["checks"] or "").startswith("no check yet"), empty
            assert (empty["embeddings"] or "").startswith("nothing embedded yet"), empty
            assert "articles" in page.inner_text("#mappings")
            assert page.is_hidden("#banner")
            assert_axes(page)
            assert_fits(page, 1280)

            # live data: rows arrive, one of them fails to render (a dead letter)
            for k in range(1, 41):
                app.insert(k, published=0 if k == 13 else 2020)
            loader.start()
            page.wait_for_function(LIVE_THROUGHPUT, arg=3, polling=250)
            page.wait_for_selector("button.replay")
            page.wait_for_function("() => document.querySelector('#ready').textContent === 'ready'")
            rows = page.eval_on_selector_all(
                "#mappings tbody tr", "trs => trs.map(t => t.innerText)"
            )
            assert len(rows) == 1 and rows[0].startswith("articles"), rows
            page.wait_for_function(  # the index versions card: version 1 of articles, live
                "() => /articles\\s+1\\s+live/.test(document.querySelector('#indexes').innerText)",
                polling=250,
            )
            page.click("#check-now")  # a check inside the serving process
            page.wait_for_function(
                "() => /consistent/i.test(document.querySelector('#checks').innerText)",
                polling=250,
            )
            headers = page.eval_on_selector_all("#checks th", "ths => ths.map(t => t.textContent)")
            assert headers[-len(CHECK_COLUMNS) :] == CHECK_COLUMNS
            row = page.eval_on_selector_all("#checks td", "tds => tds.map(t => t.textContent)")
            assert row[-1] == "1"  # the pending dead letter, known to the check
            assert_axes(page)
            assert_fits(page, 1280)
            shot = os.environ.get("VECTORSYNC_SCREENSHOT")
            if shot:  # for the README: a chart with some history
                page.wait_for_function(LIVE_THROUGHPUT, arg=40, polling=1000, timeout=300_000)
                page.screenshot(path=str(REPO / shot), full_page=True)
            assert_fits(page, 1920)
            assert_fits(page, 1024, tables_fit=False)  # a table may scroll inside its card
            assert_fits(page, 1280)

            app.update(13, published=2024)  # fix the row, then replay it from the page
            page.click("button.replay")  # a locator: the card may have been redrawn
            page.wait_for_function(
                "() => document.querySelector('#dlq').innerText.includes('no dead letters')",
                polling=250,
            )

            # the server goes away: the page says so instead of going quiet
            stop.set()
            loader.join()
            server.terminate()
            server.wait(timeout=120)
            page.wait_for_selector("#banner:not([hidden])")
            assert "cannot reach" in page.inner_text("#banner")
            browser.close()
    finally:
        stop.set()
        if loader.is_alive():
            loader.join()
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=120)
        log.close()
    assert server.returncode == 0, (workdir / "serve.log").read_text()
