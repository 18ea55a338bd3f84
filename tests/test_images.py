"""Decoding hostile and unusual images: header caps checked before decoding, 16-bit and float
modes mapped to 8 bits by closed forms, EXIF orientation, and a source of nothing but skipped
records. The images are built here (:mod:`image_bytes`)."""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import pytest
from image_bytes import encode, exif_orientation, noise_image, png_declaring
from PIL import Image

from distill_jax.data import builders, sources
from distill_jax.data.input_pipeline import load_image
from distill_jax.data.prepare import prepare


@pytest.mark.parametrize("warnings_as_errors", [False, True])
@pytest.mark.parametrize(
    "width, height, palette",
    [
        (1, 10_000_000, False),  # the 39 KB strip: 512 x 5 * 10^9 after resizing
        (1, 200_000, False),  # the 862-byte strip
        (7_000, 7_000, False),  # 49 MP: over our limit, under PIL's
        (12_000, 12_000, True),  # 144 MP: over PIL's warning limit (89 MP)
        (20_000, 20_000, False),  # 400 MP: over PIL's error limit (179 MP)
    ],
)
def test_oversized_images_are_skipped_unread(width, height, palette, warnings_as_errors):
    """Hand-built PNGs whose pixels are missing: decoding them would fail as truncated, so the
    reason "oversized_image" shows that the header alone decided, whatever PIL's own check and
    the warning filters say."""
    record = sources.RawRecord("big.png", png_declaring(width, height, palette=palette), "c")
    with warnings.catch_warnings():
        warnings.simplefilter("error" if warnings_as_errors else "ignore")
        assert sources.skip_reason(record) == "oversized_image"
        with pytest.raises(sources.OversizedImage):
            load_image(record.image, 512)


@pytest.mark.parametrize(
    "size, limits, reason",
    [
        ((10, 10), dict(max_pixels=100), None),
        ((11, 10), dict(max_pixels=100), "oversized_image"),
        ((10, 1), dict(max_aspect_ratio=10), None),
        ((1, 11), dict(max_aspect_ratio=10), "oversized_image"),
        ((11, 1), dict(max_aspect_ratio=10), "oversized_image"),
        ((3, 2), dict(max_aspect_ratio=1), "oversized_image"),
    ],
)
def test_image_limits_are_inclusive(size, limits, reason):
    record = sources.RawRecord("a.png", encode(noise_image(0, *size)), "c")
    assert sources.skip_reason(record, **limits) == reason


@pytest.mark.parametrize(
    "limits, error",
    [
        (dict(max_pixels=0), "max_pixels=0 must be finite"),
        (dict(max_pixels=-5), "max_pixels=-5 must be finite"),
        (dict(max_pixels=float("inf")), "max_pixels=inf must be finite"),
        (dict(max_pixels=float("nan")), "max_pixels=nan must be finite"),
        (dict(max_pixels=10**9), r"max_pixels=1000000000 must be .* \(0, 89478485\]"),
        (dict(max_aspect_ratio=0.5), "max_aspect_ratio=0.5 must be finite and >= 1"),
        (dict(max_aspect_ratio=float("nan")), "max_aspect_ratio=nan must be finite"),
        (dict(max_aspect_ratio=float("inf")), "max_aspect_ratio=inf must be finite"),
    ],
)
def test_image_limits_are_validated(tmp_path, limits, error):
    """Before anything is read or written (no pipeline is needed to get there)."""
    folder = tmp_path / "pics"
    folder.mkdir()
    noise_image(0, 8, 8).save(folder / "a.png")
    (folder / "a.txt").write_text("a caption")
    with pytest.raises(ValueError, match=error):
        prepare(folder, tmp_path / "a", pipeline=None, **limits)
    with pytest.raises(ValueError, match=error):
        builders.build_image_dataset(folder, tmp_path / "b", **limits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pics"]


def test_cli_limits_default_to_the_library_limits():
    from distill_jax.cli import build_parser

    args = build_parser().parse_args(["prepare", "src", "out", "--pipeline", "ckpt"])
    assert args.max_pixels == sources.MAX_PIXELS
    assert args.max_aspect_ratio == sources.MAX_ASPECT_RATIO
    args = build_parser().parse_args(
        ["prepare", "s", "o", "--pipeline", "c", "--max-pixels", "5", "--max-aspect-ratio", "2.5"]
    )
    assert (args.max_pixels, args.max_aspect_ratio) == (5, 2.5)


# 16-bit and float images as the closed forms of sources._to_rgb: v -> round(v / 257), and
# f -> round(255 f) for f in [0, 1].
GRADIENT_16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)
GRADIENT_F = (np.arange(256, dtype=np.float32) / 255).reshape(16, 16)


