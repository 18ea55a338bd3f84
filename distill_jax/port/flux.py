"""Key tables between our FLUX MMDiT and the diffusers and BFL state dicts.

Our parameter names follow BFL's (``double_blocks.{i}.img_attn.qkv``), so the BFL table is a
list of renames and transposes; the diffusers table fuses q/k/v (and, in single blocks, q/k/v
with ``proj_mlp``) and swaps the final AdaLN's (scale, shift) halves. The T2I-Distill students'
extra heads keep the names the paper's code uses: ``timestep_embedder2.*`` (MeanFlow's Δ-time
embedder) and ``logvar_linear.*`` (sCM's log-variance head). See ``shared/spec/flux-weights.md``.
A model with ``scan_layers`` stacks each kind of block: one rule per parameter name reads that
tensor of every block (``port.table.layers``), so checkpoints convert straight into the stacked
layout and export back from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from distill_jax.models.flux import Flux, FluxConfig
from distill_jax.port.params import flat_params, from_state_dict
from distill_jax.port.table import (
    SWAP_SCALE_SHIFT_BIAS,
    SWAP_SCALE_SHIFT_LINEAR,
    Rule,
    fused,
    layers,
    linear,
    rule,
    to_source,
)


def _mlp_embedder(ours: str, theirs: str, first: str, second: str) -> list[Rule]:
    return [
        *linear(f"{ours}.in_layer", f"{theirs}.{first}"),
        *linear(f"{ours}.out_layer", f"{theirs}.{second}"),
    ]


def _heads(cfg: FluxConfig, prefix: str) -> list[Rule]:
    """The extra heads of distillation students, named as the paper's code names them."""
    rules = []
    if cfg.delta_embed:
        rules += _mlp_embedder("delta_in", f"{prefix}timestep_embedder2", "linear_1", "linear_2")
    if cfg.logvar_head:
        rules += linear("logvar", f"{prefix}logvar_linear")
    return rules


def diffusers_rules(cfg: FluxConfig) -> list[Rule]:
    """Our parameters <- ``FluxTransformer2DModel.state_dict()`` keys (blocks stacked when
    ``cfg.scan_layers``)."""
    emb = "time_text_embed"
    rules = [
        *linear("img_in", "x_embedder"),
        *linear("txt_in", "context_embedder"),
        *_mlp_embedder("time_in", f"{emb}.timestep_embedder", "linear_1", "linear_2"),
        *_mlp_embedder("vector_in", f"{emb}.text_embedder", "linear_1", "linear_2"),
    ]
    if cfg.guidance_embed:
        rules += _mlp_embedder("guidance_in", f"{emb}.guidance_embedder", "linear_1", "linear_2")
    rules += layers(
        "double_blocks",
        [_diffusers_double(cfg, i) for i in range(cfg.num_double)],
        stack=cfg.scan_layers,
    )
    rules += layers(
        "single_blocks",
        [_diffusers_single(cfg, i) for i in range(cfg.num_single)],
        stack=cfg.scan_layers,
    )
    rules += [
        rule(
            "final_layer.adaLN.kernel", "norm_out.linear.weight", transform=SWAP_SCALE_SHIFT_LINEAR
        ),
        rule("final_layer.adaLN.bias", "norm_out.linear.bias", transform=SWAP_SCALE_SHIFT_BIAS),
        *linear("final_layer.linear", "proj_out"),
    ]
    return rules + _heads(cfg, "")


def _diffusers_double(cfg: FluxConfig, i: int) -> list[Rule]:
    """Double block ``i``: its two streams, each with its own weights."""
    d, rules = cfg.hidden, []
    ours, theirs = f"double_blocks.{i}", f"transformer_blocks.{i}"
    a = f"{theirs}.attn"
    for stream, mod, proj, ff, q, k, v, qn, kn in (
        ("img", "norm1", "to_out.0", "ff", "to_q", "to_k", "to_v", "norm_q", "norm_k"),
        (
            "txt",
            "norm1_context",
            "to_add_out",
            "ff_context",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "norm_added_q",
            "norm_added_k",
        ),
    ):
        rules += [
            *linear(f"{ours}.{stream}_mod.lin", f"{theirs}.{mod}.linear"),
            *fused(f"{ours}.{stream}_attn.qkv", [f"{a}.{q}", f"{a}.{k}", f"{a}.{v}"], [d, d, d]),
            rule(f"{ours}.{stream}_attn.query_norm.scale", f"{a}.{qn}.weight"),
            rule(f"{ours}.{stream}_attn.key_norm.scale", f"{a}.{kn}.weight"),
            *linear(f"{ours}.{stream}_attn.proj", f"{a}.{proj}"),
            *linear(f"{ours}.{stream}_mlp.fc1", f"{theirs}.{ff}.net.0.proj"),
            *linear(f"{ours}.{stream}_mlp.fc2", f"{theirs}.{ff}.net.2"),
        ]
    return rules


