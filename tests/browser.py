"""Headless Chromium driven over the DevTools protocol (a websocket), for the browser test of the views.

Playwright cannot download its browsers here, so this drives Debian's `chromium` directly: start it with
`--remote-debugging-port=0`, read the port it chose from `DevToolsActivePort`, and send CDP commands to
the page's websocket. Only what the test needs: cookies, navigation, JavaScript evaluation, screenshots.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium(*, install: bool = True) -> tuple[str | None, str]:
    """The browser's path, installing Debian's `chromium` first when allowed; else None and why not."""
    for name in CANDIDATES:
        if path := shutil.which(name):
            return path, ""
    if not install:
        return None, "no chromium on PATH (ZIMAGE_BROWSER_INSTALL=0: not installing it)"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "no chromium on PATH, and apt-get as root is not available to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"installing chromium failed: {' '.join(argv)}: {exc}"
        if done.returncode != 0:
            return None, f"installing chromium failed: {' '.join(argv)}: {done.stderr[-500:]}"
    path = shutil.which("chromium")
    return path, "" if path else "apt-get installed chromium but it is not on PATH"


class Page:
    """One tab: `call` sends a CDP command and returns its result."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self._ws = connect(ws_url, max_size=64 * 2**20, open_timeout=30)
        self._ids = itertools.count(1)

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        self._ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") != message_id:
                continue  # an event
            if "error" in message:
                raise RuntimeError(f"{method}: {message['error']}")
            return dict(message.get("result") or {})

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise)."""
        result = self.call(
            "Runtime.evaluate", timeout, expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, *, timeout: float = 60, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                last = self.evaluate(expression)
                if last:
                    return last
            time.sleep(0.25)
        raise AssertionError(
            f"timed out after {timeout:.0f}s waiting for {what or expression} (last: {last!r})"
        )

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ws.close()


@contextlib.contextmanager
def chromium(binary: str, *, width: int = 1400, height: int = 1100) -> Iterator[Callable[[], Page]]:
    """A headless Chromium with a throwaway profile; yields a function that opens its first tab."""
    profile = Path(tempfile.mkdtemp(prefix="zimage-chromium-"))
    argv = [
        binary,
        "--headless=new",
        "--no-sandbox",  # tests run as root in containers, where the sandbox cannot start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--remote-debugging-port=0",
        "--remote-allow-origins=*",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "about:blank",
    ]
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    pages: list[Page] = []
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])

        def first_page() -> Page:
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            page = Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
            for domain in ("Page", "Network", "Runtime"):
                page.call(f"{domain}.enable")
            pages.append(page)
            return page

        yield first_page
    finally:
        for page in pages:
            page.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
