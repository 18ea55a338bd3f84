"""The NNX autoencoder against diffusers' ``AutoencoderKL`` with tiny random weights.

Shapes: B batch, H/W image size, h/w latent size, C channels. Our arrays are NHWC; diffusers'
are NCHW. Tolerance: max |ours - diffusers| <= RTOL * max |diffusers| (float32 throughout, so the
only differences are summation order in convolutions and attention).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from flax import nnx

from distill_jax.models.autoencoder import Autoencoder, AutoencoderConfig, to_nchw, to_nhwc
from distill_jax.port.autoencoder import (
    autoencoder_from_diffusers,
    autoencoder_rules,
    autoencoder_to_diffusers,
)
from distill_jax.port.params import param_shapes
from distill_jax.port.table import PortError
from distill_jax.sharding import DEFAULT_RULES

RTOL = 1e-5

# name -> diffusers AutoencoderKL kwargs; each exercises a different structural path.
CONFIGS = {
    # FLUX-like: 16 latent channels, no quant convs, shift set.
    "flux_like": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    # SD-like: 3 levels, 2 layers, 4 latent channels, quant convs, no shift.
    "sd_like": dict(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=16,
        scaling_factor=0.18215,
    ),
    "no_mid_attention": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        shift_factor=-0.2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ),
}
SIZES = [(32, 32), (32, 48)]  # (H, W); the second is non-square


def _diffusers_vae(kwargs: dict) -> AutoencoderKL:
    n = len(kwargs["block_out_channels"])
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        **kwargs,
    ).eval()
    # Convs and linears start random; GroupNorms start at 1/0, which would hide a swapped
    # scale/bias mapping, so perturb every norm's affine parameters too.
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.2 * torch.randn_like(module.bias))
    return vae


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    """(diffusers vae, our model, our config) sharing weights."""
    vae = _diffusers_vae(CONFIGS[request.param])
    cfg = AutoencoderConfig.from_diffusers(dict(vae.config))
    sd = {k: v.numpy() for k, v in vae.state_dict().items()}
    return vae, autoencoder_from_diffusers(sd, cfg), cfg


def _assert_close(ours: jax.Array, ref: torch.Tensor) -> None:
    """``ours`` NHWC against diffusers' NCHW ``ref``, relative to the output's scale."""
    ref = ref.detach().numpy()
    err = np.abs(np.asarray(to_nchw(ours)) - ref).max()
    scale = np.abs(ref).max()
    assert err <= RTOL * scale, f"max abs err {err:.2e}, rel {err / scale:.2e} > {RTOL}"


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_encode_matches_diffusers(pair, size):
    vae, model, _ = pair
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1  # [B, 3, H, W]
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    mean, logvar = model.encode(to_nhwc(jnp.asarray(x.numpy())))  # [B, h, w, C] each
    _assert_close(mean, dist.mean)
    _assert_close(logvar, dist.logvar)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_decode_matches_diffusers(pair, size):
    vae, model, cfg = pair
    down = 2 ** (len(cfg.block_out_channels) - 1)
    shape = (2, cfg.latent_channels, size[0] // down, size[1] // down)
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(2))  # [B, C, h, w]
    with torch.no_grad():
        ref = vae.decode(z).sample
    out = model.decode(to_nhwc(jnp.asarray(z.numpy())))  # [B, H, W, 3]
    assert out.shape == (2, *size, 3)
    _assert_close(out, ref)


def test_round_trip_is_bit_exact(pair):
    vae, model, _ = pair
    ref = {k: v.numpy() for k, v in vae.state_dict().items()}
    out = autoencoder_to_diffusers(model)
    assert sorted(out) == sorted(ref)
    for k, v in ref.items():
        assert out[k].dtype == v.dtype and np.array_equal(out[k], v), k


def test_corrupted_state_dict_names_every_problem(pair):
    vae, _, cfg = pair
    sd = {k: v.numpy() for k, v in vae.state_dict().items()}
    del sd["decoder.mid_block.resnets.1.conv2.weight"]
    sd["encoder.extra.weight"] = np.zeros(3, np.float32)
    sd["encoder.conv_in.bias"] = np.zeros(5, np.float32)
    with pytest.raises(PortError) as info:
        autoencoder_from_diffusers(sd, cfg)
    message = str(info.value)
    for key in ("decoder.mid_block.resnets.1.conv2.weight", "encoder.extra.weight"):
        assert key in message
    assert "encoder.conv_in.bias" in message and "(5,)" in message
    assert len(info.value.problems) == 3


@pytest.mark.parametrize("scaling, shift", [(0.5, 0.25), (1.7, -0.3)])
def test_scale_latents_uses_config(scaling, shift):
    cfg = dataclasses.replace(AutoencoderConfig.tiny(), scaling_factor=scaling, shift_factor=shift)
    model = nnx.eval_shape(lambda: Autoencoder(cfg, rngs=nnx.Rngs(0)))
    z = jax.random.normal(jax.random.key(0), (1, 4, 6, 16))  # [B, h, w, C]
    np.testing.assert_allclose(model.scale_latents(z), (z - shift) * scaling, rtol=1e-6)
    np.testing.assert_allclose(model.unscale_latents(model.scale_latents(z)), z, atol=1e-6)
    # The FLUX pipeline's decode-side formula: latents / scaling_factor + shift_factor.
    np.testing.assert_allclose(model.unscale_latents(z), z / scaling + shift, rtol=1e-6)


def test_sample_posterior():
    mean = jnp.arange(24.0).reshape(1, 2, 3, 4)  # [B, h, w, C]
    logvar = jnp.full_like(mean, np.log(4.0))
    key = jax.random.key(3)
    sample = Autoencoder.sample_posterior(mean, logvar, key)
    np.testing.assert_allclose(sample, mean + 2.0 * jax.random.normal(key, mean.shape), rtol=1e-6)


def test_layout_helpers_are_inverse():
    x = jnp.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # [B, H, W, C]
    assert to_nchw(x).shape == (2, 5, 3, 4)
    assert (to_nhwc(to_nchw(x)) == x).all()


FLUX_CONFIG_JSON = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.30.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}


def test_flux_preset_table_covers_diffusers_keys():
    cfg = AutoencoderConfig.from_diffusers(FLUX_CONFIG_JSON)
    assert cfg == AutoencoderConfig.flux()
    with torch.device("meta"):  # shapes only, no memory
        vae = AutoencoderKL(**{k: v for k, v in FLUX_CONFIG_JSON.items() if k[0] != "_"})
    ref = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    shapes = param_shapes(nnx.eval_shape(lambda: Autoencoder(cfg, rngs=nnx.Rngs(0))))
    got = {}
    for r in autoencoder_rules(cfg):
        got.update(zip(r.sources, r.transform.source_shapes(shapes[r.target]), strict=True))
    assert len(autoencoder_rules(cfg)) == len(shapes)
    assert got == ref


@pytest.mark.parametrize(
    "field, value",
    [
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D"]),
        ("act_fn", "gelu"),
        ("latents_mean", [0.0] * 16),
        ("some_new_option", 1),
    ],
)
def test_from_diffusers_rejects_unsupported(field, value):
    config = dict(FLUX_CONFIG_JSON, block_out_channels=[32, 64], norm_num_groups=8)
    config.update(
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2
    )
    config[field] = value
    with pytest.raises(ValueError, match=field):
        AutoencoderConfig.from_diffusers(config)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_params_have_logical_axes_and_dtype(param_dtype):
    model = nnx.eval_shape(
        lambda: Autoencoder(AutoencoderConfig.tiny(), rngs=nnx.Rngs(0), param_dtype=param_dtype)
    )
    known = {name for name, _ in DEFAULT_RULES}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata("logical_axes", None)
        value = var.get_value()
        assert names is not None and len(names) == value.ndim, path
        assert set(names) - {None} <= known, path
        assert value.dtype == param_dtype, path


def test_bfloat16_compute_runs():
    cfg = AutoencoderConfig.tiny()
    model = Autoencoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    images = jnp.zeros((1, 16, 16, 3))  # [B, H, W, 3]
    mean, logvar = model.encode(images)
    assert mean.shape == logvar.shape == (1, 8, 8, 16) and mean.dtype == jnp.bfloat16
    out = model.decode(mean)
    assert out.shape == (1, 16, 16, 3) and bool(jnp.isfinite(out.astype(jnp.float32)).all())