def _diffusers_single(cfg: FluxConfig, i: int) -> list[Rule]:
    d, m = cfg.hidden, cfg.mlp_hidden
    ours, theirs = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    a = f"{theirs}.attn"
    return [
        *linear(f"{ours}.modulation.lin", f"{theirs}.norm.linear"),
        *fused(
            f"{ours}.linear1",
            [f"{a}.to_q", f"{a}.to_k", f"{a}.to_v", f"{theirs}.proj_mlp"],
            [d, d, d, m],
        ),
        rule(f"{ours}.query_norm.scale", f"{a}.norm_q.weight"),
        rule(f"{ours}.key_norm.scale", f"{a}.norm_k.weight"),
        *linear(f"{ours}.linear2", f"{theirs}.proj_out"),
    ]


def bfl_rules(cfg: FluxConfig) -> list[Rule]:
    """Our parameters <- BFL single-file keys (``flux1-dev.safetensors``); blocks stacked when
    ``cfg.scan_layers``."""
    rules = [
        *linear("img_in", "img_in"),
        *linear("txt_in", "txt_in"),
        *_mlp_embedder("time_in", "time_in", "in_layer", "out_layer"),
        *_mlp_embedder("vector_in", "vector_in", "in_layer", "out_layer"),
    ]
    if cfg.guidance_embed:
        rules += _mlp_embedder("guidance_in", "guidance_in", "in_layer", "out_layer")
    double = [_bfl_double(f"double_blocks.{i}") for i in range(cfg.num_double)]
    single = [_bfl_single(f"single_blocks.{i}") for i in range(cfg.num_single)]
    rules += layers("double_blocks", double, stack=cfg.scan_layers)
    rules += layers("single_blocks", single, stack=cfg.scan_layers)
    rules += [
        *linear("final_layer.adaLN", "final_layer.adaLN_modulation.1"),
        *linear("final_layer.linear", "final_layer.linear"),
    ]
    return rules + _heads(cfg, "")


def _bfl_double(p: str) -> list[Rule]:
    rules = []
    for s in ("img", "txt"):
        rules += [
            *linear(f"{p}.{s}_mod.lin", f"{p}.{s}_mod.lin"),
            *linear(f"{p}.{s}_attn.qkv", f"{p}.{s}_attn.qkv"),
            rule(f"{p}.{s}_attn.query_norm.scale", f"{p}.{s}_attn.norm.query_norm.scale"),
            rule(f"{p}.{s}_attn.key_norm.scale", f"{p}.{s}_attn.norm.key_norm.scale"),
            *linear(f"{p}.{s}_attn.proj", f"{p}.{s}_attn.proj"),
            *linear(f"{p}.{s}_mlp.fc1", f"{p}.{s}_mlp.0"),
            *linear(f"{p}.{s}_mlp.fc2", f"{p}.{s}_mlp.2"),
        ]
    return rules


def _bfl_single(p: str) -> list[Rule]:
    return [
        *linear(f"{p}.modulation.lin", f"{p}.modulation.lin"),
        *linear(f"{p}.linear1", f"{p}.linear1"),
        rule(f"{p}.query_norm.scale", f"{p}.norm.query_norm.scale"),
        rule(f"{p}.key_norm.scale", f"{p}.norm.key_norm.scale"),
        *linear(f"{p}.linear2", f"{p}.linear2"),
    ]


def abstract_flux(cfg: FluxConfig, **kw) -> Flux:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves: no memory, no compute."""
    return nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0), **kw))


def flux_from_diffusers(state_dict: Mapping[str, np.ndarray], cfg: FluxConfig, **kw: Any) -> Flux:
    """A :class:`Flux` from a diffusers (or T2I-Distill) state dict of NumPy arrays; ``kw`` go to
    its constructor (``param_dtype``, ``attn_impl``, ...)."""
    return from_state_dict(
        Flux, cfg, state_dict, diffusers_rules(cfg), what="FLUX from diffusers", **kw
    )


def flux_from_bfl(state_dict: Mapping[str, np.ndarray], cfg: FluxConfig, **kw: Any) -> Flux:
    """A :class:`Flux` from a BFL single-file state dict of NumPy arrays."""
    return from_state_dict(Flux, cfg, state_dict, bfl_rules(cfg), what="FLUX from BFL", **kw)


def flux_to_diffusers(model: Flux) -> dict[str, np.ndarray]:
    """The diffusers state dict (plus the paper's extra-head keys, when present)."""
    return to_source(flat_params(model), diffusers_rules(model.cfg), what="FLUX to diffusers")


def flux_to_bfl(model: Flux) -> dict[str, np.ndarray]:
    """The BFL single-file state dict."""
    return to_source(flat_params(model), bfl_rules(model.cfg), what="FLUX to BFL")
