"""Screenshots of the Gradio demos for the README, taken in headless Chromium against a running server.

    make serve                                        # or: .venv/bin/python -m realtime serve
    .venv/bin/python scripts/demo_screenshots.py [--url http://127.0.0.1:8000] [--out docs]

Writes ``demo.png`` (the Vision tab: a rendered test image of vision.data, a question, the streamed
answer) and ``demo_3d.png`` (the 3D tab: a held-out test scene, a question, the answer and the gate's
count). Needs Chromium and chromedriver (scripts/system-deps.sh installs them).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the running server")
    ap.add_argument("--out", type=Path, default=DOCS)
    ap.add_argument("--model", default="", help="the vision model or adapter to pick (default: the first listed)")
    ap.add_argument("--question", default="", help="default: the rendered image's own test question")
    ap.add_argument("--seed", type=int, default=7, help="of the rendered image")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        sys.exit("Chromium and chromedriver are needed: run scripts/system-deps.sh")
    from PIL import Image  # noqa: F401  (the image below is rendered with PIL)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from vision.data_render import render_single

    image, qas = render_single(random.Random(args.seed))
    asked = args.question or qas[0].question
    print(f"vision: {asked!r} (the right answer: {qas[0].answer!r})" if not args.question else f"vision: {asked!r}")
    tmp = Path(tempfile.mkdtemp())
    image.save(tmp / "shape.png")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1000",
                "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    text = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731

    def wait_for(what: str, check) -> None:
        deadline = time.monotonic() + args.timeout
        while not check():
            if time.monotonic() > deadline:
                driver.save_screenshot(str(tmp / "timeout.png"))
                raise SystemExit(f"timed out waiting for {what}; screenshot {tmp / 'timeout.png'}")
            time.sleep(0.3)

    def click(label: str) -> None:
        visible = [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == label and b.is_displayed()]
        visible[0].click()

    args.out.mkdir(parents=True, exist_ok=True)
    try:
        driver.get(f"{args.url.rstrip('/')}/demo/")
        wait_for("the model list", lambda: " model" in text() and "(base" in text())
        if args.model:
            box = driver.find_elements(By.CSS_SELECTOR, "input[role=listbox], input[aria-label='Model or adapter']")[0]
            box.clear()
            box.send_keys(args.model, Keys.ENTER)
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(tmp / "shape.png"))
        wait_for("the image", lambda: driver.find_elements(By.CSS_SELECTOR, "img[src*='shape']"))
        question = next(t for t in driver.find_elements(By.TAG_NAME, "textarea") if t.is_displayed()
                        and t.get_attribute("value").startswith("What is in"))
        question.clear()
        question.send_keys(asked)
        click("Ask")
        wait_for("the answer", lambda: "answer tokens" in text())
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        driver.save_screenshot(str(args.out / "demo.png"))
        print(f"wrote {args.out / 'demo.png'}")

        next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "3D").click()
        wait_for("the 3D example", lambda: "1,024 points" in text())
        click("Ask")
        wait_for("the 3D answer", lambda: "spatial tokens kept" in text())
        driver.set_window_size(1200, 1420)  # the answer sits under the plot
        time.sleep(1.5)  # the plot settles
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(args.out / "demo_3d.png"))
        print(f"wrote {args.out / 'demo_3d.png'}")
    finally:
        driver.quit()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
