"""The web page of `imagegen serve`, driven in headless Chromium (selenium + Debian's chromium-driver) against
a real `imagegen serve --model flux2-demo` process: generate, progress, gallery, details, reuse, API key, errors,
and no request leaving 127.0.0.1.

Without chromium these tests skip, except in CI (CI=true), where a missing browser is a failure.
IMAGEGEN_WEB_SCREENSHOT=docs/images/serve-page.png makes the two-image test save the docs' screenshot.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from imagegen.image import METADATA_KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)
MODEL = "flux2-demo"
WAIT = 120  # seconds for one generation of the demo model on a slow CPU runner


def _need_browser() -> None:
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not found]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the test extra)")
    if missing:
        message = f"browser tests need {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


# ---- a real `imagegen serve` process and a real browser ------------------------------------
@contextmanager
def imagegen_serve(*options: str, hub_cache: Path) -> Iterator[str]:
    """`imagegen serve --model flux2-demo` on a free loopback port, with an empty Hugging Face cache (so only
    the bundled demo has weights); yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagegen", "serve", "--port", str(port), "--model", MODEL, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_CACHE": str(hub_cache)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    _need_browser()
    with imagegen_serve(hub_cache=tmp_path_factory.mktemp("hub")) as url:
        yield url


@pytest.fixture
def browser(tmp_path) -> Iterator[object]:
    """Headless Chromium with a fresh profile; after the test, every request it made must have stayed on
    127.0.0.1 (from the DevTools network log)."""
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
        outside = [url for url in requested_urls(driver) if leaves_the_machine(url)]
        assert not outside, f"the browser requested {outside}"
    finally:
        driver.quit()


def leaves_the_machine(url: str) -> bool:
    """Network URLs to anywhere but 127.0.0.1 (chrome://, data: and blob: never touch the network)."""
    parts = urlsplit(url)
    return parts.scheme not in ("chrome", "data", "blob", "about") and parts.hostname != "127.0.0.1"


def requested_urls(driver) -> list[str]:
    """URLs of every request the browser sent since the last call (DevTools Network.requestWillBeSent)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


# ---- page helpers -----------------------------------------------------------------------------
def open_page(driver, url: str) -> None:
    """Load the page and record every text #progress shows (window.seen) and every preview (window.previews)."""
    driver.get(url + "/")
    driver.execute_script("""
        window.seen = []; window.previews = 0;
        const progress = document.getElementById('progress');
        new MutationObserver(() => seen.push(progress.textContent))
            .observe(progress, {childList: true, characterData: true, subtree: true});
        new MutationObserver(() => previews++).observe(document.getElementById('preview'),
            {attributes: true, attributeFilter: ['src']});
    """)
    wait_for(driver, lambda d: d.find_elements("css selector", f"select[name=model] option[value='{MODEL}']"))


