"""The toy pipeline on the real paths: its decode is the closed-form space-to-depth, generate
serves it with the samplers' own math, and its folder round-trips through save_toy and
load_pipeline."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from distill_jax.data import shapes
from distill_jax.folders import load_flux, load_pipeline, save_toy
from distill_jax.pipeline import latents as lat
from distill_jax.pipeline import toy
from distill_jax.pipeline.generate import denoise, generate

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a cyan circle"]


@pytest.fixture(scope="module")
def teacher():
    return load_pipeline(toy.TEACHER_PATH)


def test_pixel_autoencoder_is_space_to_depth():
    """Autoencoder.pixels decodes known latents to the pixels (z + 1) 127.5 folded 4x4, clipped,
    and encodes a render back to exactly those latents (to_latents / from_latents)."""
    z = np.random.default_rng(0).standard_normal((2, 48, 8, 8)).astype(np.float32)
    got = toy.Autoencoder.pixels(4).decode(z)
    x = z.reshape(2, 3, 4, 4, 8, 8).transpose(0, 4, 2, 5, 3, 1).reshape(2, 32, 32, 3)
    want = np.round(np.clip((x + 1) * 127.5, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, toy.from_latents(z))
    images = shapes.render_prompts(shapes.eval_prompts(3))
    np.testing.assert_array_equal(toy.from_latents(toy.to_latents(images)), images)


def test_fitted_autoencoder_is_a_projection_the_evaluator_reads():
    """The fitted basis is orthonormal; decode(encode(x)) is the least-squares projection of
    each patch onto the basis (numpy's lstsq, before rounding); latents have unit variance; and
    decoded clean renders score as the renders do."""
    from distill_jax import evaluate as ev

    source = shapes.ShapesSource("train", seed=5)
    ae = toy.Autoencoder.fit(np.stack([source[i]["image"] for i in range(512)]), 16, 8)
    np.testing.assert_allclose(ae.basis @ ae.basis.T, np.eye(16), atol=1e-5)
    prompts = shapes.eval_prompts(64, seed=1)
    images = shapes.render_prompts(prompts)
    z = ae.encode(images)
    assert z.shape == (64, 16, 4, 4) and abs(float(z.std()) - 1.0) < 0.1
    x = (images.astype(np.float64) / 127.5 - 1).reshape(64, 4, 8, 4, 8, 3)
    patches = x.transpose(0, 1, 3, 5, 2, 4).reshape(-1, 192) - ae.mean
    coef = np.linalg.lstsq(ae.basis.T.astype(np.float64), patches.T, rcond=None)[0].T
    want = (coef @ ae.basis + ae.mean).reshape(64, 4, 4, 3, 8, 8).transpose(0, 1, 4, 2, 5, 3)
    want = np.round(np.clip((want.reshape(64, 32, 32, 3) + 1) * 127.5, 0, 255))
    assert np.abs(ae.decode(z).astype(int) - want).max() <= 1  # rounding at .5 only
    np.testing.assert_allclose(z.transpose(0, 2, 3, 1).reshape(-1, 16), coef * ae.scale, atol=1e-4)
    summary, _ = ev.evaluate_images(ae.decode(z), prompts)
    assert summary["overall"] == 1.0
    again = toy.Autoencoder.from_json(json.loads(json.dumps(ae.to_json())))
    np.testing.assert_array_equal(again.encode(images), z)


def test_mask_colour_autoencoder_holds_shape_and_colour_apart():
    """Clean renders round-trip exactly and score 100%; the colour channels of an occupied patch
    are (colour - background) x colour_scale and of an empty one zero; a red and a blue circle in
    one place have the same mask channels; decode is the renderer's blend of a known latent."""
    from distill_jax import evaluate as ev

    source = shapes.ShapesSource("train", seed=5)
    ae = toy.MaskColourAutoencoder.fit(np.stack([source[i]["image"] for i in range(512)]), 16, 8)
    assert ae.channels == 16
    prompts = shapes.eval_prompts(64, seed=1)
    images = shapes.render_prompts(prompts)
    z = ae.encode(images)
    assert z.shape == (64, 16, 4, 4) and abs(float(z.std()) - 1.0) < 0.1
    np.testing.assert_array_equal(ae.decode(z), images)
    assert ev.evaluate_images(ae.decode(z), prompts)[0]["overall"] == 1.0

    def circle(colour):
        return shapes.render([shapes.Placed(shapes.Obj(colour, "circle"), 8.0, 8.0, 12.0)])

    red, blue = ae.encode(np.stack([circle("red"), circle("blue")]))
    np.testing.assert_allclose(red[:13], blue[:13], atol=1e-5)
    bg = np.asarray(shapes.BACKGROUND) / 127.5 - 1
    for z1, colour in ((red, "red"), (blue, "blue")):
        want = (np.asarray(shapes.COLORS[colour]) / 127.5 - 1 - bg) * ae.colour_scale
        np.testing.assert_allclose(
            z1[13:, :2, :2], np.broadcast_to(want[:, None, None], (3, 2, 2)), atol=1e-5
        )
        np.testing.assert_array_equal(z1[13:, 2:], 0.0)
        np.testing.assert_array_equal(z1[13:, :, 2:], 0.0)

    m = np.random.default_rng(0).uniform(-0.5, 1.5, (1, 4, 4, 64)).astype(np.float32)
    c = np.random.default_rng(1).uniform(-1, 1, (1, 4, 4, 3)).astype(np.float32)
    zc = np.concatenate(
        [(m - ae.mask_mean) @ ae.mask_basis.T * ae.mask_scale, c * ae.colour_scale], -1
    )
    projected = ((m - ae.mask_mean) @ ae.mask_basis.T @ ae.mask_basis + ae.mask_mean).reshape(
        4, 4, 8, 8
    )
    pixels = bg + np.clip(projected, 0, 1)[..., None] * c[0][:, :, None, None, :]  # [h, w, 8, 8, 3]
    want = np.round(
        np.clip((pixels.transpose(0, 2, 1, 3, 4).reshape(32, 32, 3) + 1) * 127.5, 0, 255)
    )
    got = ae.decode(zc.transpose(0, 3, 1, 2))[0].astype(int)
    assert np.abs(got - want).max() <= 1  # rounding at .5 only
    again = toy.autoencoder_from_json(json.loads(json.dumps(ae.to_json())))
    assert isinstance(again, toy.MaskColourAutoencoder)
    np.testing.assert_array_equal(again.encode(images), z)
    with pytest.raises(ValueError, match="autoencoder kind 'vq'"):
        toy.autoencoder_from_json({**ae.to_json(), "kind": "vq"})


@pytest.mark.parametrize("context", [0, 1, 2])
def test_text_context_folds_neighbouring_words_into_each_token(context):
    """Each word's token is its embedding, plus (context >= 1) its predecessor's rolled by a third
    of the width, plus (context 2) its successor's rolled by two thirds (no neighbour past either
    end; nothing added to padding), plus the position; then the final norm."""
    t5 = toy.new_text_encoder(len(shapes.VOCAB), seed=3, num_layers=0)
    prompts = ["a red circle", "two blue squares", "a red circle left of a blue square"]
    got, pooled = toy.encode_text(t5, prompts, shapes.VOCAB, shapes.TEXT_LEN, context=context)
    ids = toy.tokenize(prompts, shapes.VOCAB, shapes.TEXT_LEN)
    e = np.asarray(t5.embed.embedding[...])[ids]  # [B, S, D]
    x = e.copy()
    for b, prompt in enumerate(prompts):
        n = len(prompt.split())
        for i in range(n):
            if context >= 1 and i > 0:
                x[b, i] += np.roll(e[b, i - 1], 21)
            if context >= 2 and i + 1 < n:
                x[b, i] += np.roll(e[b, i + 1], 42)
    x = x + toy._sinusoid(shapes.TEXT_LEN, 64)
    w = np.asarray(t5.final_norm.scale[...])
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + t5.final_norm.eps) * w
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    words = (ids > 0)[..., None]
    np.testing.assert_allclose(np.asarray(pooled), (want * words).sum(1) / words.sum(1), atol=1e-5)
    with pytest.raises(ValueError, match="text context=3"):
        toy.encode_text(t5, prompts, shapes.VOCAB, shapes.TEXT_LEN, context=3)


