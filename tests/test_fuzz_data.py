"""Seeded fuzzing of the image-caption data path: mutated images and ``metadata.jsonl`` files.

Every mutant is drawn from ``default_rng([SEED, category, i])``, so a failure names a mutant that
reproduces alone. Each outcome must be one of two things:

- a clean refusal: the record is skipped with a known reason (``skip_reason``), or opening the
  source raises a one-line ``ValueError`` naming the file and the line of the JSONL listing;
- a correct result: an RGB image of the expected size within the limits, model inputs of shape
  ``[R, R, 3]`` in [-1, 1], and, where the mutant's pixels are known (mode variants), exactly the
  closed-form 8-bit values.

Where the generator knows the right outcome (a header declaring too many pixels, a path leaving
the folder, a line that is not UTF-8) the test asserts that outcome, not just "something clean".
Functions are tested at the level of sources and decoding: no encoder runs.
"""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest
from image_bytes import (
    PNG_SIGNATURE,
    encode,
    exif_orientation,
    noise_image,
    png_chunk,
    png_declaring,
)
from PIL import Image

from distill_jax.data import sources
from distill_jax.data.input_pipeline import load_image

SEED = 13  # the number
R = 16
CLEAN_SKIPS = (sources.UNDECODABLE_IMAGE, sources.OVERSIZED_IMAGE)
# PIL warns about headers over its own limit and about damaged TIFF tags; the outcome is what
# is checked here.
pytestmark = pytest.mark.filterwarnings(
    "ignore::PIL.Image.DecompressionBombWarning", "ignore::UserWarning:PIL"
)


def rng_for(category: int, i: int) -> np.random.Generator:
    return np.random.default_rng([SEED, category, i])


def within_limits(w: int, h: int) -> bool:
    return 0 < w * h <= sources.MAX_PIXELS and max(w, h) <= sources.MAX_ASPECT_RATIO * min(w, h)


def outcome(data: bytes, size: tuple[int, int] | None = None) -> str | None:
    """The skip reason of an image record, checked to be clean; when there is none, the decoded
    image is checked to be RGB, within the limits (and ``size`` when known), and its model
    inputs ``[R, R, 3]`` finite float32 in [-1, 1]."""
    reason = sources.skip_reason(sources.RawRecord("mutant", data, "a caption"))
    assert reason is None or reason in CLEAN_SKIPS
    if reason is None:
        img = sources.decode_image(data)
        assert img.mode == "RGB" and within_limits(*img.size)
        assert size is None or img.size in (size, size[::-1])  # EXIF may turn it
        x = load_image(data, R)
        assert x.shape == (R, R, 3) and x.dtype == np.float32
        assert np.all((x >= -1) & (x <= 1))  # NaN fails too
    return reason


BASES = {  # small (16 x 24) files in each format and in modes that need mapping to 8 bits
    "png": encode(noise_image(1, 16, 24)),
    "png_p": encode(noise_image(2, 16, 24, "P")),
    "png_rgba": encode(noise_image(3, 16, 24, "RGBA")),
    "png_16": encode(Image.fromarray((np.arange(384, dtype=np.uint16) * 170).reshape(16, 24))),
    "jpeg": encode(noise_image(4, 16, 24), "JPEG", exif=exif_orientation(6)),
    "gif": encode(noise_image(5, 16, 24, "P"), "GIF"),
    "tiff": encode(noise_image(6, 16, 24), "TIFF"),
    "tiff_f": encode(
        Image.fromarray(np.linspace(0, 1, 384, dtype=np.float32).reshape(16, 24)), "TIFF"
    ),
    "webp": encode(noise_image(7, 16, 24), "WEBP", lossless=True),
    "bmp": encode(noise_image(8, 16, 24), "BMP"),
}


def pick_base(rng: np.random.Generator) -> bytes:
    return BASES[list(BASES)[rng.integers(len(BASES))]]


# --- images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("i", range(120))
def test_byte_flips(i):
    """1 to 16 bytes of a file XOR-ed with random nonzero bytes, anywhere."""
    rng = rng_for(0, i)
    data = bytearray(pick_base(rng))
    for _ in range(rng.integers(1, 17)):
        data[rng.integers(len(data))] ^= int(rng.integers(1, 256))
    outcome(bytes(data))


