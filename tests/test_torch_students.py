"""Exported students sampled in PyTorch (``distill_jax.torch_students``) against the JAX samplers.

Each model is a tiny random float32 FLUX built in JAX (every parameter drawn, norm scales and the
students' heads included), written with ``save_model`` and ``distill-jax export``, and loaded in
PyTorch from the exported folder alone. The same packed noise, prompt embeddings and (sCM) per-step
noise go to both sides. Latents are compared in standard latent units, where one unit decodes to
about one pixel range: mean |diff| <= 1/255, and float32 agreement (max |diff| <= 1e-4 of the
latents' scale) besides; whole pipelines are compared as images, mean |diff| <= 1/255.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from distill_jax.convert import convert, export
from distill_jax.folders import load_pipeline, save_model
from distill_jax.models.flux import Flux, FluxConfig
from distill_jax.pipeline import latents as lat
from distill_jax.pipeline.generate import denoise, generate
from distill_jax.torch_students import (
    FluxStudent,
    FluxStudentPipeline,
    euler_sample,
    meanflow_sample,
    scm_sample,
)

IMAGE_TOL = 1 / 255
TEACHER = FluxConfig.tiny()  # stock: time_scale 1000, guidance embedded
STUDENTS = {
    "teacher": TEACHER,
    "scm": TEACHER.replace(time_scale=1.0, logvar_head=True),
    "meanflow": TEACHER.replace(time_scale=1.0, delta_embed=True),
}
# The toy world's structure: no guidance embedding, FLUX's 64 packed channels and head width.
TOY = FluxConfig.toy().replace(time_scale=1.0)
GUIDANCE = {"teacher": 3.5, "scm": 4.5, "meanflow": 3.5}
TORCH_SAMPLERS = {"teacher": euler_sample, "scm": scm_sample, "meanflow": meanflow_sample}


def random_flux(cfg: FluxConfig, seed: int = 0) -> Flux:
    """A Flux with every parameter drawn (scales and biases too, away from their inits, so that
    no swapped or dropped tensor can hide): N(0, 0.2^2), kernels at most 1 / sqrt(fan-in)."""
    model = Flux(cfg, rngs=nnx.Rngs(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 10_000))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        std = 0.2 if value.ndim < 2 else min(0.2, value.shape[0] ** -0.5)  # kernels: [in, out]
        var.set_value(std * jax.random.normal(next(keys), value.shape, value.dtype))
    return model


def exported(model: Flux, tmp_path) -> FluxStudent:
    path = save_model(model, tmp_path / "jax")
    out = export(path, tmp_path / "hf", progress=False)
    return FluxStudent.from_pretrained(out)


def report(name: str, ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))
    scale = np.abs(np.asarray(ref, np.float64)).mean()
    print(f"\n{name}: mean |diff| {diff.mean():.2e}, max {diff.max():.2e} (mean |x| {scale:.2f})")
    return float(diff.mean()), float(diff.max())


@pytest.mark.parametrize(
    "method,steps,toy",
    [
        ("teacher", 28, False),
        ("scm", 1, False),
        ("scm", 2, False),
        ("meanflow", 1, False),
        ("meanflow", 4, False),
        ("scm", 2, True),
        ("meanflow", 2, True),
    ],
)
def test_exported_student_samples_the_jax_latents(method, steps, toy, tmp_path):
    cfg = STUDENTS[method]
    if toy:
        cfg = TOY.replace(logvar_head=cfg.logvar_head, delta_embed=cfg.delta_embed)
    guidance = GUIDANCE[method] if cfg.guidance_embed else None
    model = random_flux(cfg)
    student = exported(model, tmp_path)
    assert student.method == method and student.time_scale == cfg.time_scale
    rng = np.random.default_rng(0)
    b, (h, w), s = 2, (8, 6), 7  # latent 8 x 6: 12 tokens
    noise = rng.standard_normal((b, (h // 2) * (w // 2), cfg.in_channels)).astype(np.float32)
    t5 = rng.standard_normal((b, s, cfg.context_dim)).astype(np.float32)
    pooled = rng.standard_normal((b, cfg.pooled_dim)).astype(np.float32)
    img_ids, txt_ids = lat.image_ids(h, w), np.zeros((s, 3), np.float32)
    key = jax.random.PRNGKey(3)
    ours = denoise(
        types.SimpleNamespace(transformer=model),
        noise,
        jnp.asarray(t5),
        jnp.asarray(pooled),
        txt_ids,
        img_ids,
        method=method,
        steps=steps,
        guidance=guidance,
        key=key,
    )
    kw = {}
    if method == "scm":  # the JAX sampler's per-step draws, handed to PyTorch
        kw["step_noise"] = [
            torch.from_numpy(np.array(jax.random.normal(k, noise.shape, jnp.float32)))
            for k in jax.random.split(key, steps)[: steps - 1]
        ]
    ref = TORCH_SAMPLERS[method](
        student,
        torch.from_numpy(noise),
        torch.from_numpy(t5),
        torch.from_numpy(pooled),
        torch.from_numpy(img_ids),
        torch.from_numpy(txt_ids),
        steps=steps,
        guidance=guidance,
        **kw,
    ).numpy()
    mean, worst = report(f"{method} {steps} step(s){', toy structure' if toy else ''}", ours, ref)
    assert mean <= IMAGE_TOL
    assert worst <= 1e-4 * max(1.0, float(np.abs(ref).max())), worst
    assert np.abs(ref).mean() > 0.1  # a sample, not zeros


def test_meanflow_student_needs_its_delta_and_uses_it(tmp_path):
    """Without ``t - r`` a MeanFlow student refuses to run, and ``t - r`` changes its output
    (so the second time embedder is really wired in)."""
    student = exported(random_flux(STUDENTS["meanflow"]), tmp_path)
    cfg = STUDENTS["meanflow"]
    x = dict(
        hidden_states=torch.randn(1, 4, cfg.in_channels),
        encoder_hidden_states=torch.randn(1, 3, cfg.context_dim),
        pooled_projections=torch.randn(1, cfg.pooled_dim),
        timestep=torch.tensor([0.7]),
        img_ids=torch.from_numpy(lat.image_ids(4, 4)),
        txt_ids=torch.zeros(3, 3),
        guidance=torch.tensor([3.5]),
    )
    with pytest.raises(ValueError, match="timestep2"):
        student(**x)
    with torch.no_grad():
        a = student(**x, timestep2=torch.tensor([0.0])).sample
        b = student(**x, timestep2=torch.tensor([0.5])).sample
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="through FluxStudent"):
        student.transformer(**{**x, "timestep": x["timestep"] / 1000})


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A tiny diffusers FluxPipeline on disk and its distill-jax conversion."""
    from test_text_encoding import tiny_flux_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    pipe = tiny_flux_pipeline(root / "build", TEACHER.replace(pooled_dim=32))
    pipe.save_pretrained(root / "flux")
    return root / "flux", convert(root / "flux", root / "jax", dtype="float32", progress=False)


