"""Latent packing, image ids and end-to-end sampling against diffusers' FluxPipeline.

The diffusers pipeline and ours share tiny random weights and the tokenizers (built offline in
``test_text_encoding.py``) and start from the same noise. Tolerances, float32 throughout:
final latents agree to 1e-5 of their max |value| (measured: ~6e-7); decoded uint8 images differ by
at most 1 level anywhere (rounding at .5 boundaries can flip one) and 99% of the values are equal
(measured: 99.98%).
The sCM and MeanFlow samplers have no diffusers pipeline; they are checked against the spec's
formulas written out in PyTorch around the diffusers transformer (sCM) and against the teacher
(MeanFlow with a zero Δ embedder is the teacher's Euler sampler).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from flax import nnx
from PIL import Image
from test_text_encoding import PROMPTS, assert_close, tiny_flux_pipeline, to_pipeline

from distill_jax.models.flux import Flux, reset_delta_embedder
from distill_jax.pipeline import latents as lat
from distill_jax.pipeline.generate import denoise, generate
from distill_jax.pipeline.images import image_grid, save_images
from distill_jax.pipeline.text import encode_prompts

LATENT_TOL = 1e-5
SEQ = 16  # T5 tokens
GUIDANCE = 3.5


@dataclasses.dataclass(frozen=True)
class Case:
    height: int
    width: int
    steps: int


CASES = [Case(32, 32, 2), Case(48, 64, 4)]  # 2x2 and 3x4 image tokens (latent 4x4 and 6x8)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(diffusers FluxPipeline, our Pipeline) sharing weights and tokenizers."""
    pipe = tiny_flux_pipeline(tmp_path_factory.mktemp("flux"))
    return pipe, to_pipeline(pipe)


def noise_for(case: Case, n: int, seed: int = 0) -> np.ndarray:
    """Standard normal ``[n, C, h, w]`` (C = 4 latent channels of the tiny VAE)."""
    h, w = lat.latent_size(case.height, case.width)
    return np.random.default_rng(seed).standard_normal((n, 4, h, w)).astype(np.float32)


def diffusers_run(pipe: FluxPipeline, prompts, case: Case, noise: np.ndarray, output_type: str):
    """diffusers' own sampling from our noise, packed by diffusers' own packer."""
    b, c, h, w = noise.shape
    packed = FluxPipeline._pack_latents(torch.tensor(noise), b, c, h, w)
    with torch.no_grad():
        return pipe(
            prompts,
            height=case.height,
            width=case.width,
            num_inference_steps=case.steps,
            guidance_scale=GUIDANCE,
            latents=packed,
            output_type=output_type,
            max_sequence_length=SEQ,
        ).images


def assert_images_close(ours: np.ndarray, ref01: np.ndarray) -> None:
    """uint8 ``ours`` against diffusers' ``output_type="np"`` floats in [0, 1]."""
    ref = np.round(ref01 * 255).astype(np.int32)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = np.abs(ours.astype(np.int32) - ref)
    assert diff.max() <= 1, f"max difference {diff.max()} uint8 levels"
    assert np.mean(diff == 0) >= 0.99, f"only {np.mean(diff == 0):.4f} of the values are equal"
    assert ref.std() > 5, "degenerate reference image: the test would not see errors"


# --- latent geometry ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 4, 4, 4), (3, 16, 6, 8), (1, 5, 10, 2)])
def test_pack_and_unpack_match_diffusers(shape):
    b, c, h, w = shape
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = FluxPipeline._pack_latents(torch.from_numpy(x), b, c, h, w).numpy()
    np.testing.assert_array_equal(lat.pack(x), ref)
    np.testing.assert_array_equal(lat.pack(jnp.asarray(x)), ref)
    # diffusers unpacks from pixel sizes with the VAE factor; ours from the latent size.
    back = FluxPipeline._unpack_latents(torch.from_numpy(ref), h * 8, w * 8, 8).numpy()
    np.testing.assert_array_equal(lat.unpack(ref, h, w), back)
    np.testing.assert_array_equal(lat.unpack(lat.pack(x), h, w), x)


@pytest.mark.parametrize("grid", [(2, 2), (3, 4), (32, 32)])
def test_image_ids_match_diffusers(grid):
    ref = FluxPipeline._prepare_latent_image_ids(1, *grid, "cpu", torch.float32).numpy()
    ours = lat.image_ids(2 * grid[0], 2 * grid[1])
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("pixels, latent", [((512, 512), (64, 64)), ((48, 64), (6, 8))])
def test_latent_size(pixels, latent):
    assert lat.latent_size(*pixels) == latent


