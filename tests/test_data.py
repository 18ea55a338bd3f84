"""Sources, TFDS builders, the grain input pipeline and ``prepare`` on tiny local data.

Everything is generated here: noise images (so that a crop one pixel off, or the wrong filter,
changes most values), a folder with ``metadata.jsonl`` and side-car captions plus broken entries,
parquet shards written with pyarrow, and a tiny pipeline (random NNX VAE/T5/CLIP, character
tokenizers as test doubles for transformers').

References and tolerances:
- pixels: torch's ``interpolate(bilinear, antialias=True)`` in float32 on the decoded image, then
  torchvision's crop arithmetic; ours goes through PIL in uint8, so they agree to < 1 grey level
  (1 / 127.5 in [-1, 1]);
- prepare: the VAE and text encoders run directly on each record alone (batch of one);
  float32 storage agrees to 1e-5 relative to the values' scale, bfloat16 to its rounding (2^-8).
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
import torch
from flax import nnx
from image_bytes import encode, noise_image
from PIL import Image

from distill_jax.data import builders, sources
from distill_jax.data.input_pipeline import load_image, make_dataset
from distill_jax.data.prepare import prepare
from distill_jax.models import clip, t5
from distill_jax.models.autoencoder import Autoencoder, AutoencoderConfig
from distill_jax.pipeline.pipeline import Pipeline
from distill_jax.pipeline.text import encode_prompts
from distill_jax.port.params import from_flat_params, param_shapes

R = 16  # output resolution of the image tests
LEVEL = 1 / 127.5  # one grey level in [-1, 1]


# name -> (size, mode, format, where the caption is). Sizes cover portrait, landscape, square,
# upsampling (13x11 < R) and no resize with a half-pixel crop (21x16: torchvision rounds 2.5 to 2).
GOOD = {
    "img0.png": ((40, 30), "RGB", "PNG", "jsonl"),
    "img1.jpg": ((30, 40), "RGB", "JPEG", "jsonl"),
    "sub/img2.png": ((21, 16), "L", "PNG", "txt"),
    "img3.png": ((13, 11), "RGBA", "PNG", "txt"),
    "img4.png": ((64, 48), "P", "PNG", "both"),
}
SKIPPED = {"undecodable_image": 1, "missing_caption": 2, "missing_image": 1, "oversized_image": 1}


def caption_of(name: str) -> str:
    return f"a noisy picture called {name.split('/')[-1].split('.')[0]}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """5 good records; a truncated PNG, an image without caption, one whose side-car is blank,
    a JSONL entry for a file that does not exist, and a 1 x 200 strip (over the aspect ratio
    limit)."""
    root = tmp_path_factory.mktemp("folder")
    (root / "sub").mkdir()
    meta = []
    for k, (name, ((h, w), mode, fmt, where)) in enumerate(GOOD.items()):
        (root / name).write_bytes(encode(noise_image(k, h, w, mode), fmt))
        if where in ("jsonl", "both"):
            meta.append({"file_name": name, "caption": caption_of(name)})
        if where in ("txt", "both"):
            text = caption_of(name) if where == "txt" else "the JSONL caption wins"
            (root / name).with_suffix(".txt").write_text(text + "\n")
    png = encode(noise_image(9, 32, 32))
    (root / "broken.png").write_bytes(png[: len(png) // 2])
    meta.append({"file_name": "broken.png", "caption": "truncated"})
    (root / "nocap.png").write_bytes(encode(noise_image(10, 20, 20)))
    (root / "blank.png").write_bytes(encode(noise_image(11, 20, 20)))
    (root / "blank.txt").write_text("   \n")
    meta.append({"file_name": "gone.png", "caption": "no such file"})
    (root / "wide.png").write_bytes(encode(noise_image(12, 1, 200)))
    meta.append({"file_name": "wide.png", "caption": "a strip"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta) + "\n")
    return root


@pytest.fixture(scope="module")
def image_ds(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("image_ds")
    builders.build_image_dataset(folder, out, shard_size=3, num_threads=2)
    return out


@pytest.fixture(scope="module")
def many_ds(tmp_path_factory) -> Path:
    """41 tiny records with side-car captions, for ordering and sharding tests."""
    root = tmp_path_factory.mktemp("many")
    for i in range(41):
        (root / f"{i:02d}.png").write_bytes(encode(noise_image(100 + i, 8, 8)))
        (root / f"{i:02d}.txt").write_text(f"caption {i}")
    out = tmp_path_factory.mktemp("many_ds")
    builders.build_image_dataset(root, out, shard_size=10, num_threads=2)
    return out


def read_all(path: Path) -> list[dict]:
    ds = tfds.builder_from_directory(str(path)).as_data_source("train")
    return [ds[i] for i in range(len(ds))]


def text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


# --- building -------------------------------------------------------------------------------


def test_folder_build_reads_back(folder, image_ds):
    rows = read_all(image_ds)
    assert {text(r["key"]): text(r["caption"]) for r in rows} == {
        name: caption_of(name) for name in GOOD
    }
    for r in rows:  # the stored bytes are the file, untouched
        assert bytes(r["image"]) == (folder / text(r["key"])).read_bytes()
    info = builders.load_info(image_ds)
    # Sorted: blank broken gone | img0 img1 img3 | img4 nocap sub/img2 | wide (shards 0 and 3
    # end up empty).
    assert info.splits["train"].shard_lengths == [0, 3, 2, 0]
    assert info.metadata["skipped"] == SKIPPED
    assert sorted(info.metadata["skipped_keys_sample"]) == [
        "blank.png",
        "broken.png",
        "gone.png",
        "nocap.png",
        "wide.png",
    ]
    assert "tensorflow" not in sys.modules  # built and read back without TensorFlow


@pytest.mark.parametrize("image_kind", ["struct", "bytes"])
def test_parquet_build_reads_back(tmp_path, image_kind):
    """Two files, row groups of 2; a Hugging Face Image struct column or raw bytes."""
    images = [encode(noise_image(50 + i, 24, 20)) for i in range(6)]
    images[3] = b"not an image"
    captions = [f"row {i}" for i in range(6)]
    captions[4] = None
    for f, rows in enumerate((range(0, 4), range(4, 6))):
        col = [images[i] for i in rows]
        if image_kind == "struct":
            col = [{"bytes": b, "path": f"{i}.png"} for b, i in zip(col, rows, strict=True)]
        table = pa.table({"image": col, "llava": [captions[i] for i in rows]})
        pq.write_table(table, tmp_path / f"train_{f:03d}.parquet", row_group_size=2)
    out = tmp_path / "ds"
    builders.build_image_dataset(tmp_path, out, caption_column="llava", shard_size=4)
    rows = read_all(out)
    want = {i: (f"train_{i // 4:03d}.parquet:{i % 4}", images[i]) for i in (0, 1, 2, 5)}
    assert {text(r["key"]): (text(r["caption"]), bytes(r["image"])) for r in rows} == {
        key: (captions[i], img) for i, (key, img) in want.items()
    }
    assert builders.load_info(out).metadata["skipped"] == {
        "undecodable_image": 1,
        "missing_caption": 1,
        "missing_image": 0,
        "oversized_image": 0,
    }


@pytest.mark.parametrize(
    "setup, error",
    [
        ("bad_json", r"metadata\.jsonl:2: not valid JSON"),
        ("no_file_name", r"metadata\.jsonl:1: expected an object with a 'file_name'"),
        ("no_column", r"no column 'llava'"),
        ("parent", r"metadata\.jsonl:1: file_name '\.\./secret\.png' is not a path inside"),
        ("absolute", r"metadata\.jsonl:1: file_name '/dev/zero' is not a path inside"),
    ],
)
def test_source_errors_name_the_fault(tmp_path, setup, error):
    lines = {
        "bad_json": ['{"file_name": "a.png"}', "{oops"],
        "no_file_name": ['{"x": 1}'],
        "parent": ['{"file_name": "../secret.png", "llava": "c"}'],
        "absolute": ['{"file_name": "/dev/zero", "llava": "c"}'],
    }
    if setup == "no_column":
        pq.write_table(pa.table({"image": [b"x"], "text": ["t"]}), tmp_path / "a.parquet")
    else:
        (tmp_path / "metadata.jsonl").write_text("\n".join(lines[setup]))
    with pytest.raises(ValueError, match=error):
        sources.open_source(tmp_path, caption_column="llava")


def test_only_regular_files_are_read(tmp_path):
    """A FIFO that metadata.jsonl names as an image (reading it would block forever) is a
    missing image."""
    import os

    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "pipe.png", "caption": "a caption"}')
    source = sources.open_source(tmp_path)
    record = source[0]
    assert record.key == "pipe.png" and record.image is None and record.caption == "a caption"


@pytest.mark.parametrize(
    "setup, error",
    [
        ("not_utf8", r"metadata\.jsonl:2: not UTF-8"),
        ("deep_json", r"metadata\.jsonl:1: JSON nested too deeply"),
        ("truncated_parquet", r"a\.parquet: not a readable parquet file"),
        ("damaged_row_group", r"a\.parquet: row group 0 unreadable"),
    ],
)
def test_damaged_files_are_refused_naming_them(tmp_path, setup, error):
    """A damaged listing or shard is refused with one line that names the file (and line)."""
    if setup in ("not_utf8", "deep_json"):
        lines = {
            "not_utf8": b'{"file_name": "a.png"}\n{"file_name": "\xff\xfe.png"}\n',
            "deep_json": b"[" * 100_000 + b"]" * 100_000 + b"\n",
        }
        (tmp_path / "metadata.jsonl").write_bytes(lines[setup])
    else:
        table = pa.table({"image": [encode(noise_image(i, 8, 8)) for i in range(4)]})
        pq.write_table(table.append_column("caption", pa.array(["c"] * 4)), tmp_path / "a.parquet")
        data = bytearray((tmp_path / "a.parquet").read_bytes())
        if setup == "truncated_parquet":
            data = data[: len(data) // 2]
        else:  # the first page header, right after the "PAR1" magic; the footer stays intact
            data[4:68] = bytes(b ^ 0xA5 for b in data[4:68])
        (tmp_path / "a.parquet").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=error) as e:
        sources.open_source(tmp_path)[0]
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


# --- the input pipeline -----------------------------------------------------------------------


def reference_pixels(data: bytes, resolution: int) -> np.ndarray:
    """torch antialiased bilinear + torchvision's size and crop arithmetic, in float32."""
    a = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    h, w = a.shape[:2]
    nh, nw = (
        (resolution, int(resolution * w / h)) if h <= w else (int(resolution * h / w), resolution)
    )
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, (nh, nw), mode="bilinear", antialias=True)
    top, left = int(round((nh - resolution) / 2)), int(round((nw - resolution) / 2))
    x = x[0, :, top : top + resolution, left : left + resolution].permute(1, 2, 0).numpy()
    return x / 127.5 - 1


