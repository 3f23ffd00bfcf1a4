"""The dashboard end to end in headless Chromium (Debian's, driven by Playwright): the page
loads from `vectorsync serve`, its charts move with live data, and Replay works."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import App, wait_for, write_config
from vectorsync.falkordb_server import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FAULTY_TEXT = "{{ title }}\\n{{ body }}{% if published == 0 %}{{ 1 // published }}{% endif %}"


def up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.mark.slow
def test_dashboard_shows_live_data_and_replays_a_dead_letter(workdir: Path, app: App) -> None:
    from playwright.sync_api import sync_playwright

    for k in range(1, 41):
        app.insert(k)
    app.update(13, published=0)  # a dead letter to replay from the page
    port = free_port()
    write_config(
        workdir, text=FAULTY_TEXT, extra_mapping=f"[http]\nport = {port}\nmax_lag_seconds = 30"
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "vectorsync", "serve"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
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
        wait_for(lambda: up(base + "/healthz"), 60)
        loader.start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
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
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(base + "/")
            page.wait_for_selector("#mappings td")
            # live throughput: the chart's series gets points, some above zero
            page.wait_for_function(
                """() => {
                const line = document.querySelector('#tput polyline');
                if (!line) return false;
                const ys = line.getAttribute('points').trim().split(' ').map(p => +p.split(',')[1]);
                return ys.length >= 15 && ys.some(y => y < 117);
            }""",
                timeout=30_000,
            )
            assert "ready" in page.inner_text("#ready")
            assert page.inner_text("#mappings").count("articles") == 1
            button = page.wait_for_selector("button.replay")
            assert button is not None
            app.update(13, published=2024)  # fix the row, then replay it from the page
            button.click()
            page.wait_for_function(
                "() => document.querySelector('#dlq').innerText.includes('empty')", timeout=30_000
            )
            page.click("#check-now")  # a check inside the serving process
            page.wait_for_function(
                "() => document.querySelector('#checks').innerText.includes('full')", timeout=30_000
            )
            shot = os.environ.get("VECTORSYNC_SCREENSHOT")
            page.screenshot(path=shot or str(workdir / "dashboard.png"), full_page=True)
            browser.close()
    finally:
        stop.set()
        if loader.is_alive():
            loader.join()
        server.terminate()
        _, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr.decode()
