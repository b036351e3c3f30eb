"""`alnet serve`: an HTTP API and a one-page web app around a trained checkpoint (FastAPI + uvicorn).

    GET  /          a page: drop a cell image, see the label, P(ALL) and a Grad-CAM overlay
    POST /predict   multipart field `file` → {"label", "probability_all" (calibrated), "probability_raw", "status"
                    (ok | review), "reason", "model", "checkpoint"[, "gradcam_png"]}; a picture the input gate
                    refuses → 422 {"error", "reason", "status": "rejected"}
    GET  /health    {"status": "ok", "model", "checkpoint"}
    GET  /docs      OpenAPI documentation

Uploads are capped while they arrive and never written to disk: a `Content-Length` over the cap is refused
before the body is read, a body is counted as it streams in and refused as soon as it passes the cap (plus a
small allowance for the multipart framing), and the multipart body is parsed in memory. The picture is then
checked from its header alone: its decoded format must be BMP, PNG, JPEG, TIFF or WebP (whatever type the
client declared) and it must have at most `MAX_PIXELS` pixels; at most `DECODES_IN_FLIGHT` pictures are
decoded at once (a pool of that many threads) and at most `REQUESTS_IN_FLIGHT` received uploads wait for
decoding or the model. Decoded cells are classified by dynamic micro-batching (`batcher.MicroBatcher`):
requests that arrive while others are being decoded or classified share one forward pass of up to `max_batch`
images, waiting at most `max_wait_ms` for each other; a lone request is never held back. Every refusal, unknown
paths and wrong methods included, is a 4xx JSON body {"error": "..."}; a failed forward pass is a 500 JSON body
for every request of its batch. `port_in_use` lets the command check its port before announcing it.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import html
import io
import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from ..data.transforms import load_image
from ..labels import name_of
from ..trust.gate import ImageCheck
from ..trust.screen import REJECTED
from .batcher import BatcherClosed, MicroBatcher
from .predict import load_predictor

MAX_BYTES = 10 * 2**20  # the largest image file accepted
MULTIPART_ALLOWANCE = 64 * 2**10  # boundaries, part headers and small fields around the file, beyond MAX_BYTES
MAX_PIXELS = 16_000_000  # C-NMC cells are 450×450 or 600×600; a picture this large is not one cell
DECODES_IN_FLIGHT = 2  # decoded pictures held at once, whatever the number of concurrent requests
# Declared types: any image/* (clients spell them many ways), or no specific type; the decoded format decides.
OPAQUE_TYPES = {"application/octet-stream", "binary/octet-stream"}
BODIES_IN_FLIGHT = 16  # upload bodies held in memory at once: bounds what slow or stalled clients can hold
BODY_SECONDS = 60  # an upload must arrive within this time
REQUESTS_IN_FLIGHT = 64  # received uploads waiting for decoding or the model: bounds what a flood can queue
ANSWER_SECONDS = 60  # a received upload must be classified within this time
MAX_BATCH = 16  # images per forward pass: past ~16 a CPU gains little speed and each answer waits longer
MAX_WAIT_MS = 5.0  # how long a forming batch waits for requests still being decoded
IMAGE_FORMATS = {"BMP", "PNG", "JPEG", "MPO", "TIFF", "WEBP"}  # Pillow's names; MPO: a camera JPEG with extras
KINDS = "BMP, PNG, JPEG, TIFF or WebP"
MISSING_FILE = "send the image as multipart form field `file`"
CLOSE = {"Connection": "close"}  # a refusal before the body was read: do not read (and discard) the rest

PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1"><title>alnet — cell classifier</title>
<style>body{font-family:system-ui,sans-serif;max-width:860px;margin:2rem auto;padding:0 1rem;color:#1d2330}
#drop{display:block;margin:1.2rem 0;border:2px dashed #8a94a8;border-radius:10px;padding:2.2rem;
text-align:center;cursor:pointer}
#drop.over{background:#eef4ff}#result{display:flex;gap:1.5rem;margin-top:1.5rem;align-items:flex-start}
#label{font-size:2rem;font-weight:700}#error{color:#b00020}#gradcam{width:320px;border-radius:6px}
#gradcam:not([src]){display:none}
.small{color:#5b6475;font-size:.9rem}</style></head><body>
<h1>alnet: ALL or HEM?</h1>
<p class="small">Model: <b>__MODEL__</b> (__CHECKPOINT__). A research tool, not a diagnostic device.</p>
<label id="drop" for="file">Drop a single-cell image here, or click to choose one
<input id="file" type="file" accept="image/*" hidden></label>
<p id="error"></p>
<div id="result"><div><div id="label"></div><div id="probability"></div></div><img id="gradcam" alt=""></div>
<script>
const drop = document.getElementById('drop'), input = document.getElementById('file');
function fail(message) {
  document.getElementById('label').textContent = ''; document.getElementById('error').textContent = message;
}
async function send(file) {
  document.getElementById('error').textContent = '';
  if (file.size > __MAX_BYTES__) { fail(file.name + ': larger than __MAX_SIZE__; send one cell image'); return; }
  document.getElementById('label').textContent = '…';
  const form = new FormData(); form.append('file', file);
  let response, body;
  try {
    response = await fetch('predict?gradcam=true', {method: 'POST', body: form});
    body = await response.json();
  } catch (err) { fail(file.name + ': the upload failed (' + err.message + ')'); return; }
  if (!response.ok) { fail(body.reason ? body.error + ' (' + body.reason + ')' : body.error); return; }
  document.getElementById('label').textContent = body.label;
  document.getElementById('probability').textContent =
    'P(ALL) = ' + body.probability_all.toFixed(3) + (body.status === 'review' ? ' — needs review: ' + body.reason : '');
  const img = document.getElementById('gradcam');
  img.src = 'data:image/png;base64,' + body.gradcam_png; img.alt = 'Grad-CAM overlay';
}
input.addEventListener('change', () => input.files[0] && send(input.files[0]));
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over');
  if (e.dataTransfer.files[0]) send(e.dataTransfer.files[0]); });
</script></body></html>"""