def loader(path: Path, **kw) -> grain.IterDataset:
    """``make_dataset`` with test defaults: one host, one epoch, batches of 1, 8 px, 2 threads."""
    defaults = dict(batch_size=1, num_epochs=1, resolution=8, num_threads=2)
    return make_dataset(path, **(defaults | dict(shard=grain.sharding.NoSharding()) | kw))


def keys(ds: grain.IterDataset) -> list[str]:
    return [str(k) for batch in ds for k in batch["key"]]


def test_pixels_match_reference(folder, image_ds):
    seen = []
    for batch in loader(image_ds, resolution=R, shuffle=False):
        key = str(batch["key"][0])
        image = batch["image"][0]
        assert image.shape == (R, R, 3) and image.dtype == np.float32
        ref = reference_pixels((folder / key).read_bytes(), R)
        np.testing.assert_allclose(image, ref, rtol=0, atol=LEVEL, err_msg=key)
        assert str(batch["caption"][0]) == caption_of(key)
        seen.append(key)
    assert sorted(seen) == sorted(GOOD)


def test_shuffle_is_seeded_and_reshuffles_each_epoch(many_ds):
    a, b = (keys(loader(many_ds, seed=seed, num_epochs=2)) for seed in (0, 1))
    assert a == keys(loader(many_ds, seed=0, num_epochs=2))
    assert a != b
    for epoch in (a[:41], a[41:], b[:41]):
        assert sorted(epoch) == [f"{i:02d}.png" for i in range(41)]  # a permutation
    assert a[:41] != a[41:]  # a new permutation in the second epoch


