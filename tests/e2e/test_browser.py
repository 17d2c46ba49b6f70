"""End to end in a real headless Chromium (Debian's `chromium`, driven by Playwright).

Run with `make e2e` (needs `pip install playwright` and `apt-get install chromium`; no browser is
downloaded: Playwright is pointed at /usr/bin/chromium). Saves a screenshot of the page to
`$APT2_SCREENSHOT` (default: a temporary directory).
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

pytestmark = pytest.mark.e2e
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (make e2e)")

CHROMIUM = os.environ.get("APT2_CHROMIUM", "/usr/bin/chromium")
if not os.path.exists(CHROMIUM):
  pytest.skip(f"no system browser at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _server(control_channels):
  from apt2_jax.inference import serve
  from test_inference import tiny_generator
  gen = tiny_generator(control_channels)
  # Compile before the browser's clock starts.
  warm = gen.fork()
  warm.start(np.zeros((gen.height, gen.width, 3), np.uint8), text="", seed=0)
  warm.step(None)
  warm.close()
  return serve.DemoServer(gen, serve.ServerOptions(port=0)).start_in_thread()


@pytest.fixture(scope="module")
def server():
  s = _server(20)  # camera
  yield s
  s.stop()


def _browser(p):
  return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)


def test_page_streams_and_keys_move_the_camera(server, tmp_path):
  shot = os.environ.get("APT2_SCREENSHOT", str(tmp_path / "demo_page.png"))
  with sync_api.sync_playwright() as p:
    browser = _browser(p)
    try:
      page = browser.new_page(viewport={"width": 900, "height": 640})
      errors = []
      page.on("pageerror", lambda e: errors.append(str(e)))
      page.goto(server.url, timeout=60_000)
      page.wait_for_function("window.demo && window.demo.hello !== null", timeout=60_000)
      assert page.locator("#examples img").count() >= 1
      page.click("#start")
      page.wait_for_function("window.demo.framesShown >= 5", timeout=120_000)
      assert page.locator("#camera").inner_text().startswith("camera:")
      # Hold W: the server acknowledges a forward camera motion, and frames keep coming.
      page.locator("header").click()  # focus away from the inputs
      page.keyboard.down("w")
      page.wait_for_function("document.getElementById('camera').textContent.includes('forward 0.125')",
                             timeout=30_000)
      shown = page.evaluate("window.demo.framesShown")
      page.wait_for_function(f"window.demo.framesShown >= {shown + 8}", timeout=120_000)
      page.keyboard.up("w")
      page.wait_for_function("document.getElementById('keysHeld').textContent === 'keys: none'",
                             timeout=30_000)
      assert "model:" in page.locator("#stats").inner_text()
      assert float(page.evaluate("window.demo.modelFps")) > 0
      page.keyboard.down("w")  # show the held key in the screenshot
      page.wait_for_timeout(1500)
      os.makedirs(os.path.dirname(os.path.abspath(shot)), exist_ok=True)
      page.screenshot(path=shot)
      assert os.path.getsize(shot) > 1000
      assert not errors, errors
    finally:
      browser.close()


def test_puppet_joints_follow_the_mouse():
  server = _server(120)  # pose: 4 frames x 15 keypoints x (x, y)
  try:
    with sync_api.sync_playwright() as p:
      browser = _browser(p)
      try:
        page = browser.new_page(viewport={"width": 900, "height": 640})
        page.goto(server.url, timeout=60_000)
        page.wait_for_function("window.demo && window.demo.hello !== null", timeout=60_000)
        assert page.evaluate("window.demo.hello.control_type") == "pose"
        page.click("#start")
        page.wait_for_function("window.demo.framesShown >= 5", timeout=120_000)
        box = page.locator("#overlay").bounding_box()
        x0, y0 = page.evaluate("window.demo.pose[4]")  # right wrist
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + 0.15 * box["height"], steps=5)
        page.mouse.up()
        page.wait_for_function("document.getElementById('camera').textContent.startsWith('pose:')",
                               timeout=30_000)
        wrist = page.evaluate("window.demo.pose[4]")
        assert abs(wrist[0] - 0.2) < 0.02 and abs(wrist[1] - 0.15) < 0.02
        shown = page.evaluate("window.demo.framesShown")
        page.wait_for_function(f"window.demo.framesShown >= {shown + 4}", timeout=120_000)
      finally:
        browser.close()
  finally:
    server.stop()
