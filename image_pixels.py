"""Decoded pixels to what the model reads: phone photos (HEIC/HEIF through pillow-heif, photos over
MAX_IMAGE_PIXELS read reduced instead of refused), EXIF orientation, and any colour mode to RGB as seen.

A 48-50 MP photo is larger than any view the model builds (a gundam grid is at most a few thousand pixels a
side), so reading it at half size loses nothing the model could use. How it is reduced depends on what the
format can do without holding the full picture:
- JPEG (and MPO, phones' multi-picture JPEG): libjpeg's DCT scaling (`Image.draft`) decodes at 1/2, 1/4 or
  1/8 directly; the full-size pixels never exist, so what is decoded is the reduced image.
- HEIF: libheif has no reduced decode; the full image is decoded, then `Image.reduce` box-filters it by an
  integer factor. What is decoded (and charged to the pixel budget) is the full image, so HEIF photos are
  reduced only up to MAX_PHOTO_MPIX.
PNG and the other lossless formats are not reduced: their decoders hold the whole image (a PNG bomb of a few
hundred KB decodes to gigabytes), so they stay refused past MAX_IMAGE_PIXELS.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
from PIL import ExifTags, Image, ImageOps

from errors import UnsupportedMediaType

log = logging.getLogger(__name__)

REDUCIBLE_FORMATS = frozenset({"JPEG", "MPO", "HEIF"})
_DRAFT_FACTORS = (1, 2, 4, 8)  # the scalings libjpeg decodes directly


@functools.cache
def register_heif() -> bool:
    """Teach Pillow HEIC/HEIF (once, on the first upload: importing libheif costs start-up time everywhere
    else). False when pillow-heif is missing: HEIF is then refused like any unknown format."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def reduced_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """The size a decoder scaled by 1/`factor` produces (both JPEG scaling and `reduce` round up)."""
    return math.ceil(size[0] / factor), math.ceil(size[1] / factor)


def reduction(fmt: str, size: tuple[int, int], max_pixels: int, max_photo_pixels: int) -> int | None:
    """The smallest factor that brings a `fmt` image of `size` within `max_pixels`: 1 when it already fits,
    None when it cannot be read reduced (not a photo format, past `max_photo_pixels` for a HEIF, or past
    1/8 for a JPEG)."""
    width, height = size
    if width * height <= max_pixels:
        return 1
    if fmt not in REDUCIBLE_FORMATS:
        return None
    if fmt == "HEIF":
        if width * height > max_photo_pixels:
            return None
        factor = math.ceil(math.sqrt(width * height / max_pixels))
        while math.prod(reduced_size(size, factor)) > max_pixels:
            factor += 1
        return factor
    return next((f for f in _DRAFT_FACTORS if math.prod(reduced_size(size, f)) <= max_pixels), None)


def decoded_pixels(fmt: str, size: tuple[int, int], factor: int) -> int:
    """Pixels the decoder itself produces for a reduction of `factor`: the reduced image for a JPEG (scaled
    in the decoder), the full one for a HEIF (reduced after decoding)."""
    if factor == 1 or fmt == "HEIF":
        return size[0] * size[1]
    return math.prod(reduced_size(size, factor))


def start(im: Image.Image, factor: int) -> None:
    """Before `load`: ask the JPEG decoder for its scaled output. Pillow's `draft` picks the largest scale
    whose output is at least the size asked, so asking for size // factor gives exactly 1/factor."""
    if factor > 1 and im.format in ("JPEG", "MPO"):
        im.draft(im.mode, (im.width // factor, im.height // factor))


def finish(im: Image.Image, factor: int) -> Image.Image:
    """After `load`: reduce what the decoder could not (HEIF), by a box filter of `factor`."""
    if factor > 1 and im.format == "HEIF":
        return im.reduce(factor)
    return im


def note(original: tuple[int, int], reduced: tuple[int, int]) -> str:
    return (f"The photo was read reduced from {original[0]}x{original[1]} to {reduced[0]}x{reduced[1]} pixels "
            "(over MAX_IMAGE_PIXELS; the model's views are smaller still, so no detail it could use was lost).")


_TRANSPOSED_ORIENTATIONS = range(2, 9)  # EXIF orientations 2-8 flip or rotate; 1 (and none) is as stored


def exif_transposed(im: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a malformed EXIF block only costs the rotation, never the request. An image with
    no rotation to apply comes back as it is (Pillow's `exif_transpose` would copy it: ~6 MB for an A4 page)."""
    try:
        if im.getexif().get(ExifTags.Base.Orientation, 1) not in _TRANSPOSED_ORIENTATIONS:
            return im
        return ImageOps.exif_transpose(im)
    except Exception as exc:  # EXIF parsing raises a zoo of types on garbage (struct, Syntax, Value...)
        log.warning("ignoring unreadable EXIF orientation: %s", exc)
        return im


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB the way it looks on screen."""
    if im.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_to_uint8(im)).convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        # Flatten on white: documents are dark ink on paper; transparent areas as black would hide text.
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return flat
    try:
        return im.convert("RGB")  # 1, L, P, CMYK (Adobe-inverted JPEGs are un-inverted by Pillow), YCbCr
    except ValueError as exc:
        raise UnsupportedMediaType(
            f"The image's colour mode {im.mode} cannot be converted to RGB. Send an RGB or grayscale image."
        ) from exc


def _to_uint8(im: Image.Image) -> np.ndarray:
    """Scale 16/32-bit integer and float grayscale to 8 bit. Pillow's own convert("L") clips values
    above 255, which turns any 16-bit scan white."""
    arr = np.asarray(im)
    if arr.dtype.kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if im.mode.startswith("I;16") or (lo >= 0 and hi <= 65535):
            # Full 16-bit range (Pillow also scales 16-bit PGM into it); x/257 maps 65535 -> 255.
            return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    values = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo_f, hi_f = float(values.min()), float(values.max())
    if im.mode == "F" and lo_f >= 0.0 and hi_f <= 1.0:
        return np.round(values * 255.0).astype(np.uint8)
    if hi_f <= lo_f:
        return np.zeros(values.shape, np.uint8)
    # Unknown range (32-bit integers, arbitrary floats): stretch what is there.
    return np.round((values - lo_f) * (255.0 / (hi_f - lo_f))).astype(np.uint8)
