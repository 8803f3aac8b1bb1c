"""Images from chat requests: data URLs (and files under an allowed folder), decoded with limits.

A decompression bomb, a truncated file, a format PIL does not know, an image too large: each raises
:class:`ImageError` with a code, before any model work is queued.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_images: int = 4  # per request
    allowed_dir: Path | None = None  # file:// and plain paths are read only under this folder


def load_image(url: str, limits: ImageLimits) -> Image.Image:
    """``data:image/...;base64,...`` (or a file under ``limits.allowed_dir``) → an RGB PIL image."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise ImageError("invalid_image_url", "image data URLs must be data:image/<type>;base64,<data>")
        if not header[5:].startswith("image/"):
            raise ImageError("invalid_image_url", f"not an image data URL: {header[:40]!r}")
        if len(payload) > limits.max_bytes * 4 // 3 + 4:
            raise ImageError("image_too_large", f"image is over {limits.max_bytes // (1024 * 1024)} MB")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("invalid_image", "image data is not valid base64") from None
    elif url.startswith(("http://", "https://")):
        raise ImageError("invalid_image_url", "remote image URLs are not fetched: send the image as a data URL")
    else:
        raw = _read_allowed_file(url, limits)
    if len(raw) > limits.max_bytes:
        raise ImageError("image_too_large", f"image is over {limits.max_bytes // (1024 * 1024)} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
            w, h = im.size
            if w * h > limits.max_pixels:
                raise ImageError("image_too_large", f"image is {w}x{h}; at most {limits.max_pixels} pixels are accepted")
            im.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ImageError("invalid_image", f"the image cannot be decoded: {e}") from None
    return im.convert("RGB")


def _read_allowed_file(url: str, limits: ImageLimits) -> bytes:
    if limits.allowed_dir is None:
        raise ImageError("invalid_image_url", "images must be data URLs (this server reads no local files)")
    path = Path(url.removeprefix("file://")).expanduser().resolve()
    root = limits.allowed_dir.expanduser().resolve()
    if root not in path.parents:
        raise ImageError("invalid_image_url", f"local images are read only under {root}")
    if not path.is_file():
        raise ImageError("invalid_image_url", f"no such image file: {path.name}")
    if path.stat().st_size > limits.max_bytes:
        raise ImageError("image_too_large", f"image is over {limits.max_bytes // (1024 * 1024)} MB")
    return path.read_bytes()
