"""Open a local HTML file in headless Chromium (Debian's `chromium`) over the DevTools protocol:
console errors, uncaught exceptions, the state of every <img>, and a full-page screenshot.

    python tests/browser.py REPORT.html SHOT.png     # what docs/bench-report.png was made with

Used by tests/test_bench.py; needs `websocket-client` (dev extra) and a chromium binary.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]
TIMEOUT = 60.0


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@dataclass
class Page:
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    images: list[dict] = field(default_factory=list)  # {alt, complete, width, height} per <img>
    title: str = ""
    screenshot: bytes = b""


class _CDP:
    def __init__(self, url: str):
        import websocket

        self.ws = websocket.create_connection(url, timeout=TIMEOUT, suppress_origin=True)
        self.n = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait(self, method: str, deadline: float) -> dict:
        while time.monotonic() < deadline:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(f"no {method} within {TIMEOUT} s")

    def close(self):
        self.ws.close()


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
        elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
            out.append(f"log ({p['entry'].get('source')}): {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif m == "Network.loadingFailed":
            out.append(f"load failed: {p.get('errorText')}")
    return out


def open_page(html: Path, width: int = 1280) -> Page:
    """Load `html` (file://) in a fresh headless Chromium and report what a reader would see."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="edgellm-chromium-") as profile:
        proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its helper processes too are stopped below (they write to the profile)
        )
        try:
            port_file, deadline = Path(profile) / "DevToolsActivePort", time.monotonic() + TIMEOUT
            while not (port_file.is_file() and port_file.read_text().strip()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start (exit code {proc.poll()})")
                time.sleep(0.05)
            port = port_file.read_text().split()[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=TIMEOUT) as r:
                target = next(t for t in json.load(r) if t["type"] == "page")
            cdp = _CDP(target["webSocketDebuggerUrl"])
            try:
                return _visit(cdp, html, width)
            finally:
                cdp.close()
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop chromium and every process of its session: a helper still writing to the profile after
    the browser exited made removing the profile fail ("Directory not empty") in CI."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the helpers (not our children) leave the group
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def _visit(cdp: _CDP, html: Path, width: int) -> Page:
    for domain in ("Page", "Runtime", "Log", "Network"):
        cdp.call(f"{domain}.enable")
    metrics = dict(width=width, deviceScaleFactor=1, mobile=False)
    cdp.call("Emulation.setDeviceMetricsOverride", height=800, **metrics)
    cdp.call("Page.navigate", url=Path(html).resolve().as_uri())
    cdp.wait("Page.loadEventFired", time.monotonic() + TIMEOUT)
    js = (
        "JSON.stringify({title: document.title, height: document.documentElement.scrollHeight, images: "
        "Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth, "
        "height: i.naturalHeight}))})"
    )
    state = json.loads(cdp.call("Runtime.evaluate", expression=js, returnByValue=True)["result"]["value"])
    cdp.call("Emulation.setDeviceMetricsOverride", height=state["height"], **metrics)  # the whole page
    shot = cdp.call("Page.captureScreenshot", format="png")
    return Page(_errors(cdp.events), state["images"], state["title"], base64.b64decode(shot["data"]))


if __name__ == "__main__":
    page = open_page(Path(sys.argv[1]))
    Path(sys.argv[2]).write_bytes(page.screenshot)
    print(json.dumps({"errors": page.errors, "images": page.images, "title": page.title}, indent=1))
