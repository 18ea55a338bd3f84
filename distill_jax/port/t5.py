"""Key table between transformers' ``T5EncoderModel.state_dict()`` and :class:`T5Encoder`.

T5EncoderModel ties ``shared.weight`` and ``encoder.embed_tokens.weight`` (one tensor, two keys).
The table reads both into the single NNX embedding and checks they are equal; export writes both.
Checkpoints written by ``save_pretrained`` keep only one of a tied pair, so when exactly one of
the two keys is present the other is aliased to it (a view; no tensor is read or copied).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from distill_jax.models.t5 import T5Config, T5Encoder
from distill_jax.port.params import flat_params, from_state_dict
from distill_jax.port.table import PortError, Rule, Transform, linear, rule, to_source

WHAT = "T5 encoder"
TIED = ("shared.weight", "encoder.embed_tokens.weight")


class SourceView(Mapping):
    """A read-only view of a state dict under other key names; builds it without reading tensors.

    ``keys`` maps each view key to its source key (several view keys may share one source key).
    Lazy sources keep streaming: ``shape_of`` and item access go straight to the source.
    """

    def __init__(self, source: Mapping[str, Any], keys: Mapping[str, str]):
        self._source = source
        self._keys = dict(keys)

    def __getitem__(self, key: str) -> Any:
        return self._source[self._keys[key]]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape_of(self, key: str) -> tuple[int, ...]:
        shape_of = getattr(self._source, "shape_of", None)
        src = self._keys[key]
        return tuple(shape_of(src)) if shape_of else tuple(np.shape(self._source[src]))


def _tied_forward(sources: list[np.ndarray]) -> np.ndarray:
    shared, embed_tokens = sources
    if not np.array_equal(shared, embed_tokens):
        raise PortError(WHAT, [f"tied {TIED[0]!r} and {TIED[1]!r} hold different values"])
    return shared


# Two equal torch tensors [V, D] <-> one NNX embedding [V, D]; export writes an independent copy.
TIED_EMBEDDING = Transform(
    "tied_embedding", _tied_forward, lambda t: [t, t.copy()], lambda shape: [shape, shape]
)


def t5_rules(cfg: T5Config) -> list[Rule]:
    """Every parameter of :class:`T5Encoder` and the transformers keys it comes from."""
    rules = [
        rule("embed.embedding", *TIED, transform=TIED_EMBEDDING),
        # transformers keeps the shared bias table in the first layer's attention.
        rule(
            "relative_bias.embedding",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        ),
        rule("final_norm.scale", "encoder.final_layer_norm.weight"),
    ]
    for i in range(cfg.num_layers):
        src, dst = f"encoder.block.{i}.layer", f"layers.{i}"
        rules.append(rule(f"{dst}.attn_norm.scale", f"{src}.0.layer_norm.weight"))
        for name in ("q", "k", "v", "o"):
            rules += linear(f"{dst}.attn.{name}", f"{src}.0.SelfAttention.{name}", bias=False)
        rules.append(rule(f"{dst}.mlp_norm.scale", f"{src}.1.layer_norm.weight"))
        for name in ("wi_0", "wi_1", "wo"):
            rules += linear(f"{dst}.mlp.{name}", f"{src}.1.DenseReluDense.{name}", bias=False)
    return rules


def alias_tied_embeddings(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    present = [k for k in TIED if k in state_dict]
    if len(present) != 1:
        return state_dict  # both (checked equal later) or neither (reported missing later)
    keys = {k: k for k in state_dict}
    keys.update({k: present[0] for k in TIED})
    return SourceView(state_dict, keys)


def t5_from_transformers(state_dict: Mapping[str, Any], cfg: T5Config, **kw: Any) -> T5Encoder:
    """A :class:`T5Encoder` holding the weights of a ``T5EncoderModel`` state dict; ``kw`` go to
    its constructor (``dtype``, ``param_dtype``). Raises :class:`PortError` listing every
    missing, unexpected or mis-shaped key."""
    sd = alias_tied_embeddings(state_dict)
    return from_state_dict(T5Encoder, cfg, sd, t5_rules(cfg), what=WHAT, **kw)


def t5_to_transformers(model: T5Encoder) -> dict[str, np.ndarray]:
    """The model's weights under ``T5EncoderModel.state_dict()`` keys (both tied keys)."""
    return to_source(flat_params(model), t5_rules(model.cfg), what=f"{WHAT} export")
