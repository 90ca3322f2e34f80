"""Drive the web demo in headless Chromium: screenshot it and time its first caption (helpers for tests too).

Usage:

    python tools/app_screenshot.py --model outputs/demo/model --output docs/app_demo.png \
        --phone-output docs/app_demo_phone.png

Starts `scripts/app.py --model MODEL` as a child process on a free port of 127.0.0.1 (so the times include its
imports and model loading), opens the page in headless Chromium, uploads the bundled example images, ticks
Explain, presses Caption, waits for the captions and the explain figures, and writes a screenshot of the whole
page 1280 px wide (`--output`) and, with `--phone-output`, of a 390 × 844 phone window. It logs the seconds from
starting the app to its page being served, and from pressing Caption to the captions being on the page, for the
first press and for a second one (a warm-up stall would show as a first press much slower than the second).

The browser is Debian's `chromium` with `chromium-driver` (`/usr/bin/chromium`, `/usr/bin/chromedriver`; other
paths through the `CHROMIUM` and `CHROMEDRIVER` environment variables), driven by selenium:
`apt-get install -y chromium chromium-driver`, which `.ci/run` does when they are missing. It runs with a fresh
profile and with background networking off, and only ever opens 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

logger = logging.getLogger("fsgr_pma.app_screenshot")

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
APP = SCRIPTS / "app.py"
EXAMPLES = SCRIPTS / "app_examples"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
)
DESKTOP, PHONE = (1280, 900), (390, 844)


class BrowserMissingError(RuntimeError):
    """Chromium or its driver is not installed; the message says how to install them."""


# ----------------------------------------------------------------------------------------------------------------
# Browser
def find_browser() -> tuple[str, str]:
    """Paths of Chromium and chromedriver, or a `BrowserMissingError` naming what to install."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        raise BrowserMissingError(
            f"not found: {' and '.join(missing)}. Install Debian's browser with "
            "`apt-get update && apt-get install -y chromium chromium-driver` (.ci/run does this), "
            "or point CHROMIUM and CHROMEDRIVER at another Chromium and its driver"
        )
    return shutil.which(CHROMIUM), shutil.which(CHROMEDRIVER)


@contextlib.contextmanager
def browser(size: tuple[int, int] = DESKTOP) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile and a `size` (width, height) window; quit and removed afterwards."""
    chromium, chromedriver = find_browser()
    with tempfile.TemporaryDirectory(prefix="fsgr-pma-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
        driver.set_page_load_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver: WebDriver, url: str, timeout: float = 60) -> None:
    """Load the app's page and wait until its upload field is there."""
    driver.get(url)
    WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#images input[type=file]"))


def image_count(driver: WebDriver) -> int:
    """Images in the upload field."""
    return len(driver.find_elements(By.CSS_SELECTOR, "#images .thumbnail-item"))


def wait_for_images(driver: WebDriver, count: int, timeout: float = 30) -> None:
    """Wait until the upload field shows at least `count` images."""
    WebDriverWait(driver, timeout).until(lambda d: image_count(d) >= count)


def upload(driver: WebDriver, paths: Sequence[str | Path], timeout: float = 30) -> None:
    """Put files into the image field (as a file dialog would) and wait until the page shows them."""
    before = image_count(driver)
    driver.find_element(By.CSS_SELECTOR, "#images input[type=file]").send_keys(
        "\n".join(str(Path(path).resolve()) for path in paths)
    )
    wait_for_images(driver, before + len(paths), timeout)


def clear_images(driver: WebDriver, timeout: float = 10) -> None:
    """Press the image field's clear button and wait until it is empty."""
    driver.find_element(By.CSS_SELECTOR, "#images button[aria-label='Clear']").click()
    WebDriverWait(driver, timeout).until(lambda d: image_count(d) == 0)


def load_example(driver: WebDriver, index: int) -> None:
    """Click the `index`-th example (negative: from the end) and wait until its images are in the upload field."""
    driver.find_elements(By.CSS_SELECTOR, "#examples button.gallery-item")[index].click()
    WebDriverWait(driver, 30).until(lambda d: image_count(d) > 0)


def set_explain(driver: WebDriver, wanted: bool) -> None:
    box = driver.find_element(By.CSS_SELECTOR, "#explain input[type=checkbox]")
    if box.is_selected() != wanted:
        box.click()


# Records, for each watched element id, whether its progress indicator (Gradio's status tracker, shown while an
# event that outputs to it runs) appeared and then went away again. A MutationObserver sees every change, so a
# caption that takes a few milliseconds is not missed, and an unchanged result still counts as a new one.
WATCH_PROGRESS = """
const ids = arguments[0];
window.fsgrProgress = Object.fromEntries(ids.map((id) => [id, {seen: false, done: false}]));
const check = () => {
  for (const id of ids) {
    const tracker = document.querySelector(`#${id} [data-testid='status-tracker']`);
    const busy = tracker !== null && !tracker.classList.contains("hide");
    const state = window.fsgrProgress[id];
    if (busy) { state.seen = true; state.done = false; } else if (state.seen) { state.done = true; }
  }
};
if (window.fsgrObserver) { window.fsgrObserver.disconnect(); }
window.fsgrObserver = new MutationObserver(check);
window.fsgrObserver.observe(document.body, {attributes: true, childList: true, subtree: true});
"""