@pytest.mark.parametrize(
    "fmt, array, want",
    [
        ("PNG", GRADIENT_16, np.round(GRADIENT_16 / 257)),  # mode I;16
        ("TIFF", GRADIENT_16, np.round(GRADIENT_16 / 257)),  # mode I;16
        ("TIFF", GRADIENT_16.astype(np.int32), np.round(GRADIENT_16 / 257)),  # mode I
        ("TIFF", GRADIENT_F, np.arange(256).reshape(16, 16)),  # mode F
    ],
)
def test_high_bit_depth_images_are_scaled_to_8_bits(fmt, array, want):
    img = sources.decode_image(encode(Image.fromarray(array), fmt))
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), np.repeat(want[..., None], 3, axis=-1))


@pytest.mark.parametrize(
    "array, error",
    [
        (np.full((4, 4), 2.0, np.float32), r"float image with values outside \[0, 1\]: 2\.0"),
        (np.full((4, 4), -0.5, np.float32), r"outside \[0, 1\]: -0\.5"),
        (np.full((4, 4), np.nan, np.float32), r"outside \[0, 1\]: nan"),
        (np.full((4, 4), 70_000, np.int32), r"mode I values outside \[0, 65535\]: 70000"),
        (np.full((4, 4), -1, np.int32), r"mode I values outside \[0, 65535\]: -1"),
    ],
)
def test_images_without_an_8_bit_meaning_are_undecodable(array, error, caplog):
    record = sources.RawRecord("odd.tif", encode(Image.fromarray(array), "TIFF"), "c")
    with pytest.raises(ValueError, match=error):
        sources.decode_image(record.image)
    with caplog.at_level(logging.WARNING):
        assert sources.skip_reason(record) == "undecodable_image"
    assert re.search(f"skipping odd.tif: undecodable_image .*{error}", caplog.text)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP"])
@pytest.mark.parametrize("orientation, turns", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(fmt, orientation, turns):
    """The decoded pixels are the stored ones turned as EXIF says (3: 180 degrees, 6: 90 degrees
    clockwise, 8: counter-clockwise); the stored ones come from the same image written without
    the tag (JPEG encodes the same pixels the same way). PIL's TIFF reader turns the image
    itself: TIFF checks that it is not turned twice."""
    img = noise_image(0, 12, 20)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    stored = np.asarray(sources.decode_image(encode(img, fmt, **kw)))
    assert stored.shape == (12, 20, 3)
    turned = sources.decode_image(encode(img, fmt, exif=exif_orientation(orientation), **kw))
    np.testing.assert_array_equal(np.asarray(turned), np.rot90(stored, turns))


def skip_everything(records: range):
    return (builders.Skipped(f"r{i}", sources.SKIP_REASONS[i % 2]) for i in records)


def test_a_dataset_of_skipped_records_is_refused(tmp_path):
    """Two hosts, every record skipped: process 1 writes shard 1 and returns incomplete, process
    0 writes shards 0 and 2, then refuses with the counts of all three shards (both hosts'); the
    dataset is never marked complete, and running again refuses again."""
    kw = dict(
        name=builders.IMAGE_DATASET,
        features=builders.image_features(),
        num_records=5,
        read_shard=skip_everything,
        shard_size=2,
        metadata={"source": "folder:/pics"},
        process_count=2,
    )
    first = builders.write_dataset(tmp_path, process_index=1, **kw)  # shard 1 of 3
    assert (first.complete, first.skipped) == (False, {"missing_image": 1, "undecodable_image": 1})
    counts = {
        "missing_image": 3,
        "undecodable_image": 2,
        "missing_caption": 0,
        "oversized_image": 0,
    }
    error = rf"folder:/pics: all 5 records were skipped \({re.escape(str(counts))}\)"
    for _ in range(2):
        with pytest.raises(ValueError, match=error):
            builders.write_dataset(tmp_path, process_index=0, **kw)
        assert not (tmp_path / "dataset_info.json").exists()
