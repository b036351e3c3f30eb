import base64
import io
import json
import shutil
import socket
import struct
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import predict_rows
from fastapi.testclient import TestClient
from PIL import Image

import alnet.infer.serve as serve
import alnet.infer.uploads as uploads
from alnet.infer.predict import load_pipeline
from alnet.infer.serve import MAX_BYTES, create_app

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def client(mini_checkpoint):
    return TestClient(create_app(mini_checkpoint))


@pytest.fixture(scope="module")
def cell(mini_root) -> Path:
    return sorted((mini_root / "C-NMC_Leukemia" / "training_data" / "fold_0" / "hem").iterdir())[0]


def test_predict_returns_the_call_and_probability_the_cli_gives(client, cell, mini_checkpoint):
    response = client.post("/predict", files={"file": (cell.name, cell.read_bytes(), "image/bmp")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predicted"] in ("ALL", "HEM") and body["model"] == "alnet" and "gradcam_png" not in body
    rows, _ = predict_rows(load_pipeline(mini_checkpoint), [cell])
    assert body["probability_all"] == pytest.approx(float(rows[0]["probability_all"]), abs=1e-5)
    assert body["predicted"] == rows[0]["predicted"] and "label" not in body  # `label` is a true class


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
    two = client.post("/predict", files=[("file", ("a.bmp", cell.read_bytes(), "image/bmp")),
                                         ("file", ("b.bmp", cell.read_bytes(), "image/bmp"))])
    assert two.status_code in (400, 422) and "file" in two.json()["error"]
    small = TestClient(create_app(mini_checkpoint, max_bytes=1000))
    oversize = small.post("/predict", files={"file": (cell.name, cell.read_bytes(), "image/bmp")})
    assert oversize.status_code == 413 and "larger than" in oversize.json()["error"]


def test_health_page_and_openapi_docs(client):
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text
    assert f"file.size > {MAX_BYTES}" in page.text  # the page refuses an oversized file before uploading it
    openapi = client.get("/openapi.json").json()
    predict = openapi["paths"]["/predict"]["post"]
    upload = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in upload:
        upload = openapi["components"]["schemas"][upload["$ref"].rsplit("/", 1)[1]]
    assert upload["required"] == ["file"] and "file" in upload["properties"]
    assert [p["name"] for p in predict["parameters"]] == ["gradcam"]
    assert client.get("/docs").status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serve(app):
    """The real thing: uvicorn on a loopback port, in a thread, with the settings `alnet serve` gives it."""
    port = _free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **serve.uvicorn_settings()))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started and time.time() < deadline:
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(mini_checkpoint):
    with _serve(create_app(mini_checkpoint)) as url:
        yield url


def test_many_concurrent_requests_all_get_the_same_answer(server, cell):
    data = cell.read_bytes()

    def post(_):
        return httpx.post(f"{server}/predict", files={"file": (cell.name, data, "image/bmp")}, timeout=60)

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(post, range(24)))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.json()["probability_all"] for r in responses}) == 1


