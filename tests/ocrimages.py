"""Images with text for the OCR tests: lines rendered in DejaVu Sans, and real photographs and a printed page
from the scikit-image wheel (its ``skimage/data`` PNGs, extracted without installing the package)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tests import modelgen

__all__ = ["SKIMAGE_WHEEL_ENV", "Line", "dejavu_sans", "render", "skimage_image", "with_text"]

_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)
SKIMAGE_WHEEL_ENV = "IMMICH_ML_TEST_SKIMAGE_WHEEL"
_SKIMAGE = "scikit-image==0.25.2"
# One fixed wheel whatever the host (only its PNGs are read), so the file and its hash are stable.
_SKIMAGE_WHEEL_FILE = "scikit_image-0.25.2-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
_SKIMAGE_PLATFORM = ("--python-version", "3.12", "--platform", "manylinux_2_17_x86_64")


@dataclass(frozen=True)
class Line:
    text: str
    region: tuple[int, int, int, int]  # where the glyphs were drawn: left, top, right, bottom


@functools.cache
def dejavu_sans() -> Path:
    """DejaVu Sans (Debian/Ubuntu package `fonts-dejavu-core`); `$IMMICH_ML_TEST_FONT` overrides."""
    found = (
        shutil.which("fc-match")
        and subprocess.run(
            ["fc-match", "-f", "%{file}", "DejaVu Sans:style=Book"], capture_output=True, text=True, check=False
        ).stdout
    )
    for candidate in (os.environ.get("IMMICH_ML_TEST_FONT", ""), found or "", *_FONT_CANDIDATES):
        if candidate.endswith("DejaVuSans.ttf") and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError("DejaVuSans.ttf not found: install fonts-dejavu-core")


def render(
    lines: list[tuple[str, tuple[int, int]]], size: tuple[int, int] = (800, 420), font_size: int = 40
) -> tuple[Image.Image, list[Line]]:
    """Black text on white; returns the image and each line's drawn region."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(str(dejavu_sans()), font_size)
    drawn = []
    for text, origin in lines:
        draw.text(origin, text, font=font, fill="black")
        left, top, right, bottom = draw.textbbox(origin, text, font=font)
        drawn.append(Line(text, (int(left), int(top), int(right), int(bottom))))
    return image, drawn


def with_text(photo: Image.Image, text: str, origin: tuple[int, int], font_size: int = 44) -> Image.Image:
    """`text` painted on a copy of `photo`: white glyphs with a black outline, like a caption or a sign."""
    image = photo.convert("RGB")
    font = ImageFont.truetype(str(dejavu_sans()), font_size)
    ImageDraw.Draw(image).text(origin, text, font=font, fill="white", stroke_width=3, stroke_fill="black")
    return image


def skimage_image(name: str, cache_dir: Path | None = None) -> Image.Image:
    """`skimage/data/<name>.png` from the scikit-image wheel as RGB (e.g. `page`, `chelsea`, `coffee`)."""
    cache = cache_dir or modelgen.default_cache_dir()
    target = cache / "skimage-data" / f"{name}.png"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        wheel = modelgen.pypi_wheel(_SKIMAGE, _SKIMAGE_WHEEL_FILE, SKIMAGE_WHEEL_ENV, cache, _SKIMAGE_PLATFORM)
        with zipfile.ZipFile(wheel) as archive, archive.open(f"skimage/data/{name}.png") as src:
            partial.write_bytes(src.read())
        partial.replace(target)  # atomic: concurrent test workers never see half a file
    with Image.open(target) as image:
        return image.convert("RGB")
