"""Key table between diffusers' ``AutoencoderKL`` state dict and :class:`Autoencoder`.

NNX paths mirror diffusers' names except: conv/linear ``weight`` -> ``kernel`` (torch conv
``[O, I, kh, kw]`` <-> Flax ``[kh, kw, I, O]``, Linear ``[out, in]`` <-> ``[in, out]``), GroupNorm
``weight`` -> ``scale``, ``downsamplers.0.conv`` -> ``downsample``, ``upsamplers.0.conv`` ->
``upsample``, ``mid_block.attentions.0`` -> ``mid_block.attention`` and ``to_out.0`` -> ``to_out``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from distill_jax.models.autoencoder import (
    Autoencoder,
    AutoencoderConfig,
    down_block_channels,
    up_block_channels,
)
from distill_jax.port.params import flat_params, from_state_dict
from distill_jax.port.table import CONV, Rule, linear, rule, to_source


def _conv(target: str, source: str | None = None) -> list[Rule]:
    source = source or target
    return [
        rule(f"{target}.kernel", f"{source}.weight", transform=CONV),
        rule(f"{target}.bias", f"{source}.bias"),
    ]


def _norm(target: str, source: str | None = None) -> list[Rule]:
    source = source or target
    return [rule(f"{target}.scale", f"{source}.weight"), rule(f"{target}.bias", f"{source}.bias")]


def _resnet(path: str, shortcut: bool) -> list[Rule]:
    rules = _norm(f"{path}.norm1") + _conv(f"{path}.conv1")
    rules += _norm(f"{path}.norm2") + _conv(f"{path}.conv2")
    return rules + (_conv(f"{path}.conv_shortcut") if shortcut else [])


def _mid_block(path: str, attention: bool) -> list[Rule]:
    rules = _resnet(f"{path}.resnets.0", False) + _resnet(f"{path}.resnets.1", False)
    if attention:
        a, s = f"{path}.attention", f"{path}.attentions.0"
        rules += _norm(f"{a}.group_norm", f"{s}.group_norm")
        for name in ("to_q", "to_k", "to_v"):
            rules += linear(f"{a}.{name}", f"{s}.{name}")
        rules += linear(f"{a}.to_out", f"{s}.to_out.0")  # to_out.1 is a parameterless dropout
    return rules


def autoencoder_rules(cfg: AutoencoderConfig) -> list[Rule]:
    """The full table for ``cfg``: one rule per model parameter, keyed by diffusers names."""
    last = len(cfg.block_out_channels) - 1
    rules = _conv("encoder.conv_in")
    for i, (cin, cout) in enumerate(down_block_channels(cfg)):
        block = f"encoder.down_blocks.{i}"
        for j in range(cfg.layers_per_block):
            rules += _resnet(f"{block}.resnets.{j}", shortcut=j == 0 and cin != cout)
        if i < last:
            rules += _conv(f"{block}.downsample", f"{block}.downsamplers.0.conv")
    rules += _mid_block("encoder.mid_block", cfg.mid_block_add_attention)
    rules += _norm("encoder.conv_norm_out") + _conv("encoder.conv_out")

    rules += _conv("decoder.conv_in")
    rules += _mid_block("decoder.mid_block", cfg.mid_block_add_attention)
    for i, (cin, cout) in enumerate(up_block_channels(cfg)):
        block = f"decoder.up_blocks.{i}"
        for j in range(cfg.layers_per_block + 1):
            rules += _resnet(f"{block}.resnets.{j}", shortcut=j == 0 and cin != cout)
        if i < last:
            rules += _conv(f"{block}.upsample", f"{block}.upsamplers.0.conv")
    rules += _norm("decoder.conv_norm_out") + _conv("decoder.conv_out")

    if cfg.use_quant_conv:
        rules += _conv("quant_conv")
    if cfg.use_post_quant_conv:
        rules += _conv("post_quant_conv")
    return rules


def autoencoder_from_diffusers(
    state_dict: Mapping[str, Any], cfg: AutoencoderConfig, **kw: Any
) -> Autoencoder:
    """An :class:`Autoencoder` holding the weights of a diffusers ``AutoencoderKL`` state dict
    (NumPy-convertible arrays, e.g. ``{k: t.numpy()}``, or a lazy safetensors mapping); ``kw`` go
    to its constructor (``dtype``, ``param_dtype``). Every key, missing or extra, and every shape
    is checked up front; all problems are raised together as one ``PortError``."""
    rules = autoencoder_rules(cfg)
    return from_state_dict(Autoencoder, cfg, state_dict, rules, what="autoencoder", **kw)


def autoencoder_to_diffusers(model: Autoencoder) -> dict[str, np.ndarray]:
    """The diffusers ``AutoencoderKL`` state dict of ``model``, as NumPy arrays."""
    return to_source(flat_params(model), autoencoder_rules(model.cfg), what="autoencoder export")
