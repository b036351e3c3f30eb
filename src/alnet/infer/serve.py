"""`alnet serve`: an HTTP API and a one-page web app around a trained checkpoint (FastAPI + uvicorn).

    GET  /          a page (page.html): drop a cell image, see the call, P(ALL) and a Grad-CAM overlay
    POST /predict   multipart field `file` → {"predicted" (ALL | HEM), "probability_all" (calibrated),
                    "probability_raw", "status" (ok | review), "reason", "model", "checkpoint"[, "gradcam_png"]};
                    a picture the input gate refuses → 422 {"error", "reason", "status": "rejected"}
    GET  /health    {"status": "ok", "model", "checkpoint"}
    GET  /docs      OpenAPI documentation

Three parts: what a client may send and how it is read (`uploads.UploadLimits`), the handlers (`Service`: bounds
on what is held at once, the micro-batched answer, Grad-CAM), and `create_app`, which wires them to FastAPI's
routes and turns every refusal, unknown paths and wrong methods included, into a 4xx JSON body {"error": "..."}.
At most BODIES_IN_FLIGHT upload bodies are held at once, each must arrive within BODY_SECONDS; at most
DECODES_IN_FLIGHT pictures are decoded at once (a pool of that many threads) and at most REQUESTS_IN_FLIGHT
received uploads wait for decoding or the model. Decoded pictures are answered by the checkpoint's pipeline
(`alnet.pipeline`) in dynamic micro-batches (`batcher.MicroBatcher`): requests that arrive while others are being
decoded or answered share one forward pass of up to `max_batch` pictures, waiting at most `max_wait_ms` for each
other; a lone request is never held back. A failed forward pass is a 500 JSON body for every request of its batch.
`port_in_use` lets the command check its port before announcing it.
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
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..labels import Status
from ..pipeline import Answer, Pipeline
from ..trust.image_check import ImageCheck
from .batcher import BatcherClosed, MicroBatcher
from .predict import MAX_BATCH_BYTES, load_pipeline
from .uploads import CLOSE, KINDS, MAX_BYTES, MAX_PIXELS, MISSING_FILE, UploadLimits, size_in_words

DECODES_IN_FLIGHT = 2  # decoded pictures held at once, whatever the number of concurrent requests
BODIES_IN_FLIGHT = 16  # upload bodies held in memory at once: bounds what slow or stalled clients can hold
BODY_SECONDS = 60  # an upload must arrive within this time
REQUESTS_IN_FLIGHT = 64  # received uploads waiting for decoding or the model: bounds what a flood can queue
ANSWER_SECONDS = 60  # a received upload must be answered within this time
MAX_BATCH = 16  # images per forward pass: past ~16 a CPU gains little speed and each answer waits longer
MAX_WAIT_MS = 5.0  # how long a forming batch waits for requests still being decoded
HEADER_SECONDS = 10  # a connection must send its request line and headers within this time (checked every 10 s)
KEEP_ALIVE_SECONDS = 5  # an idle kept-alive connection is closed after this time
MAX_HEADER_BYTES = 16 * 2**10  # request line and headers
MAX_CONNECTIONS = 256  # open connections at once (fewer when the process may open few files)
PAGE = resources.files(__package__).joinpath("page.html")


class NotACell(HTTPException):
    """The input gate refused the picture: 422 with the reason in words, and no call."""

    def __init__(self, name: str, reason: str):
        super().__init__(422, f"{name}: not answered, this does not look like one C-NMC cell")
        self.reason = reason


class Service:
    """The handlers, with what bounds them: a pipeline answering micro-batches, one pass through the model at a
    time (Grad-CAM included), a pool of DECODES_IN_FLIGHT decoding threads, and counts of what is held."""

    def __init__(self, pipeline: Pipeline, limits: UploadLimits, max_batch: int = MAX_BATCH,
                 max_wait_ms: float = MAX_WAIT_MS):
        self.pipeline, self.limits = pipeline, limits
        self.model_lock = threading.Lock()  # one pass through the model at a time: torch already uses every core
        self.batcher = MicroBatcher(self.forward, max_batch=max_batch, max_wait=max_wait_ms / 1000)
        self.decoding = ThreadPoolExecutor(DECODES_IN_FLIGHT, thread_name_prefix="alnet-decode")
        self.receiving = asyncio.Semaphore(BODIES_IN_FLIGHT)  # bounds the memory upload bodies hold
        self.waiting = 0  # received uploads not yet answered (changed on the event loop only)

    def forward(self, batch: np.ndarray) -> list[Answer]:
        with self.model_lock:
            return self.pipeline.answer(batch)

    def close(self) -> None:
        self.batcher.close()
        self.decoding.shutdown(wait=False, cancel_futures=True)

    def page(self) -> str:
        # Names come from files a user hands in (ONNX metadata, file names): escaped, never markup.
        return (PAGE.read_text(encoding="utf-8").replace("__MODEL__", html.escape(self.pipeline.described))
                .replace("__CHECKPOINT__", html.escape(self.pipeline.source.name))
                .replace("__MAX_BYTES__", str(self.limits.max_bytes))
                .replace("__MAX_SIZE__", size_in_words(self.limits.max_bytes)))

    def health(self) -> dict:
        return {"status": "ok", "model": self.pipeline.described, "checkpoint": self.pipeline.source.name}

    async def predict(self, request: Request, gradcam: bool) -> dict:
        self.limits.check_headers(request)  # before a byte of the body is read
        if self.receiving.locked():
            raise HTTPException(503, "too many uploads in progress; try again in a moment", headers=CLOSE)
        async with self.receiving:
            try:
                name, data = await asyncio.wait_for(self.limits.read(request), BODY_SECONDS)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the upload did not arrive within {BODY_SECONDS} s", headers=CLOSE)
        if self.waiting >= REQUESTS_IN_FLIGHT:
            raise HTTPException(503, "too many requests waiting for the model; try again in a moment")
        self.waiting += 1
        try:
            pixels, answer = await asyncio.wait_for(self.answer(name, data), ANSWER_SECONDS)
        except asyncio.TimeoutError:
            raise HTTPException(503, f"{name}: not classified within {ANSWER_SECONDS} s; the service is "
                                     "overloaded, try again later")
        finally:
            self.waiting -= 1
        result = {"predicted": answer.predicted, "probability_all": answer.probability_all,
                  "probability_raw": answer.probability_raw, "status": answer.status.value, "reason": answer.reason,
                  "model": self.pipeline.described, "checkpoint": self.pipeline.source.name}
        if gradcam:
            result["gradcam_png"] = await run_in_threadpool(self.gradcam, pixels)
        return result

    async def answer(self, name: str, data: bytes) -> tuple[np.ndarray, Answer]:
        """Decode in the pool, answer in a micro-batch; a refused picture is NotACell."""
        try:
            with self.batcher.incoming() as submit:  # a forming batch may wait for this picture while it decodes
                pixels = await asyncio.get_running_loop().run_in_executor(
                    self.decoding, self.limits.decode, name, data, self.pipeline.preprocessing)
                pending = submit(pixels)
            answer = await asyncio.wrap_future(pending)
        except BatcherClosed:
            raise HTTPException(503, "the service is shutting down; try again in a moment")
        except HTTPException:
            raise
        except Exception as err:  # the forward pass failed: every request of its batch hears of it
            print(f"alnet serve: inference failed: {type(err).__name__}: {err}", file=sys.stderr)
            raise HTTPException(500, f"{name}: the model failed on this batch ({type(err).__name__}); see the "
                                     "service's log") from None
        if not answer.answered:
            raise NotACell(name, answer.reason)
        return pixels, answer

    def gradcam(self, pixels: np.ndarray) -> str | None:
        with self.model_lock:  # Grad-CAM hooks the network: never while a batch runs through it
            return _gradcam_png(self.pipeline, pixels)


def create_app(checkpoint: Path | str, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
               max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS,
               image_check: ImageCheck | None = ImageCheck(), features: bool = True, int8: bool = False) -> FastAPI:
    """`max_batch` 1 classifies each request on its own (the unbatched service). `image_check`, `features`: the
    input gate's image check (None: off) and the model's feature check. `int8`: answer with the checkpoint's int8
    form (`alnet.int8`)."""
    pipeline = load_pipeline(Path(checkpoint), image_check=image_check, features=features, int8=int8)
    limits = UploadLimits(max_bytes, max_pixels)
    # A batch holds at most MAX_BATCH_BYTES of model input, whatever picture size the model asks for.
    max_batch = max(1, min(max_batch, MAX_BATCH_BYTES // (4 * 3 * pipeline.preprocessing.size ** 2)))
    service = Service(pipeline, limits, max_batch, max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="alnet", description="ALL vs HEM classification of single white-blood-cell images.",
                  lifespan=lifespan)
    app.state.batcher = service.batcher
    app.add_exception_handler(StarletteHTTPException, _http_error)  # FastAPI's HTTPException, 404 and 405 too
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.get("/", response_class=HTMLResponse)(service.page)
    app.get("/health")(service.health)

    @app.post("/predict", openapi_extra=limits.openapi(), responses={
        400: {"description": "empty upload, or not a decodable image"},
        413: {"description": f"upload over {size_in_words(max_bytes)}, or a picture over {max_pixels:,} pixels"},
        415: {"description": f"not a {KINDS} image"},
        422: {"description": "not a cell image: refused by the input gate, {\"error\", \"reason\"}"}})
    async def predict(request: Request,
                      gradcam: bool = Query(False, description="add a Grad-CAM overlay as base64 PNG")) -> dict:
        return await service.predict(request, gradcam)

    return app


def _connection_limit() -> int:
    """At most this many open connections: well below the process's file limit, so that sockets held open by idle
    or slow clients never leave the service without a file for the next client, a picture or the model."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(MAX_CONNECTIONS, (soft if soft != resource.RLIM_INFINITY else 4096) // 2))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with two bounds it lacks: a connection waiting for a request (its line and
    headers) longer than HEADER_SECONDS is closed, and beyond `_connection_limit()` open connections the one that
    has waited longest without a request is closed to make room. A request being received or answered is left
    alone (the handlers bound those)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._since = self.loop.time()
        self._waiting = self.loop.call_later(HEADER_SECONDS, self._check_waiting)
        if len(self.connections) > _connection_limit():
            # Over the limit: the connection that has waited longest without a request makes room; when every
            # one is busy with a request, the new one is turned away.
            idle = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c._idle() and c is not self]
            (min(idle, key=lambda c: c._since).transport if idle else transport).close()

    def _idle(self) -> bool:
        """No request under way: waiting for a request line and headers that may never come."""
        return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)

    def _check_waiting(self) -> None:
        if self._idle():
            self.transport.close()
        elif not self.transport.is_closing():
            self._waiting = self.loop.call_later(HEADER_SECONDS, self._check_waiting)

    def connection_lost(self, exc) -> None:
        waiting = getattr(self, "_waiting", None)
        if waiting is not None:
            waiting.cancel()
        super().connection_lost(exc)