def wait_for(driver, condition, timeout: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def field(driver, name: str):
    return driver.find_element("css selector", f"[name={name}]")


def fill(driver, name: str, value: str) -> None:
    element = field(driver, name)
    element.clear()
    element.send_keys(value)


def generate_button(driver):
    return driver.find_element("xpath", "//button[normalize-space()='Generate']")


def generate(driver, prompt: str, expect: int, **fields: str) -> None:
    """Type the prompt (and any other fields), click Generate, wait until the gallery holds `expect` images."""
    from selenium.webdriver.support.ui import Select

    Select(field(driver, "model")).select_by_value(fields.pop("model", MODEL))
    fill(driver, "prompt", prompt)
    for name, value in fields.items():
        fill(driver, name, value)
    wait_for(driver, lambda d: generate_button(d).is_enabled())
    generate_button(driver).click()
    wait_for(driver, lambda d: len(gallery(d)) >= expect or d.find_element("id", "error").is_displayed())
    assert not driver.find_element("id", "error").is_displayed(), driver.find_element("id", "error").text
    assert len(gallery(driver)) == expect


def gallery(driver) -> list:
    return driver.find_elements("css selector", "#gallery img")


def natural_size(driver, img) -> tuple[int, int]:
    wait_for(driver, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
    return tuple(driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img))


def blob_bytes(driver, url: str) -> bytes:
    """The bytes behind a blob: URL of the page (what its download link saves)."""
    b64 = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then(r => r.blob()).then(b => {
            const reader = new FileReader();
            reader.onload = () => done(reader.result.split(',')[1]);
            reader.readAsDataURL(b);
        });
    """,
        url,
    )
    return base64.b64decode(b64)


def png_metadata(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as image:
        return json.loads(image.text[METADATA_KEY])


# ---- the tests ----------------------------------------------------------------------------------
def test_generate_shows_progress_a_gallery_newest_first_and_stays_local(server, browser):
    open_page(browser, server)
    assert field(browser, "prompt").tag_name == "textarea" and field(browser, "model").tag_name == "select"
    generate(browser, "a red circle on a blue background", 1, seed="5", steps="4")
    first = gallery(browser)[0]
    assert natural_size(browser, first) == (128, 128)  # the demo model's default size
    seen = browser.execute_script("return window.seen")
    assert any(text.startswith("Queued") for text in seen), seen
    assert [t for t in seen if t.startswith("Step")] == ["Step 1 of 4", "Step 2 of 4", "Step 3 of 4", "Step 4 of 4"]
    assert browser.execute_script("return window.previews") >= 1  # latents previews during the steps
    urls = requested_urls(browser)  # (the browser fixture checks that none of them left 127.0.0.1)
    assert f"{server}/" in urls and f"{server}/v1/images/generations" in urls, urls
    assert leaves_the_machine("https://fonts.example.com/x.woff2") and leaves_the_machine("http://localhost:1/")

    generate(browser, "a green square on a yellow background", 2, seed="6", width="128", height="96", steps="2")
    newest, older = gallery(browser)
    assert newest.get_attribute("data-seed") == "6" and older.get_attribute("data-seed") == "5"
    assert natural_size(browser, newest) == (128, 96)
    assert "a green square" in newest.get_attribute("alt")
    if os.environ.get("IMAGEGEN_WEB_SCREENSHOT"):
        browser.save_screenshot(os.environ["IMAGEGEN_WEB_SCREENSHOT"])


def test_details_reuse_settings_and_download(server, browser):
    open_page(browser, server)
    generate(browser, "a blue triangle on a white background", 1, seed="11", steps="2", width="160", height="96")
    for name in ("prompt", "seed", "steps", "width", "height"):  # the form moves on; the image keeps its settings
        fill(browser, name, "something else" if name == "prompt" else "")
    gallery(browser)[0].click()
    dialog = browser.find_element("id", "details")
    wait_for(browser, lambda d: dialog.is_displayed())
    shown = {dd.get_attribute("data-field"): dd.text for dd in dialog.find_elements("css selector", "dd")}
    assert shown["prompt"] == "a blue triangle on a white background" and shown["seed"] == "11"
    assert shown["model"] == MODEL and shown["steps"] == "2" and shown["size"] == "160x96"
    assert shown["time"].endswith("s)")

    download = browser.find_element("id", "download")
    assert download.get_attribute("download").endswith(".png")
    saved = blob_bytes(browser, download.get_attribute("href"))
    metadata = png_metadata(saved)  # the PNG keeps what `imagegen run --from` needs
    assert metadata["seed"] == 11 and metadata["steps"] == 2 and metadata["model"] == MODEL

    browser.find_element("xpath", "//button[normalize-space()='Use these settings']").click()
    wait_for(browser, lambda d: not dialog.is_displayed())
    values = {
        name: field(browser, name).get_attribute("value")
        for name in ("prompt", "seed", "steps", "width", "height", "model")
    }
    assert values == {
        "prompt": "a blue triangle on a white background",
        "seed": "11",
        "steps": "2",
        "width": "160",
        "height": "96",
        "model": MODEL,
    }
    generate_button(browser).click()  # the same settings make the same image
    wait_for(browser, lambda d: len(gallery(d)) == 2)
    again = blob_bytes(browser, gallery(browser)[0].get_attribute("src"))
    assert Image.open(io.BytesIO(again)).tobytes() == Image.open(io.BytesIO(saved)).tobytes()


def test_a_model_without_reference_editing_hides_the_reference_field(server, browser):
    open_page(browser, server)  # the demo was trained without reference images: it repaints init images only
    assert not browser.find_element("id", "reference-field").is_displayed()
    assert browser.find_element("id", "init-field").is_displayed()


def test_a_bad_request_shows_the_servers_message(server, browser):
    open_page(browser, server)
    fill(browser, "prompt", "a circle")
    fill(browser, "width", "100")
    generate_button(browser).click()
    error = browser.find_element("id", "error")
    wait_for(browser, lambda d: error.is_displayed())
    assert "width must be a positive multiple of 16, got 100" in error.text
    assert gallery(browser) == []
    wait_for(browser, lambda d: generate_button(d).is_enabled())  # ready for the next try


def test_the_form_follows_the_model_and_a_missing_model_is_explained(server, browser):
    from selenium.webdriver.support.ui import Select

    open_page(browser, server)
    shown = lambda id: browser.find_element("id", id).is_displayed()  # noqa: E731
    assert not shown("guidance-field") and not shown("negative-field") and not shown("reference-field")
    missing = browser.find_element("css selector", "select[name=model] optgroup")  # listed apart: no weights here
    assert "imagegen pull" in missing.get_attribute("label")
    assert missing.find_elements("css selector", "option[value='flux2-klein-base-4b']")
    assert not missing.find_elements("css selector", f"option[value='{MODEL}']")
    Select(field(browser, "model")).select_by_value("flux2-klein-base-4b")  # CFG: guidance and a negative prompt
    assert shown("guidance-field") and shown("negative-field")
    assert field(browser, "guidance").get_attribute("placeholder") == "4"
    assert field(browser, "steps").get_attribute("placeholder") == "50"
    assert (field(browser, "width").get_attribute("value"), field(browser, "height").get_attribute("value")) == (
        "1024",
        "1024",
    )
    presets = [o.text for o in Select(browser.find_element("id", "size-preset")).options]
    assert "1024 × 1024" in presets and "1184 × 880" in presets  # 4:3 at the model's pixel count, multiples of 16

    fill(browser, "prompt", "a lighthouse")
    fill(browser, "negative_prompt", "blurry")
    generate_button(browser).click()  # no weights in this test's cache: the stream ends with an error event
    error = browser.find_element("id", "error")
    wait_for(browser, lambda d: error.is_displayed())
    assert "No weights for 'flux2-klein-base-4b'" in error.text and "imagegen pull" in error.text
    Select(field(browser, "model")).select_by_value("zimage")  # a family's own options, from its declarations
    assert shown("model-options")
    truncation = field(browser, "'options.cfg_truncation'")
    assert (truncation.get_attribute("min"), truncation.get_attribute("max")) == ("0", "1")
    assert "normalized time" in truncation.get_attribute("title")
    fill(browser, "'options.cfg_truncation'", "2")
    generate_button(browser).click()  # the value reaches the server, which checks it like the CLI does
    wait_for(browser, lambda d: "cfg_truncation" in error.text)
    assert "within [0, 1], got 2" in error.text
    Select(field(browser, "model")).select_by_value(MODEL)
    assert not shown("guidance-field") and not shown("negative-field")
    assert not browser.find_elements("css selector", "[name='options.cfg_truncation']")  # zimage's own are gone


def test_stop_cancels_a_run(server, browser):
    open_page(browser, server)
    fill(browser, "prompt", "a slow circle")
    fill(browser, "steps", "60")
    generate_button(browser).click()
    wait_for(browser, lambda d: d.find_element("id", "progress").text.startswith("Step"))
    browser.find_element("xpath", "//button[normalize-space()='Stop']").click()
    wait_for(browser, lambda d: generate_button(d).is_enabled())
    assert not browser.find_element("id", "run").is_displayed() and gallery(browser) == []
    assert not browser.find_element("id", "error").is_displayed()
    deadline = time.time() + 30  # the server stops the run at its next step, long before step 60
    while httpx.get(f"{server}/health").json()["queue"]["running"]:
        assert time.time() < deadline
        time.sleep(0.2)


def test_api_key_is_asked_for_and_kept_for_the_tab(browser, tmp_path):
    with imagegen_serve("--api-key", "s3cret", hub_cache=tmp_path) as url:
        browser.get(url + "/")  # the page itself loads without the key
        key = browser.find_element("name", "api_key")
        wait_for(browser, lambda d: key.is_displayed())
        assert not generate_button(browser).is_enabled()  # nothing runs without the key
        key.send_keys("wrong")
        browser.find_element("xpath", "//button[normalize-space()='Use key']").click()
        wait_for(browser, lambda d: "refused" in d.find_element("id", "error").text)
        assert not generate_button(browser).is_enabled()

        key.send_keys("s3cret")
        browser.find_element("xpath", "//button[normalize-space()='Use key']").click()
        wait_for(browser, lambda d: not key.is_displayed())
        generate(browser, "a key-protected circle", 1, seed="1", steps="2")

        browser.refresh()  # same tab: the key is remembered
        wait_for(browser, lambda d: d.find_elements("css selector", f"select[name=model] option[value='{MODEL}']"))
        assert not browser.find_element("name", "api_key").is_displayed()
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the API itself stays closed


def test_init_image_with_strength_and_a_painted_mask(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    start = tmp_path / "start.png"
    Image.new("RGB", (96, 64), (30, 60, 200)).save(start)
    open_page(browser, server)
    assert browser.find_element("id", "init-field").is_displayed()  # the demo model repaints init images
    browser.find_element("id", "init-image").send_keys(str(start))
    canvas = browser.find_element("id", "mask")
    wait_for(browser, lambda d: canvas.is_displayed() and canvas.get_attribute("width") == "96")
    fill(browser, "strength", "0.6")
    ActionChains(browser).move_to_element(canvas).click_and_hold().move_by_offset(30, 0).release().perform()
    mask = base64.b64decode(
        browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        maskBlob().then(b => { const r = new FileReader(); r.onload = () => done(r.result.split(',')[1]);
                               r.readAsDataURL(b); });""")
    )
    with Image.open(io.BytesIO(mask)) as image:  # OpenAI's convention: transparent where painted
        alpha = image.getchannel("A")
        assert image.size == (96, 64) and alpha.getpixel((48, 32)) == 0 and alpha.getpixel((2, 2)) == 255

    generate(browser, "a red circle", 1, seed="4", steps="4")
    assert natural_size(browser, gallery(browser)[0]) == (96, 64)  # the init image's size
    metadata = png_metadata(blob_bytes(browser, gallery(browser)[0].get_attribute("src")))
    assert metadata["init_image"] == "start.png" and metadata["mask"] == "mask.png" and metadata["strength"] == 0.6


