"""Image decoding like upstream (Pillow, converted to RGB) within two limits: pixels per image (decompression
bombs) and a budget of decoded pixels in flight across all requests (memory admission).

An image's pixel count is known from its header, before it is decoded; a request whose image would take the
pixels in flight over MACHINE_LEARNING_MAX_PIXELS_IN_FLIGHT gets 503 with `Retry-After` instead of decoding.
Its pixels stay reserved until the request is answered (the decoded image lives that long). When the last
reservation of a burst ends, its holder is told, and claims the heap's return once the budget has stayed empty.
"""

from __future__ import annotations

import io
import threading

from PIL import Image, ImageFile, UnidentifiedImageError

from immich_ml.causes import cause_of
from immich_ml.errors import BadImage, ImmichMLError, Overloaded, PayloadTooLarge

__all__ = ["PixelBudget", "Reservation", "Size", "decode_image"]

Size = tuple[int, int]
"""(width, height) in pixels."""

ImageFile.LOAD_TRUNCATED_IMAGES = False
# The pixel limit is MACHINE_LEARNING_MAX_IMAGE_PIXELS, checked below from the header exactly where Pillow
# checks its own; Pillow's global limit would otherwise warn or refuse at a different size, and silencing its
# warning per call (warnings.catch_warnings) is not thread-safe in the decoding pool.
Image.MAX_IMAGE_PIXELS = None

_TRIM_AFTER_PIXELS = 20_000_000
"""Pixels admitted since the last trim (about 60 MB as RGB) before an idle budget asks for the heap back."""


class PixelBudget:
    """Decoded pixels reserved by the requests being served; thread-safe (reserved in the decoding threads)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._since_trim = 0
        self._lock = threading.Lock()

    def reservation(self) -> Reservation:
        """An empty reservation for one request; `Reservation.release` ends it."""
        return Reservation(self)

    def _take(self, pixels: int) -> None:
        with self._lock:
            if self.in_use + pixels > self.limit:
                raise Overloaded(
                    f"Too many image pixels in flight ({self.in_use} + {pixels} of {self.limit}, "
                    "MACHINE_LEARNING_MAX_PIXELS_IN_FLIGHT); retry shortly"
                )
            self.in_use += pixels
            self._since_trim += pixels

    def claim_heap_return(self) -> bool:
        """True, once per burst, when the budget is empty after a burst: the caller hands the heap back."""
        with self._lock:
            if not self._idle_after_burst():
                return False
            self._since_trim = 0
            return True

    def _idle_after_burst(self) -> bool:
        return self.in_use == 0 and self._since_trim >= _TRIM_AFTER_PIXELS

    def _give_back(self, pixels: int) -> bool:
        with self._lock:
            self.in_use -= pixels
            return self._idle_after_burst()


class Reservation:
    """One request's pixels in a `PixelBudget`."""

    def __init__(self, budget: PixelBudget) -> None:
        self.budget = budget
        self.pixels = 0

    def admit(self, width: int, height: int) -> None:
        """Reserve an image's pixels, or raise `Overloaded` (503) when they would exceed the budget."""
        self.budget._take(width * height)
        self.pixels += width * height

    def release(self) -> bool:
        """Give the pixels back; True when this emptied the budget after a burst (time to claim the heap's
        return, once the burst's requests have freed their images)."""
        pixels, self.pixels = self.pixels, 0
        return bool(pixels) and self.budget._give_back(pixels)


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    draft_size: int | None = None,
    reservation: Reservation | None = None,
) -> tuple[Image.Image, Size]:
    """Decode encoded image bytes to an RGB Pillow image; also return the encoded image's size.

    The header is read first, so an image over `max_pixels` is refused, and `reservation` admits its pixels
    (or refuses them), before they are decoded. With
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
        if reservation is not None:
            reservation.admit(width, height)
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