@pytest.mark.parametrize("method,steps", [("scm", 1), ("meanflow", 4)])
def test_student_pipeline_draws_the_jax_image(tiny_pipeline, method, steps, tmp_path):
    """``FluxStudentPipeline.from_pretrained(base, transformer=student)`` against distill-jax's
    ``generate`` with the same student: same prompts, same noise, same picture."""
    flux_dir, jax_dir = tiny_pipeline
    cfg = STUDENTS[method].replace(pooled_dim=32)
    model = random_flux(cfg, seed=5)
    student = exported(model, tmp_path)
    pipe = FluxStudentPipeline.from_pretrained(flux_dir, transformer=student)
    prompts, height, width = ["a red cube", "two blue stars"], 64, 48
    noise = np.random.default_rng(1).standard_normal((2, 4, 8, 6)).astype(np.float32)
    images = pipe(
        prompts,
        height=height,
        width=width,
        num_inference_steps=steps,
        latents=torch.from_numpy(np.asarray(lat.pack(noise))),
        max_sequence_length=16,
        output_type="np",
    ).images  # float [N, H, W, 3] in [0, 1]
    jax_pipe = dataclasses.replace(load_pipeline(jax_dir), transformer=model)
    ours = generate(
        jax_pipe,
        prompts,
        height=height,
        width=width,
        steps=steps,
        guidance=GUIDANCE[method],
        init_noise=noise,
        method=method,
        max_sequence_length=16,
    )
    mean, _ = report(f"{method} {steps} step(s), images", ours / 255.0, images)
    assert mean <= IMAGE_TOL and images.std() > 0.01


def test_the_two_worlds_stay_apart():
    """torch and diffusers enter only through distill_jax.torch_students, which needs no JAX."""
    code = (
        "import sys, importlib\n"
        "for m in ('distill_jax.cli', 'distill_jax.convert', 'distill_jax.folders',\n"
        "          'distill_jax.pipeline.generate', 'distill_jax.train'):\n"
        "    importlib.import_module(m)\n"
        "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))\n"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split("\n")[-2]
        == "[]"
    )
    code = "import sys, distill_jax.torch_students\nprint('jax' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == "False"


def test_a_rescaled_teacher_runs_in_stock_flux_pipeline(tiny_pipeline, tmp_path):
    """The time-scale glue alone makes a time_scale=1 model a FluxPipeline transformer: stock
    FluxPipeline (Euler) and FluxStudentPipeline draw the same image."""
    from diffusers import FluxPipeline

    flux_dir, _ = tiny_pipeline
    student = exported(random_flux(TEACHER.replace(pooled_dim=32, time_scale=1.0)), tmp_path)
    assert student.method == "teacher"
    noise = torch.from_numpy(
        np.asarray(
            lat.pack(np.random.default_rng(2).standard_normal((1, 4, 8, 6)).astype(np.float32))
        )
    )
    kw = dict(
        height=64,
        width=48,
        num_inference_steps=4,
        guidance_scale=3.5,
        latents=noise,
        max_sequence_length=16,
        output_type="np",
    )
    stock = FluxPipeline.from_pretrained(flux_dir, transformer=student)("a red cube", **kw).images
    ours = FluxStudentPipeline.from_pretrained(flux_dir, transformer=student)("a red cube", **kw)
    mean, _ = report(
        "rescaled teacher, stock FluxPipeline vs FluxStudentPipeline", ours.images, stock
    )
    assert mean <= 1e-5 and stock.std() > 0.01


def test_structure_beyond_diffusers_survives_export(tmp_path):
    """The toy's MLP ratio (2; diffusers builds 4) is written beside diffusers' config, so that
    both FluxStudent and ``distill-jax convert`` read the exported folder back as it was."""
    cfg = TOY.replace(delta_embed=True, delta_init="zero", num_single=1)
    student = exported(random_flux(cfg), tmp_path)
    assert student.transformer.single_transformer_blocks[0].proj_mlp.out_features == cfg.mlp_hidden
    back = convert(tmp_path / "hf", tmp_path / "back", progress=False)
    from distill_jax.folders import load_flux

    assert load_flux(back).cfg == cfg