@pytest.mark.parametrize("height, width", [(40, 64), (64, 0), (64, 72)])
def test_latent_size_refuses_sizes_diffusers_would_round(height, width):
    bad = height if height % 16 else width
    name = "height" if height % 16 else "width"
    with pytest.raises(ValueError, match=f"{name}={bad} must be a positive multiple of 16"):
        lat.latent_size(height, width)


def test_pack_rejects_bad_shapes():
    with pytest.raises(ValueError, match="even"):
        lat.pack(np.zeros((1, 4, 3, 4)))
    with pytest.raises(ValueError, match=r"\[B, 4, 4C\] for a 4x4 latent"):
        lat.unpack(np.zeros((1, 5, 16)), 4, 4)


# --- sampling against diffusers -------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.height}x{c.width}_{c.steps}steps")
def test_teacher_matches_diffusers(pipes, case):
    pipe, ours = pipes
    prompts = PROMPTS[:2]
    noise = noise_for(case, len(prompts))
    h, w = noise.shape[2:]

    ref = diffusers_run(pipe, prompts, case, noise, "latent").numpy()  # [B, L, 4C]
    t5, pooled, txt_ids = encode_prompts(ours, prompts, max_sequence_length=SEQ)
    out = denoise(
        ours, lat.pack(noise), t5, pooled, txt_ids, lat.image_ids(h, w),
        steps=case.steps, guidance=GUIDANCE,
    )  # fmt: skip
    assert_close(out, ref, LATENT_TOL)
    assert np.abs(ref - lat.pack(noise)).max() > 0.1, "sampling left the noise unchanged"

    images = generate(
        ours,
        prompts,
        height=case.height,
        width=case.width,
        steps=case.steps,
        guidance=GUIDANCE,
        init_noise=noise,
        max_sequence_length=SEQ,
    )
    assert images.shape == (2, case.height, case.width, 3)
    assert_images_close(images, diffusers_run(pipe, prompts, case, noise, "np"))


def test_seeded_noise_and_padded_batches_match_diffusers(pipes):
    """Three prompts in batches of two (the last padded) from ``seed``: the same images as
    diffusers sampling all three at once from ``jax.random.normal(PRNGKey(seed))``."""
    pipe, ours = pipes
    case, seed = CASES[0], 7
    h, w = lat.latent_size(case.height, case.width)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (3, 4, h, w), jnp.float32))
    images = generate(
        ours,
        PROMPTS,
        height=case.height,
        width=case.width,
        steps=case.steps,
        guidance=GUIDANCE,
        seed=seed,
        max_sequence_length=SEQ,
        batch_size=2,
    )
    assert_images_close(images, diffusers_run(pipe, PROMPTS, case, noise, "np"))


def test_decode_matches_diffusers_vae(pipes):
    pipe, ours = pipes
    case = CASES[1]
    packed = lat.pack(noise_for(case, 2, seed=3))
    h, w = lat.latent_size(case.height, case.width)
    z = FluxPipeline._unpack_latents(torch.from_numpy(np.asarray(packed)), 48, 64, 8)
    with torch.no_grad():
        x = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor)
        ref = pipe.image_processor.postprocess(x.sample, output_type="np")
    assert_images_close(ours.decode(packed, case.height, case.width), ref)


def test_meanflow_with_zero_delta_is_the_teacher(pipes):
    """A MeanFlow student whose Δ embedder outputs zero is the teacher at every (t, r); MeanFlow's
    jumps on the shifted schedule are then exactly the teacher's Euler steps."""
    pipe, ours = pipes
    case = CASES[0]
    cfg = ours.transformer.cfg.replace(delta_embed=True, delta_init="zero")
    # Abstract, then every leaf filled: the teacher's weights, the Δ embedder from its time one.
    student = nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(1)))
    nnx.update(student, nnx.state(ours.transformer, nnx.Param))
    reset_delta_embedder(student, "zero")
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(student)))
    meanflow = dataclasses.replace(ours, transformer=student)

    noise = noise_for(case, 2, seed=5)
    h, w = noise.shape[2:]
    t5, pooled, txt_ids = encode_prompts(meanflow, PROMPTS[:2], max_sequence_length=SEQ)
    out = denoise(
        meanflow, lat.pack(noise), t5, pooled, txt_ids, lat.image_ids(h, w),
        method="meanflow", steps=case.steps, guidance=GUIDANCE,
    )  # fmt: skip
    assert_close(out, diffusers_run(pipe, PROMPTS[:2], case, noise, "latent").numpy(), LATENT_TOL)


