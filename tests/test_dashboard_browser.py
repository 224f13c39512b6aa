"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright
against a real ``conveyor serve`` with an API key. The page logs in with HTTP Basic (as a person
would when the browser asks), loads without console errors, its numbers move under load and go
back to idle; a screenshot taken under load is kept under the test's tmp dir (the path is
printed). Skipped, with the reason, only where Playwright or Chromium is missing
(``scripts/bootstrap.sh test`` installs both)."""

from __future__ import annotations

import os
import shutil
import threading
import time

import httpx
import pytest
from server_process import ServerProcess

KEY = "browser-test-key"
CHROMIUM = os.environ.get("CONVEYOR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (pip install -e '.[test]')")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set "
                "CONVEYOR_CHROMIUM)", allow_module_level=True)


def _value(page, test_id: str) -> str:
    return page.get_attribute(f'[data-testid="{test_id}"]', "data-value") or ""


def _wait_for(page, predicate, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"the dashboard never showed {what}")


def _load(url: str, statuses: list[int]) -> None:
    # long enough (two rounds of 3 x 64 tokens, a few seconds) that the page's twice-a-second
    # frames see requests running: 16-token rounds could start and end between two frames
    body = {"prompt": "Conveyor belts carry", "max_tokens": 64, "temperature": 0.0,
            "ignore_eos": True}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        for _ in range(2):
            threads = [threading.Thread(target=lambda: statuses.append(
                c.post("/v1/completions", json=body).status_code)) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()


def test_dashboard_moves_under_load_and_returns_to_idle(tmp_path):
    server = ServerProcess("--api-key", KEY, "--price-per-hour", "2.5", "--max-num-seqs", "4")
    try:
        server.wait_healthy()
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox"])
            context = browser.new_context(http_credentials={"username": "operator",
                                                            "password": KEY},
                                          viewport={"width": 1280, "height": 1000})
            page = context.new_page()
            console = []
            page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: console.append(str(e)))
            page.goto(server.url + "/dashboard")
            _wait_for(page, lambda: page.text_content("#status") == "ok", "status ok")
            assert _value(page, "num-running") == "0" and _value(page, "cost-per-mtok") == ""
            statuses: list[int] = []
            load = threading.Thread(target=_load, args=(server.url, statuses))
            load.start()
            seen = {"running": 0.0, "tokens": 0.0, "busy": 0.0, "kv": 0.0}

            def moved() -> bool:
                for key, test_id in (("running", "num-running"), ("tokens", "tokens-per-s"),
                                     ("kv", "kv-usage")):
                    seen[key] = max(seen[key], float(_value(page, test_id) or 0))
                seen["busy"] = max(seen["busy"], float(page.get_attribute(
                    '[data-testid="belt"]', "data-busy-cells") or 0))
                return (all(v > 0 for v in seen.values()) and seen["busy"] >= 8
                        and _value(page, "cost-per-mtok") != "")

            _wait_for(page, moved, f"numbers moving under load (so far {seen})")
            shot = tmp_path / "dashboard-under-load.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"dashboard screenshot: {shot}")
            assert page.text_content('[data-testid="cost-per-mtok"]').startswith("$")
            load.join()
            assert statuses == [200] * 6
            _wait_for(page, lambda: _value(page, "num-running") == "0" and
                      _value(page, "num-waiting") == "0" and
                      float(_value(page, "tokens-per-s") or 1) == 0.0, "idle again")
            assert float(_value(page, "kv-usage")) == 0.0
            page.screenshot(path=str(tmp_path / "dashboard-idle.png"), full_page=True)
            context.close()
            browser.close()
        assert console == [], console
        assert shot.stat().st_size > 10_000
    finally:
        server.stop()
