"""Key table between transformers' ``CLIPTextModel.state_dict()`` and :class:`CLIPTextEncoder`.

transformers 5 names the text model's keys without a prefix (``embeddings.token_embedding.weight``)
and keeps ``embeddings.position_ids`` as a non-persistent buffer, absent from ``state_dict()``.
Checkpoints on disk (FLUX's ``text_encoder``, older transformers) use a ``text_model.`` prefix and
may carry ``position_ids``; both are accepted on import: the prefix is dropped when every key has
it, and ``position_ids`` is checked to be ``arange(P)`` and then set aside. Export writes exactly
the keys of ``CLIPTextModel.state_dict()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from distill_jax.models.clip import CLIPTextConfig, CLIPTextEncoder
from distill_jax.port.params import flat_params, from_state_dict
from distill_jax.port.t5 import SourceView
from distill_jax.port.table import PortError, Rule, linear, rule, to_source

WHAT = "CLIP text encoder"
PREFIX = "text_model."
POSITION_IDS = "embeddings.position_ids"


def clip_rules(cfg: CLIPTextConfig) -> list[Rule]:
    """Every parameter of :class:`CLIPTextEncoder` and the transformers keys it comes from."""
    rules = [
        rule("token_embed.embedding", "embeddings.token_embedding.weight"),
        rule("pos_embed.embedding", "embeddings.position_embedding.weight"),
        rule("final_norm.scale", "final_layer_norm.weight"),
        rule("final_norm.bias", "final_layer_norm.bias"),
    ]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"encoder.layers.{i}", f"layers.{i}"
        for name in ("q", "k", "v"):
            rules += linear(f"{dst}.attn.{name}", f"{src}.self_attn.{name}_proj")
        rules += linear(f"{dst}.attn.o", f"{src}.self_attn.out_proj")
        rules += linear(f"{dst}.mlp.fc1", f"{src}.mlp.fc1")
        rules += linear(f"{dst}.mlp.fc2", f"{src}.mlp.fc2")
        for n in (1, 2):
            rules.append(rule(f"{dst}.norm{n}.scale", f"{src}.layer_norm{n}.weight"))
            rules.append(rule(f"{dst}.norm{n}.bias", f"{src}.layer_norm{n}.bias"))
    return rules


def canonical_state_dict(state_dict: Mapping[str, Any], cfg: CLIPTextConfig) -> Mapping[str, Any]:
    """The state dict under ``CLIPTextModel.state_dict()`` names, without the position buffer."""
    strip = len(state_dict) > 0 and all(k.startswith(PREFIX) for k in state_dict)
    keys = {(k[len(PREFIX) :] if strip else k): k for k in state_dict}
    if POSITION_IDS in keys:
        ids = np.asarray(state_dict[keys.pop(POSITION_IDS)])  # a few hundred bytes
        expect = np.arange(cfg.max_position_embeddings)
        if ids.reshape(-1).shape != expect.shape or not np.array_equal(ids.reshape(-1), expect):
            raise PortError(WHAT, [f"{POSITION_IDS!r} {ids.shape} is not arange(max_positions)"])
    if not strip and len(keys) == len(state_dict):
        return state_dict
    return SourceView(state_dict, keys)


def clip_from_transformers(
    state_dict: Mapping[str, Any], cfg: CLIPTextConfig, **kw: Any
) -> CLIPTextEncoder:
    """A :class:`CLIPTextEncoder` holding the weights of a ``CLIPTextModel`` state dict; ``kw``
    go to its constructor (``dtype``, ``param_dtype``). Raises :class:`PortError` listing every
    missing, unexpected or mis-shaped key."""
    sd = canonical_state_dict(state_dict, cfg)
    return from_state_dict(CLIPTextEncoder, cfg, sd, clip_rules(cfg), what=WHAT, **kw)


def clip_to_transformers(model: CLIPTextEncoder) -> dict[str, np.ndarray]:
    """The model's weights under ``CLIPTextModel.state_dict()`` keys."""
    return to_source(flat_params(model), clip_rules(model.cfg), what=f"{WHAT} export")
