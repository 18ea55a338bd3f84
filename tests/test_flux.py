"""The FLUX MMDiT against diffusers' FluxTransformer2DModel, its key tables, sharding and AD.

Tolerances: float32 everywhere; outputs agree to 5e-5 of the output's scale (max |ref|). The
guidance path evaluates cos(1000·g·ω) with arguments in the thousands, which limits float32
agreement (spec flux-weights.md section 1).
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from distill_jax.models.flux import Flux, FluxConfig, reset_delta_embedder
from distill_jax.port.flux import (
    abstract_flux,
    flux_from_bfl,
    flux_from_diffusers,
    flux_to_bfl,
    flux_to_diffusers,
)
from distill_jax.port.params import flat_params, param_shapes
from distill_jax.port.table import PortError
from distill_jax.sharding import init_sharded, make_mesh, state_shardings

REL_TOL = 5e-5


@dataclasses.dataclass(frozen=True)
class Case:
    cfg: FluxConfig
    batch: int = 2
    grid: tuple[int, int] = (4, 6)  # latent grid after 2x2 packing: h x w tokens
    text_len: int = 5


CASES = {
    "guidance_1+1": Case(FluxConfig.tiny()),
    "no_guidance_2+3": Case(
        FluxConfig.tiny().replace(num_double=2, num_single=3, guidance_embed=False)
    ),
    "heads4_axes8-12-12": Case(
        FluxConfig.tiny().replace(num_heads=4, head_dim=32, axes_dim=(8, 12, 12)),
        batch=3,
        grid=(5, 3),
    ),
    "batch1_square_out_channels": Case(
        FluxConfig.tiny().replace(out_channels=8), batch=1, grid=(4, 4), text_len=7
    ),
}


def torch_flux(cfg: FluxConfig, seed: int = 0) -> FluxTransformer2DModel:
    """A diffusers FLUX with every weight random (norm scales too, so swaps cannot hide)."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        **{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def image_ids(h: int, w: int) -> np.ndarray:
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def inputs(case: Case, seed: int = 1) -> dict[str, np.ndarray]:
    cfg, b = case.cfg, case.batch
    rng = np.random.default_rng(seed)
    h, w = case.grid
    out = dict(
        hidden_states=rng.standard_normal((b, h * w, cfg.in_channels)).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((b, case.text_len, cfg.context_dim)).astype(
            np.float32
        ),
        pooled_projections=rng.standard_normal((b, cfg.pooled_dim)).astype(np.float32),
        timestep=rng.uniform(0, 1, b).astype(np.float32),
        img_ids=image_ids(h, w),
        txt_ids=np.zeros((case.text_len, 3), np.float32),
    )
    if cfg.guidance_embed:
        out["guidance"] = rng.uniform(1, 5, b).astype(np.float32)
    return out


def torch_forward(model, x: dict[str, np.ndarray], time_divisor: float = 1.0) -> np.ndarray:
    args = {k: torch.tensor(v) for k, v in x.items()}
    args["timestep"] = args["timestep"] / time_divisor
    if "guidance" in args:
        args["guidance"] = args["guidance"] / time_divisor
    with torch.no_grad():
        return model(**args).sample.numpy()


def assert_close(out, ref, rel=REL_TOL):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < rel, f"max error {err:.2e} of the output scale (tolerance {rel:.0e})"


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_diffusers(name):
    case = CASES[name]
    ref_model = torch_flux(case.cfg)
    model = flux_from_diffusers(state_dict(ref_model), case.cfg)
    x = inputs(case)
    assert_close(model(**x), torch_forward(ref_model, x))


def student_heads(cfg: FluxConfig, seed: int) -> dict[str, np.ndarray]:
    """Random diffusers-layout weights of a T2I-Distill student's extra heads (the Δ-time
    embedder and the log-variance head), in the paper's code's names."""
    rng = np.random.default_rng(seed)
    d, e = cfg.hidden, cfg.time_embed_dim
    shapes = {
        "timestep_embedder2.linear_1.weight": (d, e),
        "timestep_embedder2.linear_1.bias": (d,),
        "timestep_embedder2.linear_2.weight": (d, d),
        "timestep_embedder2.linear_2.bias": (d,),
        "logvar_linear.weight": (1, d),
        "logvar_linear.bias": (1,),
    }
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in shapes.items()}