def uvicorn_settings() -> dict:
    """What `alnet serve` passes to uvicorn beside the app, host and port."""
    return {"http": GuardedH11Protocol, "timeout_keep_alive": KEEP_ALIVE_SECONDS,
            "h11_max_incomplete_event_size": MAX_HEADER_BYTES, "log_level": "warning"}


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    message = err.detail
    if err.status_code == 404:
        message = f"{request.url.path}: not found; the API is POST /predict and GET /health, described at /docs"
    elif err.status_code == 405:
        message = (f"{request.method} {request.url.path}: method not allowed; use "
                   f"{(err.headers or {}).get('Allow', 'another method')}")
    body = {"error": message}
    if isinstance(err, NotACell):
        body.update(reason=err.reason, status=Status.REJECTED.value)
    return JSONResponse(body, status_code=err.status_code, headers=err.headers)


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
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


def _gradcam_png(pipeline, pixels: np.ndarray) -> str | None:
    from ..models import model_spec

    # An ONNX model has no gradients to follow, nor has a hybrid's scikit-learn classifier (no Grad-CAM layer).
    if pipeline.trained is None or not model_spec(pipeline.model_name).gradcam_layer:
        return None
    from .explain import gradcam_overlay

    overlay, _ = gradcam_overlay(pipeline.trained.model, pipeline.model_name, pixels)
    buffer = io.BytesIO()
    Image.fromarray(overlay).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