def test_decoding_runs_at_most_two_images_at_a_time(server, cell, monkeypatch):
    in_flight, most, guard = 0, 0, threading.Lock()
    real_load_image = uploads.load_image

    def slow_load_image(*args, **kwargs):
        nonlocal in_flight, most
        with guard:
            in_flight += 1
            most = max(most, in_flight)
        try:
            time.sleep(0.3)
            return real_load_image(*args, **kwargs)
        finally:
            with guard:
                in_flight -= 1

    monkeypatch.setattr(uploads, "load_image", slow_load_image)
    data = cell.read_bytes()

    def post(_):
        return httpx.post(f"{server}/predict", files={"file": (cell.name, data, "image/bmp")}, timeout=60)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(post, range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    assert most == 2  # two at a time: concurrent requests never hold more decoded pictures than that


class _CountingBody:
    """ASGI middleware: how many body bytes the app asked the server for."""

    def __init__(self, app):
        self.app, self.received = app, 0

    async def __call__(self, scope, receive, send):
        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


def test_a_streamed_upload_over_the_cap_is_refused_while_reading_and_never_spooled_to_disk(mini_checkpoint,
                                                                                       monkeypatch):
    spooled = []
    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        real = getattr(tempfile, name)
        monkeypatch.setattr(tempfile, name, lambda *a, _name=name, _real=real, **k: spooled.append(_name) or
                            _real(*a, **k))
    boundary = "alnet-test-boundary"
    total = 50 * 2**20

    def body():  # no Content-Length: httpx sends it chunked, so only counting while reading can stop it
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"huge.bmp\"\r\n"
               "Content-Type: image/bmp\r\n\r\n").encode()
        chunk = b"\0" * 2**20
        for _ in range(total // len(chunk)):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    app = _CountingBody(create_app(mini_checkpoint))
    with _serve(app) as url:
        response = httpx.post(f"{url}/predict", content=body(), timeout=60,
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and "larger than" in response.json()["error"]
    assert spooled == []
    assert app.received <= MAX_BYTES + 2**20  # the cap, the multipart allowance and one network read; not 50 MB


def test_a_declared_content_length_over_the_cap_is_refused_before_the_body_is_sent(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Length: {100 * 2**20}\r\n"
                           "Content-Type: multipart/form-data; boundary=x\r\n\r\n".encode())
        answer = b""
        while chunk := connection.recv(65536):  # the server answers and closes without waiting for 100 MiB
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert "larger than 10 MiB" in json.loads(payload)["error"]


def test_a_file_at_the_cap_passes_and_one_byte_more_is_refused(mini_checkpoint, cell):
    buffer = io.BytesIO()
    Image.open(cell).save(buffer, format="PNG")  # a real cell, so that the input gate lets it through
    png = buffer.getvalue()
    exact = TestClient(create_app(mini_checkpoint, max_bytes=len(png)))
    # the multipart body is larger than the file: boundaries and part headers must not count against it
    assert exact.post("/predict", files={"file": ("cell.png", png, "image/png")}).status_code == 200
    short = TestClient(create_app(mini_checkpoint, max_bytes=len(png) - 1))
    refused = short.post("/predict", files={"file": ("cell.png", png, "image/png")})
    assert refused.status_code == 413 and "cell.png" in refused.json()["error"]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width×height pixels and holds almost nothing: only its header can be read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_a_picture_far_larger_than_a_cell_is_refused_from_its_header_without_decoding(client, monkeypatch):
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000), 1).save(buffer, format="PNG")  # 64 million pixels in a few kilobytes
    assert len(buffer.getvalue()) < MAX_BYTES
    decoded = []
    monkeypatch.setattr(uploads, "load_image", lambda *a, **k: decoded.append(a))
    response = client.post("/predict", files={"file": ("big.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert "big.png" in error and "8000x8000" in error and "16,000,000" in error
    bomb = client.post("/predict", files={"file": ("bomb.png", _png_header(100_000, 100_000), "image/png")})
    assert bomb.status_code == 413 and "16,000,000" in bomb.json()["error"]
    assert decoded == []


def test_unknown_paths_and_wrong_methods_answer_with_a_json_error(client):
    missing = client.get("/no-such-page")
    assert missing.status_code == 404 and "/no-such-page" in missing.json()["error"]
    wrong_method = client.get("/predict")
    assert wrong_method.status_code == 405 and "POST" in wrong_method.json()["error"]
    assert "POST" in wrong_method.headers["allow"]


def test_a_bad_query_value_is_named_in_the_error_and_a_missing_file_keeps_its_message(client, cell):
    response = client.post("/predict?gradcam=maybe", files={"file": (cell.name, cell.read_bytes(), "image/bmp")})
    assert response.status_code == 422
    error = response.json()["error"]
    assert "gradcam" in error and "true or false" in error and "multipart" not in error
    missing = client.post("/predict", data={"other": "x"})
    assert missing.status_code == 422 and missing.json()["error"] == "send the image as multipart form field `file`"


def test_a_gif_is_refused_whatever_content_type_it_declares(client):
    buffer = io.BytesIO()
    Image.new("RGB", (450, 450), (200, 100, 50)).save(buffer, format="GIF")
    for declared in ("application/octet-stream", "image/gif"):
        response = client.post("/predict", files={"file": ("cell.gif", buffer.getvalue(), declared)})
        assert response.status_code == 415, (declared, response.text)
        assert "cell.gif" in response.json()["error"]


def test_port_in_use_tells_a_taken_port_from_a_free_one(server):
    from alnet.infer.serve import port_in_use

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)
    host, server_port = server.removeprefix("http://").split(":")
    assert port_in_use(host, int(server_port))  # alnet's own server, as a second `alnet serve` would see it


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
    assert label == expected["predicted"] and probability == pytest.approx(expected["probability_all"], abs=1e-3)


def test_names_from_the_model_file_are_shown_as_text_never_as_markup(mini_checkpoint, tmp_path):
    hostile = tmp_path / "<img src=x onerror=alert(1)>.ckpt"
    shutil.copy(mini_checkpoint, hostile)
    page = TestClient(create_app(hostile)).get("/").text
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;.ckpt" in page


def test_any_spelling_of_an_image_type_is_accepted_and_the_decoded_format_decides(client, cell):
    for declared in ("IMAGE/BMP", "image/bmp; charset=binary", "image/x-bmp", "binary/octet-stream"):
        response = client.post("/predict", files={"file": (cell.name, cell.read_bytes(), declared)})
        assert response.status_code == 200, (declared, response.text)
    refused = client.post("/predict", files={"file": ("cell.bmp", cell.read_bytes(), "text/plain")})
    assert refused.status_code == 415 and "text/plain is not an image type" in refused.json()["error"]


def test_concurrent_requests_share_forward_passes_and_get_the_answers_of_one_at_a_time(mini_checkpoint, mini_root):
    cells = sorted((mini_root / "C-NMC_Leukemia" / "training_data").rglob("*.png"))[:12]
    expected = {}
    with _serve(create_app(mini_checkpoint, max_batch=1)) as url:
        for path in cells:
            r = httpx.post(f"{url}/predict", files={"file": (path.name, path.read_bytes(), "image/png")}, timeout=60)
            expected[path.name] = r.json()["probability_all"]
    app = create_app(mini_checkpoint, max_batch=8, max_wait_ms=50)
    with _serve(app) as url:
        def post(path):
            return httpx.post(f"{url}/predict", files={"file": (path.name, path.read_bytes(), "image/png")},
                              timeout=60)

        with ThreadPoolExecutor(max_workers=12) as pool:
            responses = list(pool.map(post, cells))
    assert [r.status_code for r in responses] == [200] * len(cells)
    for path, response in zip(cells, responses):  # batching never mixes up whose answer is whose
        assert response.json()["probability_all"] == pytest.approx(expected[path.name], abs=1e-4)
    sizes = app.state.batcher.batch_sizes
    assert max(sizes) > 1 and max(sizes) <= 8 and sum(n * k for n, k in sizes.items()) == len(cells)


def test_a_failed_forward_pass_answers_every_request_of_its_batch_with_a_json_500(mini_checkpoint, cell,
                                                                                monkeypatch):
    real = serve.load_pipeline

    def broken_pipeline(path, **gate):
        pipeline = real(path, **gate)

        def fail(batch):
            time.sleep(0.05)
            raise RuntimeError("simulated out of memory")

        pipeline.network = fail  # the forward pass the service batches
        return pipeline

    monkeypatch.setattr(serve, "load_pipeline", broken_pipeline)
    with _serve(create_app(mini_checkpoint, max_batch=4)) as url:
        def post(_):
            return httpx.post(f"{url}/predict", files={"file": (cell.name, cell.read_bytes(), "image/bmp")},
                              timeout=60)

        with ThreadPoolExecutor(max_workers=6) as pool:
            responses = list(pool.map(post, range(6)))
        assert httpx.get(f"{url}/health").json()["status"] == "ok", "the service lives on"
    assert [r.status_code for r in responses] == [500] * 6
    assert all("the model failed" in r.json()["error"] for r in responses)


def _slow_decoding(monkeypatch, seconds: float):
    real_load_image = uploads.load_image

    def slow_load_image(*args, **kwargs):
        time.sleep(seconds)
        return real_load_image(*args, **kwargs)

    monkeypatch.setattr(uploads, "load_image", slow_load_image)


def test_requests_past_the_waiting_limit_are_refused_with_a_json_503(server, cell, monkeypatch):
    _slow_decoding(monkeypatch, 0.5)
    monkeypatch.setattr(serve, "REQUESTS_IN_FLIGHT", 2)
    data = cell.read_bytes()

    def post(_):
        return httpx.post(f"{server}/predict", files={"file": (cell.name, data, "image/bmp")}, timeout=60)

    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(post, range(6)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and set(codes) <= {200, 503} and 503 in codes
    assert all("too many requests waiting" in r.json()["error"] for r in responses if r.status_code == 503)


def test_a_request_not_classified_in_time_gets_a_json_503(server, cell, monkeypatch):
    _slow_decoding(monkeypatch, 1.0)
    monkeypatch.setattr(serve, "ANSWER_SECONDS", 0.2)
    response = httpx.post(f"{server}/predict", files={"file": (cell.name, cell.read_bytes(), "image/bmp")},
                          timeout=60)
    assert response.status_code == 503 and "not classified within" in response.json()["error"]


def test_upload_limits_judge_a_picture_from_its_header_before_decoding_it():
    from fastapi import HTTPException
    from PIL import Image

    from alnet.data.transforms import Preprocessing

    def encoded(size, kind):
        buffer = io.BytesIO()
        Image.new("RGB", size, (90, 40, 120)).save(buffer, format=kind)
        return buffer.getvalue()

    limits = uploads.UploadLimits(max_bytes=10_000, max_pixels=100)
    for data, status in ((encoded((8, 8), "GIF"), 415), (encoded((20, 20), "PNG"), 413), (b"not an image", 400)):
        with pytest.raises(HTTPException) as refused:
            limits.decode("x.img", data, Preprocessing(size=136))
        assert refused.value.status_code == status and refused.value.detail.startswith("x.img: ")
    assert limits.decode("x.png", encoded((8, 8), "PNG"), Preprocessing(size=136)).shape == (136, 136, 3)


def test_idle_half_sent_requests_are_closed_and_never_keep_the_service_from_others(server, cell, monkeypatch):
    import socket

    monkeypatch.setattr(serve, "HEADER_SECONDS", 0.5)  # read when a connection is made: the running server sees it
    host, port = server.removeprefix("http://").split(":")
    idle = []
    for _ in range(serve._connection_limit() + 20):  # more than the service keeps open
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # and never the rest of the headers
        idle.append(sock)
    answered = httpx.post(f"{server}/predict", files={"file": (cell.name, cell.read_bytes(), "image/bmp")},
                          timeout=30)
    time.sleep(1.5)
    closed = 0
    for sock in idle:
        sock.settimeout(5)
        try:
            closed += sock.recv(1) == b""
        except OSError:
            closed += 1
        sock.close()
    assert answered.status_code == 200, answered.text  # idle ones made room for it
    assert closed == len(idle)  # and the service let go of every one of them
