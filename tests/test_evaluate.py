"""The shapes evaluator: near-perfect on clean renders, near zero on noise and on mismatched
captions, and each attribute check against hand-made detections."""

import numpy as np
import pytest

from distill_jax import evaluate as ev
from distill_jax.data import shapes
from distill_jax.pipeline.toy import from_latents

Obj, Prompt, Detected = shapes.Obj, shapes.Prompt, ev.Detected


def _examples(split: str, n: int, seed: int):
    source = shapes.ShapesSource(split, seed=seed)
    exs = [source.example(i) for i in range(n)]
    return np.stack([e.image for e in exs]), [e.prompt for e in exs], exs


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_clean_renders_score_at_least_98_percent(split):
    images, prompts, _ = _examples(split, 240, seed=11)
    summary, _ = ev.evaluate_images(images, prompts)
    for attribute in ev.ATTRIBUTES:
        assert summary[attribute] >= 0.98, (attribute, summary)
    assert set(summary["by_tag"]) == set(shapes.TAGS)


def test_detections_locate_the_rendered_objects():
    """Centroids agree with the layout: a triangle's centroid lies s/6 below its box centre."""
    _, _, exs = _examples("train", 40, seed=5)
    for ex in exs:
        found = ev.detect(ex.image)
        assert len(found) == len(ex.placed)
        for p in ex.placed:
            cy = p.cy + (p.size / 6 if p.obj.shape == "triangle" else 0.0)
            d = min(np.hypot(f.cx - p.cx, f.cy - cy) for f in found)
            assert d < 0.6, (ex.prompt.text, p)  # thresholding moves an edge by < 1/2 px


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_noise_scores_near_zero(kind):
    rng = np.random.default_rng(0)
    if kind == "gaussian":  # what an untrained model's pixels look like
        images = from_latents(rng.standard_normal((120, 48, shapes.SIZE // 4, shapes.SIZE // 4)))
    else:
        images = rng.integers(0, 256, (120, shapes.SIZE, shapes.SIZE, 3), dtype=np.uint8)
    summary, _ = ev.evaluate_images(images, shapes.eval_prompts(120))
    for attribute in ev.ATTRIBUTES:
        assert summary[attribute] <= 0.05, (attribute, summary)


def test_mismatched_captions_score_low():
    images, prompts, _ = _examples("eval", 200, seed=3)
    summary, _ = ev.evaluate_images(images, prompts[1:] + prompts[:1])
    assert summary["overall"] <= 0.08 and summary["position"] <= 0.1, summary


A = Obj("red", "circle")
B = Obj("blue", "square")


def _d(obj, cx, cy):
    return Detected(obj.color, obj.shape, cx, cy, 50)


@pytest.mark.parametrize(
    "prompt, found, want",
    [
        (Prompt("single", (A,)), [_d(A, 10, 10)], dict(shape=1, color=1, count=1, overall=1)),
        (Prompt("single", (A,)), [], dict(shape=0, color=0, count=0, overall=0)),
        (  # one object too many
            Prompt("counting", (A, A)),
            [_d(A, 5, 5), _d(A, 20, 5), _d(A, 5, 20)],
            dict(shape=0, color=0, count=0, overall=0),
        ),
        (  # colours and shapes right, bound to the wrong objects
            Prompt("two_object", (A, B)),
            [_d(Obj("red", "square"), 5, 5), _d(Obj("blue", "circle"), 20, 5)],
            dict(shape=1, color=1, count=1, overall=0),
        ),
        (
            Prompt("position", (A, B), "left of"),
            [_d(B, 25, 10), _d(A, 5, 12)],
            dict(shape=1, color=1, count=1, position=1, overall=1),
        ),
        (
            Prompt("position", (A, B), "above"),
            [_d(A, 5, 20), _d(B, 25, 10)],
            dict(shape=1, color=1, count=1, position=0, overall=0),
        ),
        (  # within the margin: neither above nor below
            Prompt("position", (A, B), "below"),
            [_d(A, 5, 11), _d(B, 25, 10)],
            dict(shape=1, color=1, count=1, position=0, overall=0),
        ),
    ],
)
def test_score_checks_each_attribute(prompt, found, want):
    got = ev.score(prompt, found)
    want = {**dict.fromkeys(ev.ATTRIBUTES), **{k: bool(v) for k, v in want.items()}}
    assert got == want


def test_accuracy_averages_only_asked_attributes():
    scores = [
        dict(shape=True, color=True, count=True, position=None, overall=True),
        dict(shape=True, color=False, count=True, position=False, overall=False),
    ]
    got = ev.accuracy(scores, ["single", "position"])
    assert got["position"] == 0.0 and got["color"] == 0.5 and got["overall"] == 0.5
    assert got["by_tag"] == {"single": 1.0, "position": 0.0}
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        ev.evaluate_images(np.zeros((3, 32, 32, 3), np.uint8), [Prompt("single", (A,))] * 2)


def test_background_noise_measures_the_film_over_the_background():
    """0 on clean renders; a constant offset of the grey reads as itself; Gaussian noise of
    standard deviation sigma on the background reads as E|N(0, sigma)| = sigma sqrt(2 / pi)."""
    images = shapes.render_prompts(shapes.eval_prompts(16))
    assert np.array_equal(ev.background_noise(images), np.zeros(16))
    grey = np.all(images == 128, axis=-1, keepdims=True)
    shifted = np.where(grey, images + 6, images).astype(np.uint8)
    np.testing.assert_array_equal(ev.background_noise(shifted), np.full(16, 6.0))
    sigma = 10.0
    noise = np.random.default_rng(0).normal(0, sigma, images.shape)
    noisy = np.where(grey, np.clip(np.round(images + noise), 0, 255), images).astype(np.uint8)
    want = sigma * np.sqrt(2 / np.pi)
    np.testing.assert_allclose(ev.background_noise(noisy).mean(), want, rtol=0.03)
    red = np.zeros((1, 32, 32, 3), np.uint8)
    red[..., 0] = 255
    assert np.isnan(ev.background_noise(red)[0])  # no background at all
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        ev.background_noise(images[0])