def test_iterator_state_resumes_exactly(many_ds):
    ds = loader(many_ds, batch_size=4, seed=3, num_epochs=None)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would store it
    want = [next(it) for _ in range(12)]  # crosses the epoch boundary (41 records)
    resumed = iter(ds)
    resumed.set_state(state)
    for w in want:
        got = next(resumed)
        assert list(got["key"]) == list(w["key"])
        np.testing.assert_array_equal(got["image"], w["image"])


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_host_shards_partition(many_ds, count, drop_remainder):
    per_host = [
        keys(loader(many_ds, shard=grain.sharding.ShardOptions(p, count, drop_remainder)))
        for p in range(count)
    ]
    union = [k for ks in per_host for k in ks]
    assert len(union) == len(set(union))  # no record on two hosts
    if drop_remainder:
        assert {len(ks) for ks in per_host} == {41 // count}  # equal steps on every host
    else:
        assert len(union) == 41


def test_undecodable_record_is_dropped_by_the_pipeline(tmp_path, caplog):
    """Bytes damaged after the build: the pipeline logs and drops the record, batches stay full."""
    good = [encode(noise_image(i, 8, 8)) for i in range(5)]
    records = good[:2] + [b"\x89PNG damaged"] + good[2:]

    def read_shard(r):
        return ({"image": records[i], "caption": "c", "key": f"k{i}"} for i in r)

    builders.write_dataset(
        tmp_path,
        name=builders.IMAGE_DATASET,
        features=builders.image_features(),
        num_records=6,
        read_shard=read_shard,
        shard_size=6,
        process_index=0,
        process_count=1,
    )
    with caplog.at_level(logging.WARNING):
        batches = list(loader(tmp_path, batch_size=5, shuffle=False))
    assert [list(b["key"]) for b in batches] == [["k0", "k1", "k3", "k4", "k5"]]
    assert "k2" in caplog.text


# --- prepare --------------------------------------------------------------------------------


class CharTokenizer:
    """Test double for a transformers tokenizer: one id per character, then ``eos``."""

    model_max_length = 77

    def __init__(self, eos: int, pad: int):
        self.eos, self.pad = eos, pad

    def __call__(self, prompts, padding=None, max_length=None, truncation=False, **kw):
        ids = [[3 + ord(c) % 90 for c in p] + [self.eos] for p in prompts]
        if truncation and max_length:
            ids = [i[:max_length] for i in ids]
        if padding == "max_length":
            ids = np.array([i + [self.pad] * (max_length - len(i)) for i in ids])
        return {"input_ids": ids}


def random_model(make, seed: int):
    """A model with N(0, 0.1^2) parameters, set without running its (slow, eager) initialisers."""
    abstract = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)
    shapes = param_shapes(abstract)
    return from_flat_params(abstract, {k: rng.normal(0, 0.1, s) for k, s in shapes.items()})


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline(
        transformer=None,  # prepare needs only the encoders
        vae=random_model(lambda: Autoencoder(AutoencoderConfig.tiny(), rngs=nnx.Rngs(0)), 0),
        clip=random_model(lambda: clip.CLIPTextEncoder(clip.tiny(), rngs=nnx.Rngs(0)), 1),
        t5=random_model(lambda: t5.T5Encoder(t5.tiny(), rngs=nnx.Rngs(0)), 2),
        clip_tokenizer=CharTokenizer(eos=98, pad=0),  # eos has the largest id, as in CLIP-L
        t5_tokenizer=CharTokenizer(eos=1, pad=0),
    )