def create_app(checkpoint: Path | str, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
               max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS,
               image_check: ImageCheck | None = ImageCheck(), features: bool = True, int8: bool = False) -> FastAPI:
    """`max_batch` 1 classifies each request on its own (the unbatched service). `image_check`, `features`: the
    input gate's image check (None: off), run while decoding, and the model's feature check, run per batch.
    `int8`: answer with the checkpoint's int8 form (`alnet.infer.int8`)."""
    checkpoint = Path(checkpoint)
    predictor = load_predictor(checkpoint, image_check=image_check, features=features, int8=int8)
    model_lock = threading.Lock()  # one pass through the model at a time: torch already uses every core

    def forward(batch: np.ndarray) -> list[tuple[float, float, str, str]]:
        """Per image of a batch: (calibrated P(ALL), the network's own, status, reason); the image check already
        ran while decoding, the feature check and the review band run here."""
        with model_lock:
            answers = predictor.answer(batch, images_checked=True)
        return list(zip(answers.probability_all.tolist(), answers.probability_raw.tolist(),
                        *zip(*answers.statuses)))

    batcher = MicroBatcher(forward, max_batch=max_batch, max_wait=max_wait_ms / 1000)
    decoding = ThreadPoolExecutor(DECODES_IN_FLIGHT, thread_name_prefix="alnet-decode")  # bounds decoded pictures
    receiving = asyncio.Semaphore(BODIES_IN_FLIGHT)  # bounds the memory upload bodies hold
    waiting = 0  # received uploads not yet answered (changed on the event loop only)
    body_limit = max_bytes + MULTIPART_ALLOWANCE
    too_large = f"larger than {_size(max_bytes)}; send one cell image"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()
        decoding.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="alnet", description="ALL vs HEM classification of single white-blood-cell images.",
                  lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException, 404 and 405 included
    async def http_error(request: Request, err: StarletteHTTPException):
        message = err.detail
        if err.status_code == 404:
            message = f"{request.url.path}: not found; the API is POST /predict and GET /health, described at /docs"
        elif err.status_code == 405:
            message = (f"{request.method} {request.url.path}: method not allowed; use "
                       f"{(err.headers or {}).get('Allow', 'another method')}")
        body = {"error": message}
        if isinstance(err, NotACell):
            body.update(reason=err.reason, status=REJECTED)
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        errors = jsonable_encoder(err.errors())
        query = [e for e in errors if tuple(e.get("loc", ()))[:1] == ("query",)]
        if query:
            message = "; ".join(
                f"query parameter `gradcam` must be true or false, not {e.get('input')!r}"
                if tuple(e["loc"])[1:] == ("gradcam",) else f"query parameter `{e['loc'][-1]}`: {e.get('msg')}"
                for e in query)
        else:
            message = MISSING_FILE
        return JSONResponse({"error": message, "detail": errors}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        # Names come from files a user hands in (ONNX metadata, file names): escaped, never markup.
        return (PAGE.replace("__MODEL__", html.escape(predictor.described))
                .replace("__CHECKPOINT__", html.escape(checkpoint.name))
                .replace("__MAX_BYTES__", str(max_bytes)).replace("__MAX_SIZE__", _size(max_bytes)))

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": predictor.described, "checkpoint": checkpoint.name}

    @app.post("/predict", openapi_extra=_upload_schema(max_bytes), responses={
        400: {"description": "empty upload, or not a decodable image"},
        413: {"description": f"upload over {_size(max_bytes)}, or a picture over {max_pixels:,} pixels"},
        415: {"description": f"not a {KINDS} image"},
        422: {"description": "not a cell image: refused by the input gate, {\"error\", \"reason\"}"}})
    async def predict(request: Request,
                      gradcam: bool = Query(False, description="add a Grad-CAM overlay as base64 PNG")) -> dict:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > body_limit:  # refused before a byte of the body is read
            raise HTTPException(413, f"upload of {int(declared):,} bytes is {too_large}", headers=CLOSE)
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise HTTPException(422, MISSING_FILE, headers=CLOSE)
        if receiving.locked():
            raise HTTPException(503, "too many uploads in progress; try again in a moment", headers=CLOSE)
        async with receiving:
            try:
                form = await asyncio.wait_for(_read_form(request, body_limit, too_large), BODY_SECONDS)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the upload did not arrive within {BODY_SECONDS} s", headers=CLOSE)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, MISSING_FILE)
        name = upload.filename or "upload"
        declared_type = (upload.content_type or "").split(";")[0].strip().lower()
        if declared_type and not (declared_type.startswith("image/") or declared_type in OPAQUE_TYPES):
            raise HTTPException(415, f"{name}: {declared_type} is not an image type; send a {KINDS} cell image")
        data = upload.file.read()  # in memory: the parser never spools past the body limit
        await form.close()
        if len(data) > max_bytes:
            raise HTTPException(413, f"{name}: {too_large}")
        if not data:
            raise HTTPException(400, f"{name}: empty upload; send a cell image")
        nonlocal waiting
        if waiting >= REQUESTS_IN_FLIGHT:
            raise HTTPException(503, "too many requests waiting for the model; try again in a moment")
        waiting += 1
        try:
            pixels, (probability, raw, status, reason) = await asyncio.wait_for(classify(name, data),
                                                                             ANSWER_SECONDS)
        except asyncio.TimeoutError:
            raise HTTPException(503, f"{name}: not classified within {ANSWER_SECONDS} s; the service is "
                                     "overloaded, try again later")
        finally:
            waiting -= 1
        result = {"label": name_of(probability), "probability_all": probability, "probability_raw": raw,
                  "status": status, "reason": reason, "model": predictor.described, "checkpoint": checkpoint.name}
        if gradcam:
            result["gradcam_png"] = await run_in_threadpool(gradcam_of, pixels)
        return result

    async def classify(name: str, data: bytes) -> tuple[np.ndarray, tuple[float, float, str, str]]:
        try:
            with batcher.incoming() as submit:  # a forming batch may wait for this picture while it is decoded
                pixels = await asyncio.get_running_loop().run_in_executor(decoding, decode, name, data)
                answer = submit(pixels)
            calibrated, raw, status, reason = await asyncio.wrap_future(answer)
            if status == REJECTED:
                raise NotACell(name, reason)
            return pixels, (float(calibrated), float(raw), status, reason)
        except BatcherClosed:
            raise HTTPException(503, "the service is shutting down; try again in a moment")
        except HTTPException:
            raise
        except Exception as err:  # the forward pass failed: every request of its batch hears of it
            print(f"alnet serve: inference failed: {type(err).__name__}: {err}", file=sys.stderr)
            raise HTTPException(500, f"{name}: the model failed on this batch ({type(err).__name__}); see the "
                                     "service's log") from None

    def gradcam_of(pixels: np.ndarray) -> str | None:
        with model_lock:  # Grad-CAM hooks the network: never while a batch runs through it
            return _gradcam_png(predictor, pixels)

    def decode(name: str, data: bytes) -> np.ndarray:
        over = (f"more than the limit of {max_pixels:,} pixels (C-NMC cells are 450x450 or 600x600); send one "
                "cell image")
        try:
            with Image.open(io.BytesIO(data)) as header:  # lazy: reads the header, decodes nothing
                kind, (width, height) = header.format, header.size
        except Image.DecompressionBombError:
            raise HTTPException(413, f"{name}: {over}")
        except Exception as err:
            raise HTTPException(400, f"{name}: cannot decode this image ({type(err).__name__}); send a {KINDS} "
                                     "cell image")
        if kind not in IMAGE_FORMATS:
            raise HTTPException(415, f"{name}: a {kind} image; send a {KINDS} cell image")
        if width * height > max_pixels:
            raise HTTPException(413, f"{name}: {width}x{height} pixels is {over}")
        try:
            pixels, _ = load_image(io.BytesIO(data), predictor.preprocessing)
        except Exception as err:
            raise HTTPException(400, f"{name}: cannot decode this image ({type(err).__name__}); send a "
                                     f"{KINDS} cell image")
        reason = predictor.gate.image_reasons(pixels[None])[0]  # before the model: never sent to a batch
        if reason:
            raise NotACell(name, reason)
        return pixels

    return app


class NotACell(HTTPException):
    """The input gate refused the picture: 422 with the reason in words, and no label."""

    def __init__(self, name: str, reason: str):
        super().__init__(422, f"{name}: not answered, this does not look like one C-NMC cell")
        self.reason = reason


class _TooLarge(Exception):
    pass


class _InMemoryParser(MultiPartParser):
    """Starlette's multipart parser, with files kept in memory up to `spool_max_size` (set past the body cap)."""

    def __init__(self, request: Request, stream, spool_max_size: int):
        super().__init__(request.headers, stream, max_files=1, max_fields=16, max_part_size=MULTIPART_ALLOWANCE)
        self.spool_max_size = spool_max_size


async def _read_form(request: Request, limit: int, too_large: str):
    """The multipart body, counted as it arrives: past `limit` bytes reading stops with 413."""

    async def counted():
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _TooLarge
            yield chunk

    try:
        return await _InMemoryParser(request, counted(), spool_max_size=limit + 1).parse()
    except _TooLarge:
        raise HTTPException(413, f"upload {too_large}", headers=CLOSE)
    except MultiPartException as err:
        raise HTTPException(400, f"{err.message.rstrip('.')}: {MISSING_FILE}, one file per request", headers=CLOSE)
    except ClientDisconnect:
        raise HTTPException(400, "the upload was cut off before its end", headers=CLOSE)


def _upload_schema(max_bytes: int) -> dict:
    """/predict's request body for the OpenAPI page: the endpoint reads it itself, so FastAPI cannot infer it."""
    file = {"type": "string", "contentMediaType": "application/octet-stream", "title": "File",
            "description": f"a single-cell image ({KINDS}, at most {_size(max_bytes)})"}
    schema = {"type": "object", "title": "Upload", "required": ["file"], "properties": {"file": file}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n % 2**20 == 0 else f"{n:,} bytes"


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port, so that uvicorn could not bind it.

    Binds a probe the way uvicorn (asyncio) will: every address `host` resolves to, SO_REUSEADDR on POSIX (a
    port left in TIME_WAIT is free), IPv6 sockets IPv6-only. Errors other than "address in use" (an unknown
    host, a privileged port) answer False: uvicorn reports those itself."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return False
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            if os.name == "posix" and sys.platform != "cygwin":
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    return True
    return False


def _gradcam_png(predictor, pixels: np.ndarray) -> str | None:
    from ..models import model_spec

    # An ONNX model has no gradients to follow, nor has a hybrid's scikit-learn classifier (no Grad-CAM layer).
    if predictor.trained is None or not model_spec(predictor.model_name).gradcam_layer:
        return None
    from .explain import gradcam_overlay

    overlay, _ = gradcam_overlay(predictor.trained.model, predictor.model_name, pixels)
    buffer = io.BytesIO()
    Image.fromarray(overlay).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