@pytest.mark.parametrize("i", range(60))
def test_truncations(i):
    """Cut anywhere, or (every other mutant) within the header's first 64 bytes; a file that
    lost half of its bytes or more is always undecodable."""
    rng = rng_for(1, i)
    data = pick_base(rng)
    cut = int(rng.integers(len(data))) if i % 2 else int(rng.integers(min(len(data), 64)))
    reason = outcome(data[:cut])
    if cut < len(data) // 2:  # none of the bases survives losing half of its pixel data
        assert reason == sources.UNDECODABLE_IMAGE


def random_dimension(rng: np.random.Generator, high: int) -> int:
    """Log-uniform in [1, high]: tiny, ordinary and absurd sizes alike."""
    return int(np.exp(rng.uniform(0, np.log(high))))


def png_with_size(width: int, height: int, *, fix_crc: bool) -> bytes:
    """``BASES["png"]`` with its IHDR's width and height replaced (CRC recomputed or left)."""
    data = BASES["png"]
    start = len(PNG_SIGNATURE) + 8  # past the IHDR's length and type
    ihdr = struct.pack(">II", width, height) + data[start + 8 : start + 13]
    chunk = png_chunk(b"IHDR", ihdr)
    if not fix_crc:
        chunk = chunk[:-4] + data[start + 13 : start + 17]
    return PNG_SIGNATURE + chunk + data[start + 17 :]


def bmp_with_size(width: int, height: int) -> bytes:
    """``BASES["bmp"]`` with its info header's width and (signed: negative = top-down) height
    replaced."""
    data = BASES["bmp"]
    return data[:18] + struct.pack("<ii", width, height) + data[26:]


def gif_with_size(width: int, height: int) -> bytes:
    """``BASES["gif"]`` with its logical screen size replaced (the frame keeps its own)."""
    data = BASES["gif"]
    return data[:6] + struct.pack("<HH", width, height) + data[10:]


def jpeg_with_size(width: int, height: int) -> bytes:
    """``BASES["jpeg"]`` with its start-of-frame size replaced."""
    data = BASES["jpeg"]
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


@pytest.mark.parametrize("i", range(60))
def test_header_dimension_edits(i):
    """Sizes declared by an edited header; the pixel data stays that of a 24 x 16 image. A size
    over the limits is never a result (a PNG with a valid header: exactly ``oversized_image``),
    and a result has the declared size (GIF: its logical screen, which may differ)."""
    rng = rng_for(2, i)
    kind = ("png", "png_bad_crc", "bmp", "gif", "jpeg")[i % 5]
    high = {"bmp": 2**31 - 1, "gif": 2**16 - 1, "jpeg": 2**16 - 1}.get(kind, 2**31 - 1)
    w, h = random_dimension(rng, high), random_dimension(rng, high)
    if kind in ("png", "png_bad_crc"):
        data = png_with_size(w, h, fix_crc=kind == "png")
    elif kind == "bmp":
        data = bmp_with_size(w, -h if rng.random() < 0.5 else h)
    else:
        data = (gif_with_size if kind == "gif" else jpeg_with_size)(w, h)
    reason = outcome(data, None if kind == "gif" else (w, h))
    if kind == "png" and not within_limits(w, h):
        assert reason == sources.OVERSIZED_IMAGE
    if kind != "gif" and not within_limits(w, h):
        assert reason is not None


def tiff_with_tag(data: bytes, entry: int, kind: int, count: int, value: int) -> bytes:
    """A little-endian TIFF with the type, count and value of its first IFD's ``entry``-th tag
    replaced (TIFF 6.0 section 2: 12-byte entries of tag, type, count, value or offset)."""
    (ifd,) = struct.unpack("<I", data[4:8])
    at = ifd + 2 + 12 * entry + 2  # past the entry count and the tag
    return data[:at] + struct.pack("<HII", kind, count, value) + data[at + 10 :]