def sharded_forward(model: Flux, x: dict, mesh) -> jax.Array:
    """``model(**x)`` jitted on ``mesh``, the batch split over ``("data", "fsdp")``."""
    graphdef, state = nnx.split(model)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    xs = {
        k: jax.device_put(v, batch_sharding) if k not in ("img_ids", "txt_ids") else v
        for k, v in x.items()
    }
    with jax.set_mesh(mesh):
        return jax.jit(lambda s, a: nnx.merge(graphdef, s)(**a))(state, xs)


def test_time_scale_one_matches_unscaled_reference():
    """time_scale=1 feeds t and g to the sinusoid as they are; diffusers always multiplies by
    1000, so the reference is diffusers fed t/1000 and g/1000."""
    case = CASES["guidance_1+1"]
    ref_model = torch_flux(case.cfg)
    cfg = case.cfg.replace(time_scale=1.0)
    model = flux_from_diffusers(state_dict(ref_model), cfg)
    x = inputs(case)
    x["timestep"] = np.array([0.05, 0.9], np.float32)
    x["guidance"] = np.array([4.0, 5.0], np.float32)
    assert_close(model(**x), torch_forward(ref_model, x, time_divisor=1000.0))
    # and it is a different function from the stock scale
    stock = flux_from_diffusers(state_dict(ref_model), case.cfg)
    assert np.abs(np.asarray(stock(**x)) - np.asarray(model(**x))).max() > 1e-2