def test_lora_picker_sends_adapters_of_the_lora_dir(browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    from imagegen.testing import random_lora, save_adapter

    shapes = {"transformer_blocks.0.attn.to_q": (192, 192), "single_transformer_blocks.0.attn.to_out": (192, 768)}
    (tmp_path / "loras").mkdir()
    save_adapter(tmp_path / "loras" / "style.safetensors", random_lora(shapes, 4, 1, 0.5, prefix="transformer."))
    with imagegen_serve("--lora-dir", str(tmp_path / "loras"), hub_cache=tmp_path) as url:
        open_page(browser, url)
        wait_for(browser, lambda d: d.find_element("id", "lora-field").is_displayed())
        Select(browser.find_element("id", "lora-pick")).select_by_value("style.safetensors")
        scale = browser.find_element("id", "lora-scale")
        scale.clear()
        scale.send_keys("0.8")
        browser.find_element("xpath", "//button[normalize-space()='Add']").click()
        assert [li.text.split("\n")[0] for li in browser.find_elements("css selector", "#loras li")] == [
            "style.safetensors"
        ]
        generate(browser, "a red circle", 1, seed="3", steps="2")
        metadata = png_metadata(blob_bytes(browser, gallery(browser)[0].get_attribute("src")))
        assert [(lora["name"], lora["scale"]) for lora in metadata["loras"]] == [("style.safetensors", 0.8)]

        browser.find_element("css selector", "#loras li button").click()  # removed: the next image has none
        assert browser.find_elements("css selector", "#loras li") == []
        gallery(browser)[0].click()
        browser.find_element("xpath", "//button[normalize-space()='Use these settings']").click()
        assert field(browser, "lora_scale").get_attribute("value") == "0.8"  # reuse brings the adapter back
