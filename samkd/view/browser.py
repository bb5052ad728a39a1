"""Driving `samkd view` from a script: serve it as a subprocess, open it in a system Chromium
through Playwright (`pip install playwright`, never `playwright install`: the browser is the
system's, e.g. Debian's `chromium`), click on an image pixel. The browser test and the
benchmark use it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM_ENV = "SAMKD_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
# Headless, and nothing that reaches out to the network or needs a desktop session.
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
)
START_SECONDS = 90.0


def find_chromium() -> Path | None:
    """The browser to drive: $SAMKD_CHROMIUM, else `chromium` on the PATH."""
    if os.environ.get(CHROMIUM_ENV):
        return Path(os.environ[CHROMIUM_ENV])
    found = next((shutil.which(name) for name in CHROMIUM_NAMES if shutil.which(name)), None)
    return None if found is None else Path(found)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answering(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@dataclass(frozen=True)
class Server:
    """A `samkd view` process serving its page at `url`."""

    url: str
    process: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float | None:
        """The CPU time the process has used (Linux's /proc; None elsewhere)."""
        stat = Path(f"/proc/{self.process.pid}/stat")
        if not stat.is_file():
            return None
        fields = stat.read_text().rsplit(")", 1)[1].split()
        # utime and stime, the 14th and 15th fields, in clock ticks.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def serving(
    arguments: Sequence[str | Path], log: Path, cwd: Path | None = None, threads: int = 1
) -> Iterator[Server]:
    """`samkd view ARGUMENTS` on a free local port while the block runs, yielded once the
    page answers. `threads`: torch's (OMP_NUM_THREADS). Raises RuntimeError with the
    server's output when it exits or does not answer within `START_SECONDS`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, "-m", "samkd", "view", *map(str, arguments), "--port", str(port)]
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    with log.open("w") as output:
        server = subprocess.Popen(command, cwd=cwd, env=environment, stdout=output, stderr=output)
        try:
            deadline = time.monotonic() + START_SECONDS
            while not answering(url):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"samkd view did not start: {log.read_text()}")
                time.sleep(0.1)
            yield Server(url, server)
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@contextmanager
def chromium(executable: Path) -> Iterator[Any]:
    """A headless Chromium (`executable`) under Playwright's control."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(executable), args=list(CHROMIUM_ARGS)
        )
        try:
            yield browser
        finally:
            browser.close()


def click_pixel(page: Any, selector: str, x: float, y: float, original_width: int) -> None:
    """Click pixel `(x, y)` of the original image shown (enlarged by a whole factor) in the
    `<img>` that `selector` names, at the centre of the pixel's square."""
    image = page.locator(selector)
    # Wait until the picture is decoded: before, it has no natural size.
    natural = image.evaluate(
        "element => element.decode().then(() => [element.naturalWidth, element.naturalHeight])"
    )
    box = image.bounding_box()
    scale = natural[0] // original_width
    # As Gradio maps a click back to the image: fitted, centred, never shown larger.
    shown = min(box["width"] / natural[0], box["height"] / natural[1], 1)
    left = box["x"] + (box["width"] - natural[0] * shown) / 2
    top = box["y"] + (box["height"] - natural[1] * shown) / 2
    page.mouse.click(left + (x + 0.5) * scale * shown, top + (y + 0.5) * scale * shown)
