"""A headless Chromium driven over its DevTools protocol, for the tests of the HTML pages.

Browser(page) opens a file:// page in a fresh profile and records what a user would not want to
see: console errors, uncaught exceptions, and any request that leaves the file (a CDN script, a
font, a beacon). evaluate() runs JavaScript in the page; screenshot() returns an element's pixels.
Chromium comes from the package manager (apt-get install -y chromium), never from a download.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

INSTALL = "Chromium is not installed: apt-get install -y chromium (Debian/Ubuntu) runs the browser tests"


def chromium() -> str:
    """The browser's path, or skip the test with one line saying how to install it."""
    path = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if path is None:
        pytest.skip(INSTALL)
    try:
        import websocket  # noqa: F401  (websocket-client: the [test] extra)
    except ImportError:
        pytest.skip("websocket-client is not installed: pip install -e '.[test]' runs the browser tests")
    return path


class Browser:
    def __init__(self, page: Path, width: int = 1600, height: int = 1400):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="nanotrain-chromium-")
        self.proc = subprocess.Popen(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-extensions",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = self._port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            target = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id, self.errors, self.requests = 0, [], []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Page.navigate", url=page.resolve().as_uri())
        self._wait_event("Page.loadEventFired")

    def _port(self) -> int:
        """Chromium writes the port it chose to DevToolsActivePort in its profile."""
        path = Path(self.profile) / "DevToolsActivePort"
        for _ in range(300):
            if path.exists() and path.read_text().strip():
                return int(path.read_text().split()[0])
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.proc.returncode}")
            time.sleep(0.1)
        raise RuntimeError("chromium did not open its DevTools port in 30 s")

    def _record(self, msg: dict) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            self.errors.append(d.get("exception", {}).get("description") or d.get("text"))
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            self.errors.append(p["entry"]["text"])
        elif method == "Network.requestWillBeSent":
            self.requests.append(p["request"]["url"])

    def _wait_event(self, name: str) -> dict:
        while True:
            msg = json.loads(self.ws.recv())
            self._record(msg)
            if msg.get("method") == name:
                return msg

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            self._record(msg)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, js: str):
        """The value of a JavaScript expression (JSON-serialisable), evaluated in the page."""
        out = self.call("Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"{js}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def outside_requests(self) -> list[str]:
        """Requests for anything but the page itself and inline data."""
        return [u for u in self.requests if not u.startswith(("file:", "data:", "about:"))]

    def screenshot(self, selector: str):
        """The pixels (numpy array, height x width x channels) of the element `selector`."""
        from matplotlib.image import imread

        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return [r.x + scrollX, r.y + scrollY, r.width, r.height]; })()")
        clip = dict(zip(("x", "y", "width", "height"), box), scale=1)
        png = self.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)["data"]
        return imread(io.BytesIO(base64.b64decode(png)), format="png")

    def save_screenshot(self, selector: str, path: Path) -> None:
        from matplotlib.image import imsave

        imsave(path, self.screenshot(selector))

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)