@pytest.mark.parametrize("i", range(40))
def test_tiff_tag_edits(i):
    """Each tag of a 10-tag TIFF given a fractional type (RATIONAL, FLOAT, DOUBLE: a float strip
    offset made PIL raise TypeError) and then any type, count and value."""
    rng = rng_for(6, i)
    data = BASES["tiff_f" if i % 2 else "tiff"]
    entry, kind = i % 10, (5, 11, 12, None)[i // 10]
    count, value = 1, int(rng.integers(len(data)))
    if kind is None:  # TIFF 6.0's types are 1-12, BigTIFF's 16-18, the others none
        kind, count = int(rng.integers(0, 19)), random_dimension(rng, 2**32 - 1)
        value = int(rng.integers(2**32))
    outcome(tiff_with_tag(data, entry, kind, count, value))


@pytest.mark.parametrize("i", range(40))
def test_huge_headers_built_by_hand(i):
    """PNGs of a few hundred bytes declaring up to 2^31 - 1 per side: over the limits, always
    ``oversized_image``, decided before a single row is decoded (the rows are not there)."""
    rng = rng_for(3, i)
    w, h = random_dimension(rng, 2**31 - 1), random_dimension(rng, 2**31 - 1)
    if within_limits(w, h):  # make it too long for the aspect-ratio limit, keeping it thin
        w, h = 1, int(sources.MAX_ASPECT_RATIO) + 1 + h
    data = png_declaring(w, h, palette=bool(i % 2), rows=0)
    assert len(data) < 1000
    assert outcome(data) == sources.OVERSIZED_IMAGE


def palette_lookup(img: Image.Image) -> np.ndarray:
    """``[H, W, 3]``: each index of a P/PA image looked up in its palette."""
    palette = np.array(img.getpalette("RGB"), np.uint8).reshape(-1, 3)
    return palette[np.asarray(img.convert("P") if img.mode == "PA" else img)]


# (mode, format) pairs stored losslessly; CMYK checks range only (its RGB has no closed form).
MODES = [
    ("1", "PNG"),
    ("L", "PNG"),
    ("LA", "PNG"),
    ("P", "PNG"),
    ("RGB", "PNG"),
    ("RGBA", "PNG"),
    ("I;16", "PNG"),
    ("I;16", "TIFF"),
    ("I", "TIFF"),
    ("F", "TIFF"),
    ("1", "BMP"),
    ("L", "BMP"),
    ("P", "BMP"),
    ("RGB", "BMP"),
    ("L", "TIFF"),
    ("RGBA", "TIFF"),
    ("CMYK", "TIFF"),
    ("RGB", "WEBP"),
    ("RGBA", "WEBP"),
    ("P", "GIF"),
]


def mode_image(
    rng: np.random.Generator, mode: str, h: int, w: int
) -> tuple[Image.Image, np.ndarray | None]:
    """A random ``mode`` image and the 8-bit RGB it must decode to (``None``: range only)."""
    if mode in ("I;16", "I"):
        v = rng.integers(0, 65536, (h, w))
        img = Image.fromarray(v.astype(np.uint16 if mode == "I;16" else np.int32))
        return img, np.round(v / 257)[..., None].repeat(3, -1)
    if mode == "F":
        k = rng.integers(0, 256, (h, w))  # k / 255 scales back to k exactly
        return Image.fromarray((k / 255).astype(np.float32)), k[..., None].repeat(3, -1)
    img = noise_image(int(rng.integers(2**31)), h, w, mode)
    a = np.asarray(img)
    if mode == "1":
        return img, np.where(a, 255, 0)[..., None].repeat(3, -1)
    if mode == "L":
        return img, a[..., None].repeat(3, -1)
    if mode in ("LA", "RGBA"):
        return img, (a[..., :1].repeat(3, -1) if mode == "LA" else a[..., :3])
    if mode == "P":
        return img, palette_lookup(img)
    return img, (a if mode == "RGB" else None)


@pytest.mark.parametrize("i", range(60))
def test_mode_variants(i):
    """Lossless files in every common mode, random sizes (some beyond the aspect ratio limit):
    exactly the closed-form RGB, or ``oversized_image`` when the size says so."""
    rng = rng_for(4, i)
    mode, fmt = MODES[i % len(MODES)]
    h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    if rng.random() < 0.2:
        w = int(h * sources.MAX_ASPECT_RATIO) + int(rng.integers(1, 5))
    img, want = mode_image(rng, mode, h, w)
    data = encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    reason = outcome(data, (w, h))
    assert reason == (None if within_limits(w, h) else sources.OVERSIZED_IMAGE)
    if reason is None and want is not None:
        got = np.asarray(sources.decode_image(data))
        np.testing.assert_array_equal(got, want, err_msg=f"{mode} {fmt}")


# --- metadata.jsonl ---------------------------------------------------------------------------

GOOD_LINE = {"file_name": "a.png", "caption": "a cat"}
ESCAPES = ["../x.png", "/etc/passwd", "a/../../x.png", "sub/../../../x.png", "..", "", ".", "./.."]
# Names that stay inside the folder but match no file: records with a missing image.
ODD_NAMES = ["b\x00.png", "n" * 300 + ".png", "~/x.png", "C:\\x.png", "sub/", "é.png", " .png"]
WRONG_TYPES = [1, 1.5, None, True, [], {}, ["a.png"], {"a": 1}]


def nested(depth: int, leaf: object = "x") -> str:
    return "[" * depth + json.dumps(leaf) + "]" * depth


def metadata_mutant(rng: np.random.Generator, kind: str) -> tuple[bytes, str | None]:
    """One JSONL line of ``kind`` about ``m.png``, and what must come of it: ``None`` (the
    listing is refused) or the skip reason of its record (``m.png`` exists, with no side-car)."""
    line = dict(GOOD_LINE, file_name="m.png")
    if kind == "not_utf8":
        raw = json.dumps(line).encode()
        at = int(rng.integers(len(raw) + 1))
        bad = bytes([int(rng.choice([0x80, 0xBF, 0xC0, 0xC1, 0xF5, 0xFE, 0xFF]))])
        return raw[:at] + bad + raw[at:], None
    if kind == "escape":
        return json.dumps(dict(line, file_name=str(rng.choice(ESCAPES)))).encode(), None
    if kind == "odd_name":
        name = str(rng.choice(ODD_NAMES))
        return json.dumps(dict(line, file_name=name)).encode(), sources.MISSING_IMAGE
    if kind == "wrong_file_name_type":
        value = WRONG_TYPES[rng.integers(len(WRONG_TYPES))]
        return json.dumps(dict(line, file_name=value)).encode(), None
    if kind == "wrong_caption_type":
        value = WRONG_TYPES[rng.integers(len(WRONG_TYPES))]
        return json.dumps(dict(line, caption=value)).encode(), sources.MISSING_CAPTION
    if kind == "deep_caption":  # valid JSON, but not a string
        caption = nested(int(rng.integers(1, 200)))
        return json.dumps(line).replace('"a cat"', caption).encode(), sources.MISSING_CAPTION
    if kind == "deep_line":  # nesting far beyond any parser's recursion limit
        return nested(int(rng.integers(10_000, 200_000))).encode(), None
    if kind == "broken_json":
        raw = json.dumps(line).encode()
        return raw[: int(rng.integers(1, len(raw) - 1))], None
    raise AssertionError(kind)


METADATA_KINDS = [
    "not_utf8",
    "escape",
    "odd_name",
    "wrong_file_name_type",
    "wrong_caption_type",
    "deep_caption",
    "deep_line",
    "broken_json",
]


@pytest.mark.parametrize("i", range(120))
def test_metadata_lines(tmp_path, i):
    """A listing of good lines with one mutant line at a random place. Refused: a ``ValueError``
    naming the file and the mutant's line. Accepted: every record's path stays inside the
    folder, the good record is good, and the mutant's is skipped for the expected reason."""
    rng = rng_for(5, i)
    kind = METADATA_KINDS[i % len(METADATA_KINDS)]
    for name in ("a.png", "m.png"):
        (tmp_path / name).write_bytes(BASES["png"])
    lines = [json.dumps(GOOD_LINE).encode()] * int(rng.integers(0, 4))
    mutant, expected = metadata_mutant(rng, kind)
    at = int(rng.integers(len(lines) + 1))
    lines.insert(at, mutant)
    path = tmp_path / sources.METADATA_FILE
    path.write_bytes(b"\n".join(lines) + b"\n")
    if expected is None:
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:{at + 1}: ") as e:
            sources.open_source(tmp_path)
        assert "\n" not in str(e.value)
        return
    if kind == "odd_name":  # the line is not about m.png: give it a caption of its own
        (tmp_path / "m.txt").write_text("m's own caption")
    (tmp_path / "a.txt").write_text("a cat")  # a good record even with no good line
    source = sources.open_source(tmp_path)
    reasons = {}
    for r in range(len(source)):
        record = source[r]
        # By string: a name may hold a NUL, which the file system calls cannot take.
        assert os.path.normpath(os.path.join(tmp_path, record.key)).startswith(f"{tmp_path}/")
        reasons[record.key] = sources.skip_reason(record)
    assert reasons.pop("a.png") is None
    if kind == "odd_name":
        assert reasons.pop("m.png") is None
    assert list(reasons.values()) == [expected]  # the mutant's record
