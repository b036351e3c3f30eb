"""What the service accepts from a client, and how it reads it without holding more than it must
(docs/design.md, "Decisions": FastAPI + uvicorn for serving).

An upload is refused from its `Content-Length` when that is over the cap, counted as it streams in and refused as
soon as it passes the cap (plus a small allowance for the multipart framing), and parsed in memory: nothing is
spooled to disk. The picture is then checked from its header alone (its decoded format must be one of
IMAGE_FORMATS whatever type the client declared, and it must have at most `max_pixels` pixels) before it is
decoded with the model's preprocessing. Every refusal is an HTTPException whose message names the file and the fix.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from fastapi import HTTPException, Request
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from ..data.transforms import Preprocessing, load_image

MAX_BYTES = 10 * 2**20  # the largest image file accepted
MULTIPART_ALLOWANCE = 64 * 2**10  # boundaries, part headers and small fields around the file, beyond MAX_BYTES
MAX_PIXELS = 16_000_000  # C-NMC cells are 450×450 or 600×600; a picture this large is not one cell
IMAGE_FORMATS = {"BMP", "PNG", "JPEG", "MPO", "TIFF", "WEBP"}  # Pillow's names; MPO: a camera JPEG with extras
KINDS = "BMP, PNG, JPEG, TIFF or WebP"
# Declared types: any image/* (clients spell them many ways), or no specific type; the decoded format decides.
OPAQUE_TYPES = {"application/octet-stream", "binary/octet-stream"}
MISSING_FILE = "send the image as multipart form field `file`"
CLOSE = {"Connection": "close"}  # a refusal before the body was read: do not read (and discard) the rest


def size_in_words(n: int) -> str:
    return f"{n // 2**20} MiB" if n % 2**20 == 0 else f"{n:,} bytes"


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS

    @property
    def body_limit(self) -> int:
        return self.max_bytes + MULTIPART_ALLOWANCE

    @property
    def too_large(self) -> str:
        return f"larger than {size_in_words(self.max_bytes)}; send one cell image"

    def check_headers(self, request: Request) -> None:
        """Before a byte of the body is read: its declared length and its content type."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.body_limit:
            raise HTTPException(413, f"upload of {int(declared):,} bytes is {self.too_large}", headers=CLOSE)
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise HTTPException(422, MISSING_FILE, headers=CLOSE)

    async def read(self, request: Request) -> tuple[str, bytes]:
        """The uploaded file's name and bytes, read in memory and counted as they arrive."""
        form = await _read_form(request, self.body_limit, self.too_large)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            await form.close()
            raise HTTPException(422, MISSING_FILE)
        name = upload.filename or "upload"
        declared_type = (upload.content_type or "").split(";")[0].strip().lower()
        if declared_type and not (declared_type.startswith("image/") or declared_type in OPAQUE_TYPES):
            await form.close()
            raise HTTPException(415, f"{name}: {declared_type} is not an image type; send a {KINDS} cell image")
        data = upload.file.read()  # in memory: the parser never spools past the body limit
        await form.close()
        if len(data) > self.max_bytes:
            raise HTTPException(413, f"{name}: {self.too_large}")
        if not data:
            raise HTTPException(400, f"{name}: empty upload; send a cell image")
        return name, data

    def decode(self, name: str, data: bytes, preprocessing: Preprocessing) -> np.ndarray:
        """The picture as the model sees it, after its header was checked (format, pixels)."""
        over = (f"more than the limit of {self.max_pixels:,} pixels (C-NMC cells are 450x450 or 600x600); send one "
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
        if width * height > self.max_pixels:
            raise HTTPException(413, f"{name}: {width}x{height} pixels is {over}")
        try:
            pixels, _ = load_image(io.BytesIO(data), preprocessing)
        except Exception as err:
            raise HTTPException(400, f"{name}: cannot decode this image ({type(err).__name__}); send a "
                                     f"{KINDS} cell image")
        return pixels

    def openapi(self) -> dict:
        """/predict's request body for the OpenAPI page: the endpoint reads it itself, so FastAPI cannot infer it."""
        file = {"type": "string", "contentMediaType": "application/octet-stream", "title": "File",
                "description": f"a single-cell image ({KINDS}, at most {size_in_words(self.max_bytes)})"}
        schema = {"type": "object", "title": "Upload", "required": ["file"], "properties": {"file": file}}
        return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


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