def test_teacher_decodes_with_its_autoencoder(teacher):
    z = np.random.default_rng(0).standard_normal((2, teacher.latent_channels, 4, 4))
    got = teacher.decode(lat.pack(z.astype(np.float32)), 32, 32)
    np.testing.assert_array_equal(got, teacher.autoencoder.decode(z))


@pytest.mark.parametrize("method", ["teacher", "scm"])
def test_generate_is_the_sampler_on_encoded_prompts(teacher, method):
    """generate = encode -> denoise on the packed noise -> decode, as the toy's own sampler was."""
    c, (h, w) = teacher.latent_channels, lat.latent_size(32, 32, vae_scale_factor=8)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (3, c, h, w)))
    got = generate(
        teacher,
        PROMPTS,
        height=32,
        width=32,
        steps=2,
        guidance=None,
        init_noise=noise,
        method=method,
        seed=3,
    )
    t5, pooled = toy.encode_text(
        teacher.t5, PROMPTS, shapes.VOCAB, shapes.TEXT_LEN, context=teacher.text_context
    )
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), 1), 0)
    packed = denoise(
        teacher,
        lat.pack(noise),
        t5,
        pooled,
        np.zeros((shapes.TEXT_LEN, 3)),
        lat.image_ids(h, w),
        method=method,
        steps=2,
        guidance=None,
        key=key,
    )
    want = teacher.autoencoder.decode(lat.unpack(np.asarray(packed), h, w))
    np.testing.assert_array_equal(got, want)


