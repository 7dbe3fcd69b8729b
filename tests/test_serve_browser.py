"""The chat page in headless Chromium: type a question, watch the answer stream in, side by side."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_support import ServerThread, train_tiny_run, variant_adapter

from medlora.serve.app import Limits, create_app
from medlora.serve.loader import build_engine

CHROMIUM = "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("browser")
    run = train_tiny_run(root, tiny_model_dir)
    second = variant_adapter(run, root / "second", seed=5)
    served = build_engine(str(tiny_model_dir), [str(run), str(second)], engine="transformers")
    with ServerThread(create_app(served, Limits(default_max_tokens=40))) as running:
        yield running


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_streams_answers_side_by_side(
    server: ServerThread, browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    wait = WebDriverWait(driver, 60)  # type: ignore[arg-type]
    driver.get(server.url + "/")  # type: ignore[attr-defined]
    from selenium.webdriver.support.ui import Select

    # Every served model is offered: two adapters and their base.
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model-left option")) == 3)
    assert driver.find_element(By.ID, "compare").is_selected()  # type: ignore[attr-defined]
    assert driver.find_element(By.ID, "model-left").get_attribute("value") == "run"  # type: ignore[attr-defined]
    right = Select(driver.find_element(By.ID, "model-right"))  # type: ignore[attr-defined]
    assert [o.get_attribute("value") for o in right.options][:2] == ["run", "second"]
    right.select_by_value("second")  # compare two adapters, not only adapter vs base

    # Record every text change of the left answer, so the test can tell streaming from one big write.
    driver.execute_script(  # type: ignore[attr-defined]
        "window.seen = []; new MutationObserver(() => window.seen.push(document.getElementById('answer-left')"
        ".textContent)).observe(document.getElementById('answer-left'), {childList: true, characterData: true,"
        " subtree: true});"
    )
    driver.find_element(By.ID, "question").send_keys("What are the symptoms of asthma?")  # type: ignore[attr-defined]
    driver.find_element(By.ID, "send").click()  # type: ignore[attr-defined]
    wait.until(
        lambda d: (
            d.find_element(By.ID, "pane-left").get_attribute("data-done") == "yes"
            and d.find_element(By.ID, "pane-right").get_attribute("data-done") == "yes"
        )
    )

    left = driver.find_element(By.ID, "answer-left").text  # type: ignore[attr-defined]
    right = driver.find_element(By.ID, "answer-right").text  # type: ignore[attr-defined]
    meta = driver.find_element(By.ID, "meta-left").text  # type: ignore[attr-defined]
    assert "error" not in meta and "first text after" in meta
    assert left.strip() and right.strip() and left != right  # the two adapters answered differently
    assert "not medical advice" in left and "not medical advice" in right
    seen = driver.execute_script("return window.seen")  # type: ignore[attr-defined]
    growing = [text for text in seen if text]
    assert len(set(growing)) >= 3  # the answer grew piece by piece
    shot = tmp_path / "chat-page.png"
    assert driver.save_screenshot(str(shot))  # type: ignore[attr-defined]
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000
    keep = os.environ.get("MEDLORA_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
