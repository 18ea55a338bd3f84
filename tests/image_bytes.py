"""Image files for the data tests: noise images in any PIL mode, and PNGs built byte by byte.

A hand-built PNG can declare any size with a few hundred bytes: the hostile inputs that a reader
must refuse from the header, before decoding anything.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def noise_image(seed: int, h: int, w: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img.convert(mode) if mode != "P" else img.quantize(64)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def exif_orientation(orientation: int) -> Image.Exif:
    """EXIF holding only the orientation tag (1-8; 6: turn 90 degrees clockwise to display)."""
    exif = Image.Exif()
    exif[0x0112] = orientation  # ExifTags.Base.Orientation
    return exif


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data, CRC-32 of type and data (PNG spec section 5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, *, palette: bool = False, rows: int = 1) -> bytes:
    """An 8-bit RGB (or palette) PNG whose header declares ``width x height`` but whose data holds
    ``rows`` rows of zeros in an unfinished zlib stream: it opens, and decoding it fails as
    truncated (a finished stream would pass, the missing rows read as zeros)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 3 if palette else 2, 0, 0, 0)
    plte = png_chunk(b"PLTE", bytes(3 * 256)) if palette else b""
    row = b"\x00" + bytes(width * (1 if palette else 3)) if rows else b""  # filter, pixels
    z = zlib.compressobj()
    idat = png_chunk(b"IDAT", z.compress(row * rows) + z.flush(zlib.Z_SYNC_FLUSH))
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + plte + idat + png_chunk(b"IEND", b"")