def test_toy_folder_round_trips(teacher, tmp_path):
    """save_toy writes what load_pipeline reads back as the same toy pipeline (and load_flux as
    its transformer); a folder of another shape of world is named."""
    saved = save_toy(teacher, tmp_path / "copy", {"note": "kept"})
    again = load_pipeline(saved)
    assert isinstance(again, toy.ToyPipeline) and again.world() == teacher.world()
    for module in ("transformer", "t5"):
        a, b = (nnx.state(getattr(p, module), nnx.Param) for p in (teacher, again))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
    assert load_flux(saved).cfg == teacher.transformer.cfg
    (saved / toy.META_FILE).write_text('{"world": {"vocab": ["<pad>"]}}')
    with pytest.raises(ValueError, match="needs vocab, text_len and an autoencoder"):
        load_pipeline(saved)


def test_shipped_teacher_metadata_matches_a_fresh_measurement(teacher):
    """toy.json's held-out accuracy (512 prompts at full steps) agrees with a measurement on the
    first 96 of the same prompts within 4 binomial standard deviations."""
    from distill_jax.demo import measure_toy

    meta = json.loads((toy.TEACHER_PATH / toy.META_FILE).read_text())
    recorded = meta["evaluation"]
    assert recorded["prompts"] >= 512 and recorded["steps"] == meta["teacher_steps"]
    fresh = measure_toy(teacher, steps=recorded["steps"], num_prompts=96, batch_size=96)
    for attribute in ("overall", "shape", "color", "count"):
        p = recorded["accuracy"][attribute]
        sigma = max(np.sqrt(p * (1 - p) / 96), 1 / 96)
        assert abs(fresh["accuracy"][attribute] - p) <= 4 * sigma, attribute