def press_caption(driver: WebDriver, names: Sequence[str], figures: bool = False, timeout: float = 120) -> str:
    """Press Caption and wait until the captions (and, with `figures`, the explain figures) have been redrawn.

    Waits for the progress indicator of the captions box (and of the figures) to appear and go away, then checks
    that the captions name every file in `names`.

    Returns:
        the text of the captions box.
    """
    watched = ["captions", "figures"] if figures else ["captions"]
    driver.execute_script(WATCH_PROGRESS, watched)
    driver.find_element(By.ID, "caption-button").click()
    try:
        WebDriverWait(driver, timeout, poll_frequency=0.05).until(
            lambda d: all(d.execute_script(f"return window.fsgrProgress['{id}'].done") for id in watched)
        )
    except TimeoutException as error:
        text = driver.find_element(By.ID, "captions").text
        raise TimeoutException(f"captioning did not finish in {timeout} s; the box shows {text!r}") from error
    text = driver.find_element(By.ID, "captions").text
    missing = [name for name in names if name not in text]
    if missing:
        raise AssertionError(f"the captions do not name {missing}: {text!r}")
    return text


def figure_count(driver: WebDriver) -> int:
    """Explain figures on the page (their thumbnails are labelled "Thumbnail i of N")."""
    thumbnails = driver.find_elements(By.CSS_SELECTOR, "#figures .thumbnail-item[aria-label^='Thumbnail']")
    return int(thumbnails[0].get_attribute("aria-label").rsplit(" ", 1)[-1]) if thumbnails else 0


def page_fits_width(driver: WebDriver) -> bool:
    """Nothing sticks out sideways: the page needs no horizontal scrolling at the window's width."""
    return driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


def screenshot(driver: WebDriver, path: str | Path) -> Path:
    """The whole page at the window's width, as tall as its content, as a PNG."""
    width = driver.execute_script("return window.innerWidth")
    height = math.ceil(driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"])
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.3)  # let the page lay itself out at the new height
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not driver.save_screenshot(str(path)):
            raise WebDriverException(f"could not write the screenshot {path}")
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path


# ----------------------------------------------------------------------------------------------------------------
# App
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_served(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers 200; fail early if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the app exited with status {process.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not served within {timeout} s")


@contextlib.contextmanager
def running_app(app: Path, app_args: Sequence[str], timeout: float = 300, log: Path | None = None) -> Iterator[str]:
    """Start `python APP APP_ARGS --port P`, yield its URL once it is served; stop it afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    with contextlib.ExitStack() as stack:
        output = stack.enter_context(open(log, "w")) if log is not None else subprocess.DEVNULL
        process = subprocess.Popen([sys.executable, str(app), *app_args, "--port", str(port)], env=env,
                                   stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_until_served(url, timeout, process)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)


# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved model directory (or Hub repo id) for app.py")
    parser.add_argument("--adapter", default=None, help="PEFT adapter for app.py")
    parser.add_argument("--output", type=Path, required=True, help="screenshot of the desktop page (.png)")
    parser.add_argument("--phone-output", type=Path, default=None, help="screenshot of a phone-sized page (.png)")
    parser.add_argument("--images", type=Path, nargs="+", default=None, help="images to upload (the examples)")
    parser.add_argument("--no-explain", action="store_true", help="leave Explain unticked")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the app to start")
    args = parser.parse_args(argv)
    for path in (args.output, args.phone_output):
        if path is not None and path.suffix.lower() != ".png":
            parser.error(f"screenshots are PNG files, got {path}")
    args.images = args.images or sorted(EXAMPLES.glob("*.png"))
    if not args.images:
        parser.error(f"no images given and none in {EXAMPLES}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    find_browser()  # fail before starting the app
    app_args = ["--model", args.model] + (["--adapter", args.adapter] if args.adapter is not None else [])
    names = [path.name for path in args.images]
    times = {}
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "app.log"
        started = time.perf_counter()
        with running_app(APP, app_args, timeout=args.timeout, log=log) as url:
            times["start_to_served_s"] = time.perf_counter() - started
            shots = [(DESKTOP, args.output)] + ([(PHONE, args.phone_output)] if args.phone_output else [])
            for index, (size, output) in enumerate(shots):
                with browser(size) as driver:
                    open_page(driver, url)
                    upload(driver, args.images)
                    if index == 0:
                        clicked = time.perf_counter()
                        press_caption(driver, names)
                        times["first_caption_s"] = time.perf_counter() - clicked
                        times["start_to_first_caption_s"] = time.perf_counter() - started
                        clicked = time.perf_counter()
                        press_caption(driver, names)
                        times["second_caption_s"] = time.perf_counter() - clicked
                    set_explain(driver, not args.no_explain)
                    press_caption(driver, names, figures=not args.no_explain)
                    logger.info("wrote %s (%d × %d window)", screenshot(driver, output), *size)
        logger.info("app log:\n%s", log.read_text().strip())
    logger.info(
        "app served %.1f s after start; first caption of %d images %.2f s after pressing Caption (%.1f s after "
        "start), second %.2f s", times["start_to_served_s"], len(names), times["first_caption_s"],
        times["start_to_first_caption_s"], times["second_caption_s"],
    )
    return times


if __name__ == "__main__":
    main()
