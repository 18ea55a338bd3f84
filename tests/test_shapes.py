"""The shapes world: determinism, captions that say what the pixels show, held-out splits, and
the TFDS copy read back through the project's input pipeline."""

import collections
import json

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from distill_jax.data import shapes
from distill_jax.data.input_pipeline import make_dataset, to_model_range
from distill_jax.pipeline.toy import tokenize

# Analytic areas in pixels of a shape with bounding-box side s.
AREA = {
    "square": lambda s: s * s,
    "circle": lambda s: np.pi * s * s / 4,
    "triangle": lambda s: s * s / 2,
}


def test_records_are_a_pure_function_of_seed_and_index():
    a, b = shapes.ShapesSource("train", seed=3), shapes.ShapesSource("train", seed=3)
    for i in (0, 17, 123_456):
        ra, rb = a[i], b[i]
        np.testing.assert_array_equal(ra["image"], rb["image"])
        assert ra["caption"] == rb["caption"] and ra["attributes"] == rb["attributes"]
    other = shapes.ShapesSource("train", seed=4)
    assert any(not np.array_equal(a[i]["image"], other[i]["image"]) for i in range(4))


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_captions_match_the_rendered_pixels(split):
    """Every object the caption names is drawn where the layout put it, with its colour and its
    analytic area, and nothing else is drawn; position prompts hold their relation."""
    source = shapes.ShapesSource(split, seed=1)
    bg = np.asarray(shapes.BACKGROUND, np.float32)
    dirs = np.asarray(list(shapes.COLORS.values()), np.float32) - bg  # [K, 3]
    tags = collections.Counter()
    for i in range(120):
        ex = source.example(i)
        tags[ex.prompt.tag] += 1
        assert [p.obj for p in ex.placed] == list(ex.prompt.objects)
        words = ex.prompt.text.split()
        for obj in ex.prompt.objects:
            assert obj.color in words and (obj.shape in words or obj.shape + "s" in words)
        tokenize([ex.prompt.text], shapes.VOCAB, shapes.TEXT_LEN)  # every caption has its words
        # A pixel is bg + coverage * (colour - bg): recover each pixel's colour and coverage.
        v = ex.image.astype(np.float32) - bg  # [H, W, 3]
        alpha = np.einsum("hwc,kc->hwk", v, dirs) / (dirs * dirs).sum(-1)  # [H, W, K]
        residual = np.linalg.norm(v[:, :, None] - alpha[..., None] * dirs, axis=-1)
        residual = np.where(alpha > -0.01, residual, np.inf)  # yellow is minus blue, etc.
        owner = np.argmin(residual, -1)
        assert residual.min(-1).max() < 2.0  # every pixel is one colour over the background
        for k, color in enumerate(shapes.COLORS):
            mine = [p for p in ex.placed if p.obj.color == color]
            want = sum(AREA[p.obj.shape](p.size) for p in mine)
            got = np.where(owner == k, alpha[..., k], 0.0).sum()
            # 4x4 supersampling moves an edge by at most 1/8 pixel: about size / 2 per object.
            tol = sum(p.size / 2 for p in mine) + 1.0
            assert abs(got - want) <= tol, (ex.prompt.text, color, got, want)
        for p in ex.placed:
            assert p.size / 2 <= p.cx <= shapes.SIZE - p.size / 2
            assert p.size / 2 <= p.cy <= shapes.SIZE - p.size / 2
            centre = ex.image[int(p.cy), int(p.cx)]
            np.testing.assert_array_equal(centre, shapes.COLORS[p.obj.color])
        if ex.prompt.relation:
            a, b = ex.placed
            assert shapes.relation_holds(a, b, ex.prompt.relation, margin=(a.size + b.size) / 2)
    assert set(tags) == set(shapes.TAGS)


def test_held_out_combinations_never_reach_the_training_split():
    train, held = set(shapes.split_prompts("train")), set(shapes.split_prompts("eval"))
    assert not train & held and train | held == set(shapes.all_prompts())
    for p in train:
        assert not any((o.color, o.shape) in shapes.HELD_OUT_PAIRS for o in p.objects), p.text
    for pair in shapes.HELD_OUT_PAIRS:  # each held-out pair is evaluated, alone and in scenes
        assert any(p.objects[0] == shapes.Obj(*pair) and p.tag == "single" for p in held)
    source = shapes.ShapesSource("train", seed=0)
    seen = {source.example(i).prompt for i in range(500)}
    assert seen <= train
    evals = shapes.eval_prompts(40, seed=2)
    assert set(evals) <= held and evals == shapes.eval_prompts(40, seed=2)
    assert collections.Counter(p.tag for p in evals) == dict.fromkeys(shapes.TAGS, 10)


def test_tfds_copy_reads_back_through_the_input_pipeline(tmp_path):
    report = shapes.build_shapes_dataset(tmp_path, num_examples=12, shard_size=5, seed=2)
    assert report.complete and report.examples == 12 and report.num_shards == 3
    source = shapes.ShapesSource("train", seed=2, size=12)
    stored = tfds.builder_from_directory(str(tmp_path)).as_data_source("train")
    assert len(stored) == 12
    row = stored[7]
    assert row["caption"].decode() == source[7]["caption"]
    assert json.loads(row["attributes"]) == json.loads(source[7]["attributes"])
    ds = make_dataset(
        tmp_path,
        batch_size=4,
        shuffle=False,
        resolution=shapes.SIZE,
        num_epochs=1,
        shard=grain.sharding.NoSharding(),
    )
    batches = list(ds)
    assert len(batches) == 3
    images = np.concatenate([b["image"] for b in batches])
    want = to_model_range(np.stack([source[i]["image"] for i in range(12)]))
    np.testing.assert_array_equal(images, want)  # PNG is lossless; 32 px needs no resize
    assert [c for b in batches for c in b["caption"]] == [source[i]["caption"] for i in range(12)]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown colour 'mauve'"):
        shapes.Obj("mauve", "circle")
    with pytest.raises(ValueError, match="split='test'"):
        shapes.split_prompts("test")
    with pytest.raises(ValueError, match="unknown word.*'dodecahedron'"):
        tokenize(["a red dodecahedron"], shapes.VOCAB, shapes.TEXT_LEN)