@pytest.fixture(scope="module")
def full_width():
    """FLUX width (3072 = 24 x 128), one double and one single block, float32, random weights."""
    cfg = FluxConfig.flux1_dev().replace(
        num_double=1, num_single=1, in_channels=16, context_dim=64, pooled_dim=32
    )
    torch.manual_seed(0)
    ref_model = FluxTransformer2DModel(
        **{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    ).eval()
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return cfg, ref_model, flux_from_diffusers(state_dict(ref_model), cfg)


def test_full_width_blocks_match_diffusers(full_width):
    cfg, ref_model, model = full_width
    x = inputs(Case(cfg, batch=1, grid=(4, 4), text_len=8))
    assert_close(model(**x), torch_forward(ref_model, x), rel=2e-4)


def test_bfl_table_agrees_with_diffusers_single_file_converter(full_width):
    """diffusers' own single-file converter (which assumes FLUX width) turns our BFL export into
    exactly our diffusers export: an independent check of both tables."""
    _, _, model = full_width
    theirs = convert_flux_transformer_checkpoint_to_diffusers(
        {k: torch.from_numpy(v) for k, v in flux_to_bfl(model).items()}
    )
    ours = flux_to_diffusers(model)
    assert sorted(theirs) == sorted(ours)
    for k, v in theirs.items():
        assert np.array_equal(v.numpy(), ours[k]), k


@pytest.mark.parametrize("preset", ["flux1_dev", "flux1_schnell", "flux1_lite_8b"])
def test_presets_by_shape(preset):
    cfg = getattr(FluxConfig, preset)()
    ours = sum(int(np.prod(s)) for s in param_shapes(abstract_flux(cfg)).values())
    with torch.device("meta"):
        ref = FluxTransformer2DModel(
            **{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
        )
    assert ours == sum(p.numel() for p in ref.parameters())
    expected = {"flux1_dev": 11.90e9, "flux1_schnell": 11.90e9, "flux1_lite_8b": 8.16e9}[preset]
    assert abs(ours - expected) / expected < 0.01, ours


def test_from_diffusers_config():
    d = {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 8,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": [16, 56, 56],
    }
    assert FluxConfig.from_diffusers(d) == FluxConfig.flux1_lite_8b()
    assert FluxConfig.from_diffusers(d, time_scale=1.0).time_scale == 1.0
    with pytest.raises(ValueError, match="patch_size"):
        FluxConfig.from_diffusers({**d, "patch_size": 2})
    with pytest.raises(ValueError, match="axes_dim"):
        FluxConfig.from_diffusers({**d, "axes_dims_rope": [16, 56, 50]})


@pytest.mark.parametrize("heads", [False, True])
def test_diffusers_round_trip_is_bit_exact(heads):
    cfg = CASES["no_guidance_2+3"].cfg
    sd = state_dict(torch_flux(cfg))
    if heads:  # a T2I-Distill student: both extra heads, in the paper's names
        cfg = cfg.replace(delta_embed=True, logvar_head=True)
        sd |= student_heads(cfg, seed=3)
    back = flux_to_diffusers(flux_from_diffusers(sd, cfg))
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k


@pytest.mark.parametrize("guidance", [True, False])
def test_bfl_round_trip_is_bit_exact(guidance):
    cfg = CASES["guidance_1+1"].cfg.replace(num_double=2, num_single=2, guidance_embed=guidance)
    model = flux_from_diffusers(state_dict(torch_flux(cfg)), cfg)
    bfl = flux_to_bfl(model)
    again = flux_to_bfl(flux_from_bfl(bfl, cfg))
    assert sorted(again) == sorted(bfl)
    assert all(np.array_equal(again[k], bfl[k]) for k in bfl)


def test_corrupt_state_dict_lists_every_problem():
    cfg = CASES["guidance_1+1"].cfg
    sd = state_dict(torch_flux(cfg))
    del sd["transformer_blocks.0.attn.to_k.bias"]
    sd["transformer_blocks.0.attn.extra.weight"] = np.zeros((3, 3), np.float32)
    sd["proj_out.weight"] = np.zeros((5, cfg.hidden), np.float32)
    with pytest.raises(PortError) as err:
        flux_from_diffusers(sd, cfg)
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert "missing source key 'transformer_blocks.0.attn.to_k.bias'" in msg
    assert "unexpected source key 'transformer_blocks.0.attn.extra.weight' (3, 3)" in msg
    assert "'proj_out.weight' has shape (5, 32)" in msg


def test_depth_mismatch_is_reported():
    cfg = CASES["no_guidance_2+3"].cfg
    sd = state_dict(torch_flux(cfg))
    with pytest.raises(PortError, match="unexpected source key 'single_transformer_blocks.2"):
        flux_from_diffusers(sd, cfg.replace(num_single=2))


@pytest.mark.parametrize("mode", ["copy", "zero"])
def test_delta_embedder_init(mode):
    """ "zero" makes the MeanFlow student equal the teacher at r = t; "copy" does not."""
    case = CASES["guidance_1+1"]
    sd = state_dict(torch_flux(case.cfg))
    teacher = flux_from_diffusers(sd, case.cfg)
    student = Flux(case.cfg.replace(delta_embed=True, delta_init=mode), rngs=nnx.Rngs(0))
    nnx.update(student, nnx.state(teacher, nnx.Param))
    reset_delta_embedder(student, mode)
    x = inputs(case)
    diff = np.abs(
        np.asarray(student(**x, timestep2=np.zeros(2, np.float32))) - np.asarray(teacher(**x))
    ).max()
    assert (diff == 0.0) if mode == "zero" else (diff > 1e-3)


def test_logvar_head():
    cfg = FluxConfig.tiny().replace(logvar_head=True)
    model = Flux(cfg, rngs=nnx.Rngs(0))
    x = inputs(Case(cfg))
    out, logvar = model(**x, return_logvar=True)
    assert out.shape == (2, 24, cfg.out) and logvar.shape == (2,)
    vec = model.conditioning(x["timestep"], x["pooled_projections"], x["guidance"])
    expected = np.asarray(vec) @ np.asarray(model.logvar.kernel.get_value())[:, 0]
    np.testing.assert_allclose(
        logvar, expected + np.asarray(model.logvar.bias.get_value()), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("which", ["timestep", "guidance", "timestep2"])
def test_time_dtype_rounds_the_embeddings_input(which):
    """``Flux(time_dtype=bfloat16)`` rounds each time input to bf16 before the sinusoid, as the
    paper's bf16 model casts ``timestep``, ``guidance`` (and MeanFlow's Δ) to its dtype (spec 1.2
    item 1): the float32 model given that input rounded by ml_dtypes gives the same conditioning,
    given it unrounded another. The other inputs are bf16 values already."""
    cfg = FluxConfig.tiny().replace(delta_embed=True)
    exact, rounding = (
        Flux(cfg, rngs=nnx.Rngs(0), time_dtype=d) for d in (jnp.float32, jnp.bfloat16)
    )
    pooled = np.random.default_rng(0).standard_normal((2, cfg.pooled_dim)).astype(np.float32)
    times = {
        "timestep": np.float32([0.5, 0.75]),
        "guidance": np.float32([4.0, 4.5]),
        "timestep2": np.float32([0.25, 0.0]),
    }
    unrounded = {**times, which: np.float32([0.30078, 0.99597168])}  # not bf16 values
    rounded = {**times, which: unrounded[which].astype(ml_dtypes.bfloat16).astype(np.float32)}
    assert not np.array_equal(rounded[which], unrounded[which])
    got = rounding.conditioning(pooled_projections=pooled, **unrounded)
    np.testing.assert_array_equal(got, exact.conditioning(pooled_projections=pooled, **rounded))
    assert np.abs(got - exact.conditioning(pooled_projections=pooled, **unrounded)).max() > 1e-6


def test_bad_inputs_have_clear_errors():
    cfg = FluxConfig.tiny()
    model = Flux(cfg, rngs=nnx.Rngs(0))
    x = inputs(Case(cfg))
    with pytest.raises(ValueError, match="pass guidance"):
        model(**{**x, "guidance": None})
    with pytest.raises(ValueError, match="channels"):
        model(**{**x, "hidden_states": x["hidden_states"][..., :3]})
    no_g = Flux(cfg.replace(guidance_embed=False), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no guidance embedder"):
        no_g(**x)


def _directional_fd(f, x, d, eps=1e-2):
    return (f(x + eps * d) - f(x - eps * d)) / (2 * eps)


def test_jvp_and_grad_match_finite_differences():
    cfg = FluxConfig.tiny().replace(time_scale=1.0)
    model = Flux(cfg, rngs=nnx.Rngs(0))
    x = inputs(Case(cfg))
    rng = np.random.default_rng(7)
    dx = rng.standard_normal(x["hidden_states"].shape).astype(np.float32)
    dt = np.float32(0.7)

    def f(z, t):  # the sCM/MeanFlow tangent path: d/d(latents, time)
        return model(**{**x, "hidden_states": z, "timestep": x["timestep"] + t})

    _, tangent = jax.jvp(
        f, (jnp.asarray(x["hidden_states"]), jnp.float32(0.0)), (jnp.asarray(dx), dt)
    )
    fd = _directional_fd(lambda s: f(x["hidden_states"] + s * dx, s * dt), 0.0, 1.0)
    np.testing.assert_allclose(tangent, fd, atol=2e-3 * np.abs(fd).max())

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return jnp.mean(jnp.square(nnx.merge(graphdef, p, rest)(**x)))

    grads = jax.grad(loss)(params)
    direction = jax.tree.map(lambda g: jnp.asarray(rng.standard_normal(g.shape), g.dtype), grads)
    analytic = sum(
        jnp.vdot(g, d)
        for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
    )
    shifted = lambda s: loss(jax.tree.map(lambda p, d: p + s * d, params, direction))  # noqa: E731
    fd = (shifted(1e-3) - shifted(-1e-3)) / 2e-3
    np.testing.assert_allclose(analytic, fd, rtol=2e-2)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_do_not_change_values(remat):
    cfg = FluxConfig.tiny()
    x = inputs(Case(cfg))
    plain = Flux(cfg, rngs=nnx.Rngs(0))
    rematted = Flux(cfg, rngs=nnx.Rngs(0), remat=remat)

    def grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(**x) ** 2))(params)

    for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(rematted)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(a).max())


def test_sharded_parameters_and_forward():
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg = FluxConfig.tiny().replace(num_double=2, num_single=2)
    model = init_sharded(lambda: Flux(cfg, rngs=nnx.Rngs(0)), mesh)
    expected = state_shardings(nnx.state(abstract_flux(cfg)), mesh)
    got = nnx.state(model)
    flat_expected = dict(nnx.to_flat_state(expected))
    for path, var in nnx.to_flat_state(got):
        assert var.get_value().sharding.is_equivalent_to(
            flat_expected[path].get_value(), var.get_value().ndim
        ), path
    qkv = model.double_blocks[0].img_attn.qkv.kernel.get_value()
    assert qkv.sharding.spec == PartitionSpec("fsdp", "tensor")

    case = Case(cfg, batch=4)
    x = inputs(case)
    reference = Flux(cfg, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(
        flat_params(reference)["img_in.kernel"], flat_params(model)["img_in.kernel"]
    )
    out = sharded_forward(model, x, mesh)
    np.testing.assert_allclose(out, reference(**x), rtol=1e-5, atol=1e-5)
