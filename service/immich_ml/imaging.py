"""Image decoding like upstream (Pillow, converted to RGB), with size limits against decompression bombs."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from immich_ml.causes import cause_of
from immich_ml.errors import BadImage, ImmichMLError, PayloadTooLarge

__all__ = ["Size", "decode_image", "to_bgr"]

Size = tuple[int, int]
"""(width, height) in pixels."""

ImageFile.LOAD_TRUNCATED_IMAGES = False
# The pixel limit is MACHINE_LEARNING_MAX_IMAGE_PIXELS, checked below from the header exactly where Pillow
# checks its own; Pillow's global limit would otherwise warn or refuse at a different size, and silencing its
# warning per call (warnings.catch_warnings) is not thread-safe in the decoding pool.
Image.MAX_IMAGE_PIXELS = None


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    draft_size: int | None = None,
    admit: Callable[[int, int], None] | None = None,
) -> tuple[Image.Image, Size]:
    """Decode encoded image bytes to an RGB Pillow image; also return the encoded image's size.

    The header is read first, so an image over `max_pixels` is refused, and `admit(width, height)` may refuse
    it (by raising), before its pixels are decoded. With
    `draft_size`, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale whose sides are still at least
    `draft_size` (Pillow's draft mode: scaled in the DCT domain, several times cheaper).
    """
    if not data:
        raise BadImage("Image is empty")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise PayloadTooLarge(
                f"Image too large: {width}x{height} pixels, over the limit of {max_pixels} "
                "(MACHINE_LEARNING_MAX_IMAGE_PIXELS)"
            )
        if admit is not None:
            admit(width, height)
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
    except ImmichMLError:
        raise
    except UnidentifiedImageError:
        raise BadImage("Image could not be decoded (not a supported image format)") from None
    except Exception as error:  # Pillow raises many types for bad input: all mean "undecodable"
        raise BadImage(f"Image could not be decoded ({cause_of(error)})") from None
    if image.width == 0 or image.height == 0:
        raise BadImage("Image has zero width or height")
    # Upstream converts every mode with Pillow's own rules (no EXIF rotation; previews are upright).
    return (image if image.mode == "RGB" else image.convert("RGB")), (width, height)


def to_bgr(image: Image.Image) -> np.ndarray:
    """The image as a contiguous uint8 HWC array in BGR order (what OpenCV-style models expect)."""
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
