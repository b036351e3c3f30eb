import base64
import io
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from alnet.infer.predict import load_predictor, predict_files
from alnet.infer.serve import create_app

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def client(mini_checkpoint):
    return TestClient(create_app(mini_checkpoint))


@pytest.fixture(scope="module")
def cell(mini_root) -> Path:
    return sorted((mini_root / "C-NMC_Leukemia" / "training_data" / "fold_0" / "hem").iterdir())[0]


def test_predict_returns_the_label_and_probability_the_cli_gives(client, cell, mini_checkpoint):
    response = client.post("/predict", files={"file": (cell.name, cell.read_bytes(), "image/bmp")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] in ("ALL", "HEM") and body["model"] == "alnet" and "gradcam_png" not in body
    rows, _ = predict_files(load_predictor(mini_checkpoint), [cell])
    assert body["probability_all"] == pytest.approx(float(rows[0]["probability_all"]), abs=1e-5)
    assert body["label"] == rows[0]["label"]


def test_gradcam_comes_back_as_a_png(client, cell):
    response = client.post("/predict?gradcam=true", files={"file": (cell.name, cell.read_bytes(), "image/bmp")})
    png = Image.open(io.BytesIO(base64.b64decode(response.json()["gradcam_png"])))
    assert png.format == "PNG" and png.size == (136, 136)


def test_bad_uploads_get_a_clear_4xx_json_error(mini_checkpoint, cell, client):
    garbage = client.post("/predict", files={"file": ("cell.bmp", b"\x00\x01not an image", "image/bmp")})
    assert garbage.status_code == 400 and "cannot decode" in garbage.json()["error"]
    wrong_type = client.post("/predict", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert wrong_type.status_code == 415 and "not an image type" in wrong_type.json()["error"]
    missing = client.post("/predict", data={"other": "x"})
    assert missing.status_code == 422 and "file" in missing.json()["error"]
    small = TestClient(create_app(mini_checkpoint, max_bytes=1000))
    oversize = small.post("/predict", files={"file": (cell.name, cell.read_bytes(), "image/bmp")})
    assert oversize.status_code == 413 and "larger than" in oversize.json()["error"]


def test_health_page_and_openapi_docs(client):
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(mini_checkpoint):
    """The real thing: uvicorn on a loopback port, in a thread."""
    port = _free_port()
    instance = uvicorn.Server(uvicorn.Config(create_app(mini_checkpoint), host="127.0.0.1", port=port,
                                             log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started and time.time() < deadline:
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


def test_many_concurrent_requests_all_get_the_same_answer(server, cell):
    data = cell.read_bytes()

    def post(_):
        return httpx.post(f"{server}/predict", files={"file": (cell.name, data, "image/bmp")}, timeout=60)

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(post, range(24)))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.json()["probability_all"] for r in responses}) == 1


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_the_page_classifies_a_real_cell_end_to_end_in_a_browser(server, cell):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(server + "/")
        browser.find_element(By.ID, "file").send_keys(str(cell))
        WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.ID, "label").text in ("ALL", "HEM") or b.find_element(By.ID, "error").text)
        assert browser.find_element(By.ID, "error").text == ""
        label = browser.find_element(By.ID, "label").text
        probability = float(browser.find_element(By.ID, "probability").text.split("=")[1])
        WebDriverWait(browser, 30).until(EC.visibility_of_element_located((By.ID, "gradcam")))
        assert browser.execute_script("return document.getElementById('gradcam').naturalWidth") == 136
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "serve_page.png"))
    finally:
        browser.quit()
    expected = httpx.post(f"{server}/predict", files={"file": (cell.name, cell.read_bytes(), "image/bmp")}).json()
    assert label == expected["label"] and probability == pytest.approx(expected["probability_all"], abs=1e-3)