# 9 source records in shards of 4 (the last holds 1), batches of 3 (the last is padded).
PREP = dict(
    resolution=R,
    max_sequence_length=12,
    batch_size=3,
    shard_size=4,
    num_threads=2,
    seed=7,
    dtype="float32",
)


class Interrupted(Exception):
    pass


class Source:
    """Wraps a source: records which indices are read, and can fail from ``fail_at`` on."""

    def __init__(self, inner, fail_at: int | None = None):
        self.inner, self.fail_at, self.read = inner, fail_at, set()
        self.description = inner.description

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if self.fail_at is not None and i >= self.fail_at:
            raise Interrupted(f"simulated interruption at record {i}")
        self.read.add(i)
        return self.inner[i]


@nnx.jit
def vae_moments(vae: Autoencoder, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return vae.encode(images)


def expected(pipe: Pipeline, folder: Path, key: str, index: int, seed: int, sample: bool):
    """One record encoded alone: (latents [h, w, C], t5 [S, D], pooled [D])."""
    image = load_image((folder / key).read_bytes(), R)
    mean, logvar = vae_moments(pipe.vae, jnp.asarray(image)[None])
    latents = mean[0]
    if sample:
        eps = jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), latents.shape)
        latents = latents + jnp.exp(0.5 * logvar[0]) * eps
    t5_, pooled, _ = encode_prompts(pipe, [caption_of(key)], max_sequence_length=12)
    return np.asarray(latents), np.asarray(t5_[0]), np.asarray(pooled[0])


