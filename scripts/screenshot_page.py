"""Screenshots of the web page (desktop and phone width) for the README: a 3-device emulated cluster
serving MODEL, one chat message, then docs/page-desktop.png and docs/page-phone.png.

    .venv/bin/python scripts/screenshot_page.py [--model models-cache/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cluster_proc import ClusterProcess  # noqa: E402 - the tests' launcher
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_dashboard import browser  # noqa: E402 - the tests' headless Chromium


def shoot(url: str, out: Path, width: int, height: int, phone: bool, message: str | None) -> None:
    driver = browser(width, height, phone=phone)
    try:
        driver.get(url + "/")
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".device")) >= 3)
        if message:
            driver.find_element(By.ID, "prompt").send_keys(message)
            driver.find_element(By.CSS_SELECTOR, "#send button").click()
            WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg[data-done='true']"))
        time.sleep(1.5)  # two feed updates: rates filled in
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models-cache/smollm2-135m-instruct")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    out = ROOT / args.out
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = ClusterProcess(Path(args.model).resolve(), 3, Path(tmp))
        try:
            shoot(cluster.url, out / "page-desktop.png", 1280, 800, False, "What is an edge device?")
            shoot(cluster.url, out / "page-phone.png", 390, 844, True, None)
        finally:
            cluster.stop()
    print(f"wrote {out / 'page-desktop.png'} and {out / 'page-phone.png'}")


if __name__ == "__main__":
    main()