def test_scm_one_step_matches_trigflow_formulas(pipes):
    """One sCM step from pi/2 with the TrigFlow wrapper of spec 1.3 written out in PyTorch around
    diffusers' transformer: x0 = cos t x - sin t sigma_d F, F from the flow velocity."""
    pipe, ours = pipes
    case, sigma_d, t = CASES[1], 0.5, 1.57080
    noise = noise_for(case, 2, seed=6)
    h, w = noise.shape[2:]
    z = torch.from_numpy(np.asarray(lat.pack(noise)))
    with torch.no_grad():
        t5_ref, pooled_ref, txt_ref = pipe.encode_prompt(
            PROMPTS[:2], prompt_2=None, max_sequence_length=SEQ
        )
        x = sigma_d * z  # the sampler's state x_t = sigma_d * x_hat_t
        s = math.sin(t) / (math.sin(t) + math.cos(t))
        n = math.sqrt(s * s + (1 - s) ** 2)
        x_s = n * x / sigma_d
        v = pipe.transformer(
            hidden_states=x_s,
            timestep=torch.full((2,), s),
            guidance=torch.full((2,), GUIDANCE),
            pooled_projections=pooled_ref,
            encoder_hidden_states=t5_ref,
            txt_ids=txt_ref,
            img_ids=torch.from_numpy(lat.image_ids(h, w)),
        ).sample
        F = ((1 - 2 * s) * x_s + (1 - 2 * s + 2 * s * s) * v) / n
        ref = (math.cos(t) * x - math.sin(t) * sigma_d * F) / sigma_d
    t5, pooled, txt_ids = encode_prompts(ours, PROMPTS[:2], max_sequence_length=SEQ)
    out = denoise(
        ours, z.numpy(), t5, pooled, txt_ids, lat.image_ids(h, w),
        method="scm", steps=1, guidance=GUIDANCE,
    )  # fmt: skip
    assert_close(out, ref.numpy(), LATENT_TOL)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(init_noise=np.zeros((3, 4, 4, 4), np.float32)),
            r"init_noise has shape \(3, 4, 4, 4\)",
        ),
        (dict(height=40), "height=40 must be a positive multiple of 16"),
        (dict(method="ddim"), "method='ddim'"),
        (dict(guidance=None), "pass a guidance value"),
        (dict(method="meanflow"), "needs a MeanFlow student"),
        (dict(batch_size=0), "batch_size=0"),
    ],
)
def test_bad_inputs_have_clear_errors(pipes, kwargs, match):
    _, ours = pipes
    args = dict(height=32, width=32, steps=1, max_sequence_length=SEQ)
    with pytest.raises(ValueError, match=match):
        generate(ours, PROMPTS[:2], **{**args, **kwargs})


def test_guidance_given_to_a_model_without_guidance_embedder(pipes):
    _, ours = pipes
    cfg = ours.transformer.cfg.replace(guidance_embed=False)
    no_guidance = dataclasses.replace(ours, transformer=Flux(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="no guidance embedder"):
        generate(no_guidance, "x", height=32, width=32, steps=1, guidance=3.5)


# --- writing images -------------------------------------------------------------------------


def test_save_images_and_grid(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
    paths = save_images(images, tmp_path / "out", ["one", "two", "three"])
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png", "grid.png"]
    with Image.open(paths[1]) as im:
        np.testing.assert_array_equal(np.asarray(im), images[1])
        assert im.text["prompt"] == "two"
    grid = image_grid(images, cols=2)  # 2 x 2 tiles, the last one black
    assert grid.shape == (32, 48, 3)
    np.testing.assert_array_equal(grid[16:, :24], images[2])
    np.testing.assert_array_equal(grid[:16, 24:], images[1])
    assert not grid[16:, 24:].any()
    with Image.open(paths[-1]) as im:
        assert im.size == (48, 32)  # default cols = ceil(sqrt(3)) = 2
    assert save_images(images[:1], tmp_path / "single")[-1].name == "00000.png"
    with pytest.raises(ValueError, match="uint8"):
        save_images(images.astype(np.float32), tmp_path)