@pytest.fixture(scope="module")
def prepared(pipe, folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    report = prepare(folder, out, pipeline=pipe, **PREP)
    assert report.complete and report.skipped == SKIPPED and report.examples == len(GOOD)
    return out


@pytest.mark.parametrize(
    "dtype, sample, rtol",
    [("float32", True, 1e-5), ("bfloat16", True, 2**-8), ("float32", False, 1e-5)],
)
def test_prepare_matches_direct_encoding(pipe, folder, prepared, tmp_path, dtype, sample, rtol):
    out = prepared
    if (dtype, sample) != ("float32", True):
        out = tmp_path / "ds"
        prepare(folder, out, pipeline=pipe, **PREP | dict(dtype=dtype, sample_posterior=sample))
    info = builders.load_info(out)
    assert info.metadata["scaling_factor"] == pytest.approx(0.3611)
    assert info.metadata["shift_factor"] == pytest.approx(0.1159)
    assert info.metadata["skipped"] == SKIPPED
    rows = read_all(out)
    assert sorted(text(r["key"]) for r in rows) == sorted(GOOD)
    names = sorted(set(GOOD) | {"broken.png", "nocap.png", "blank.png", "gone.png", "wide.png"})
    for r in rows:
        key, index = text(r["key"]), int(r["index"])
        assert names[index] == key  # index = position in the source
        assert text(r["caption"]) == caption_of(key)
        for name, got, want in zip(
            ("latents", "t5", "pooled"),
            (r["latents"], r["t5"], r["pooled"]),
            expected(pipe, folder, key, index, seed=7, sample=sample),
            strict=True,
        ):
            assert got.dtype == jnp.dtype(dtype), name
            assert got.shape == want.shape, name
            scale = np.abs(want).max()
            np.testing.assert_allclose(
                got.astype(np.float32), want, rtol=rtol, atol=1e-5 * scale, err_msg=f"{key} {name}"
            )
    # The latents read back through the input pipeline, batched.
    batch = next(iter(make_dataset(out, batch_size=2, shard=grain.sharding.NoSharding())))
    assert batch["latents"].shape == (2, 8, 8, 16) and batch["t5"].shape == (2, 12, 32)
    assert batch["pooled"].shape == (2, 32) and batch["latents"].dtype == jnp.dtype(dtype)


def rows_by_index(path: Path) -> dict[int, dict]:
    return {int(r["index"]): r for r in read_all(path)}


def assert_same_rows(a: Path, b: Path) -> None:
    ra, rb = rows_by_index(a), rows_by_index(b)
    assert sorted(ra) == sorted(rb)
    for i in ra:
        for name in ("latents", "t5", "pooled"):
            np.testing.assert_allclose(ra[i][name], rb[i][name], rtol=1e-5, atol=1e-6)


def test_prepare_resume_redoes_nothing_finished(pipe, folder, prepared, tmp_path):
    out = tmp_path / "ds"
    source = sources.open_source(folder)
    with pytest.raises(Interrupted):  # dies inside shard 1 (records 4..7)
        prepare(Source(source, fail_at=5), out, pipeline=pipe, **PREP)
    shard0 = out / "flux_latents-train.array_record-00000-of-00003"
    assert shard0.is_file() and not (out / "dataset_info.json").exists()
    stamp = shard0.stat().st_mtime_ns
    again = Source(source)
    report = prepare(again, out, pipeline=pipe, **PREP)
    assert (report.shards_found_done, report.shards_written, report.complete) == (1, 2, True)
    assert min(again.read) == 4  # records of the finished shard were not even read
    assert shard0.stat().st_mtime_ns == stamp
    assert builders.load_info(out).metadata["skipped"] == SKIPPED  # counts of both runs
    assert_same_rows(out, prepared)


def test_prepare_hosts_split_the_shards(pipe, folder, prepared, tmp_path):
    out = tmp_path / "ds"
    reports = [
        prepare(folder, out, pipeline=pipe, process_index=p, process_count=2, **PREP)
        for p in (0, 1)
    ]
    assert [r.shards_written for r in reports] == [2, 1]  # shards 0, 2 and shard 1
    assert [r.complete for r in reports] == [False, True]  # the last to finish writes the info
    assert_same_rows(out, prepared)


def test_prepare_refuses_to_mix_settings(pipe, folder, prepared):
    with pytest.raises(ValueError, match=r"different settings \(seed: 7 -> 8\)"):
        prepare(folder, prepared, pipeline=pipe, **PREP | dict(seed=8))


def test_prepare_reads_a_built_dataset(pipe, image_ds, prepared, tmp_path):
    """Built image datasets are a source too: the same records, the corrupt ones already gone."""
    out = tmp_path / "ds"
    report = prepare(image_ds, out, pipeline=pipe, **PREP)
    assert report.complete and report.examples == len(GOOD) and not report.skipped
    direct = {text(r["key"]): r for r in read_all(prepared)}
    for r in read_all(out):
        want = direct[text(r["key"])]
        for name in ("t5", "pooled"):  # latents differ: their key follows the record index
            np.testing.assert_allclose(r[name], want[name], rtol=1e-5, atol=1e-6)


def test_prepared_dataset_trains(pipe, prepared, tmp_path):
    """prepare -> train on the folder above (with its corrupt records): the trainer reads
    prepare's output in its own layout (scaled [B, C, h, w] latents, embeddings, the stored
    unconditional embeddings) and takes finite steps on it."""
    from distill_jax.config import base_config
    from distill_jax.train import train

    c = base_config()
    c.method = "flow_matching"
    c.model.overrides = {
        "in_channels": 4 * pipe.vae.cfg.latent_channels,
        "context_dim": pipe.t5.cfg.d_model,
        "pooled_dim": pipe.clip.cfg.hidden_size,
    }
    c.model.dtype = "float32"
    c.total_steps, c.log_every, c.async_checkpoints = 2, 1, False
    c.data.kind, c.data.path, c.data.batch_size = "latents", str(prepared), 2
    c.mesh.devices = 1
    run = train(c, tmp_path)
    assert [m["step"] for m in run.metrics] == [1, 2]
    assert all(np.isfinite(m["train/loss"]) and m["train/skipped_steps"] == 0 for m in run.metrics)


def test_prepare_refuses_a_source_of_skipped_records(pipe, folder, tmp_path):
    names = ["broken.png", "nocap.png", "blank.png", "gone.png", "wide.png"]
    source = sources.open_source(folder)
    only_bad = [source[i] for i in range(len(source)) if source[i].key in names]

    class Bad:
        description = "the bad ones"

        def __len__(self):
            return len(only_bad)

        def __getitem__(self, i):
            return only_bad[i]

    with pytest.raises(ValueError, match=r"the bad ones: all 5 records were skipped"):
        prepare(Bad(), tmp_path, pipeline=pipe, **PREP)
    assert not (tmp_path / "dataset_info.json").exists()
