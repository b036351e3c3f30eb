"""`alnet serve`: an HTTP API and a one-page web app around a trained checkpoint (FastAPI + uvicorn).

    GET  /          a page: drop a cell image, see the label, P(ALL) and a Grad-CAM overlay
    POST /predict   multipart field `file` → {"label", "probability_all", "model", "checkpoint"[, "gradcam_png"]}
    GET  /health    {"status": "ok", "model", "checkpoint"}
    GET  /docs      OpenAPI documentation

Uploads are read into memory, capped in size, checked to be images Pillow can decode, and never written to
disk; every refusal is a 4xx JSON body {"error": "..."}.
"""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image

from ..data.transforms import load_image
from ..labels import name_of
from .predict import load_predictor

MAX_BYTES = 10 * 2**20
IMAGE_TYPES = {"image/bmp", "image/x-ms-bmp", "image/png", "image/jpeg", "image/tiff", "image/webp",
               "application/octet-stream"}  # some clients send no specific type: the decoder decides

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
async function send(file) {
  document.getElementById('error').textContent = '';
  document.getElementById('label').textContent = '…';
  const form = new FormData(); form.append('file', file);
  const response = await fetch('predict?gradcam=true', {method: 'POST', body: form});
  const body = await response.json();
  if (!response.ok) { document.getElementById('label').textContent = '';
    document.getElementById('error').textContent = body.error; return; }
  document.getElementById('label').textContent = body.label;
  document.getElementById('probability').textContent =
    'P(ALL) = ' + body.probability_all.toFixed(3);
  const img = document.getElementById('gradcam');
  img.src = 'data:image/png;base64,' + body.gradcam_png; img.alt = 'Grad-CAM overlay';
}
input.addEventListener('change', () => input.files[0] && send(input.files[0]));
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over');
  if (e.dataTransfer.files[0]) send(e.dataTransfer.files[0]); });
</script></body></html>"""


def create_app(checkpoint: Path | str, max_bytes: int = MAX_BYTES) -> FastAPI:
    checkpoint = Path(checkpoint)
    predictor = load_predictor(checkpoint)
    lock = threading.Lock()  # one inference at a time: torch already uses every core for one batch
    app = FastAPI(title="alnet", description="ALL vs HEM classification of single white-blood-cell images.")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return JSONResponse({"error": err.detail}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return JSONResponse({"error": "send the image as multipart form field `file`", "detail": err.errors()},
                            status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("__MODEL__", predictor.model_name).replace("__CHECKPOINT__", checkpoint.name)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": predictor.model_name, "checkpoint": checkpoint.name}

    @app.post("/predict")
    def predict(file: UploadFile = File(..., description="a single-cell image (BMP, PNG, JPEG, TIFF)"),
                gradcam: bool = Query(False, description="add a Grad-CAM overlay as base64 PNG")) -> dict:
        if file.content_type and file.content_type not in IMAGE_TYPES:
            raise HTTPException(415, f"{file.filename}: {file.content_type} is not an image type; send a BMP, "
                                     "PNG, JPEG or TIFF cell image")
        data = file.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"{file.filename}: larger than {max_bytes // 2**20} MiB; send one cell image")
        if not data:
            raise HTTPException(400, f"{file.filename}: empty upload; send a cell image")
        try:
            pixels, _ = load_image(io.BytesIO(data), predictor.preprocessing)
        except Exception as err:
            raise HTTPException(400, f"{file.filename}: cannot decode this image ({type(err).__name__}); send a "
                                     "BMP, PNG, JPEG or TIFF cell image")
        with lock:
            probability = float(predictor(pixels[None])[0])
            result = {"label": name_of(probability), "probability_all": probability,
                      "model": predictor.model_name, "checkpoint": checkpoint.name}
            if gradcam:
                result["gradcam_png"] = _gradcam_png(predictor, pixels)
        return result

    return app


def _gradcam_png(predictor, pixels: np.ndarray) -> str | None:
    if predictor.trained is None:  # an ONNX model has no gradients to follow
        return None
    from .explain import gradcam_overlay

    overlay, _ = gradcam_overlay(predictor.trained.model, predictor.model_name, pixels)
    buffer = io.BytesIO()
    Image.fromarray(overlay).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
