"""The toy pipeline on the real paths: its decode is the closed-form space-to-depth, generate
serves it with the samplers' own math, and its folder round-trips through save_toy and
load_pipeline."""

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


def test_decode_is_space_to_depth(teacher):
    """Known latents decode to ``from_latents`` of them (pixels (z + 1) 127.5, clipped); the
    latents of a clean render decode to the render exactly."""
    z = np.random.default_rng(0).standard_normal((2, 48, 8, 8)).astype(np.float32)
    got = teacher.decode(lat.pack(z), 32, 32)
    x = z.reshape(2, 3, 4, 4, 8, 8).transpose(0, 4, 2, 5, 3, 1).reshape(2, 32, 32, 3)
    want = np.round(np.clip((x + 1) * 127.5, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, toy.from_latents(z))
    images = shapes.render_prompts(shapes.eval_prompts(3))
    np.testing.assert_array_equal(teacher.decode(lat.pack(toy.to_latents(images)), 32, 32), images)


@pytest.mark.parametrize("method", ["teacher", "scm"])
def test_generate_is_the_sampler_on_encoded_prompts(teacher, method):
    """generate = encode -> denoise on the packed noise -> decode, as the toy's own sampler was."""
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (3, 48, 8, 8)))
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
    t5, pooled = toy.encode_text(teacher.t5, PROMPTS, shapes.VOCAB, shapes.TEXT_LEN)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), 1), 0)
    packed = denoise(
        teacher,
        lat.pack(noise),
        t5,
        pooled,
        np.zeros((shapes.TEXT_LEN, 3)),
        lat.image_ids(8, 8),
        method=method,
        steps=2,
        guidance=None,
        key=key,
    )
    np.testing.assert_array_equal(got, toy.from_latents(lat.unpack(np.asarray(packed), 8, 8)))


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
    with pytest.raises(ValueError, match="needs vocab, text_len and patch"):
        load_pipeline(saved)
