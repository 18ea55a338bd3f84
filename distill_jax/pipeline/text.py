"""Prompt encoding as diffusers' ``FluxPipeline.encode_prompt`` does it.

- CLIP-L: ids padded/truncated to 77 (``padding="max_length"``), the pooled vector ``[B, 768]``.
- T5-XXL: ids padded/truncated to ``max_sequence_length``, the last hidden state ``[B, S, 4096]``,
  with no attention mask (padding tokens are attended to, as in FLUX's training).
- Text position ids: zeros ``[S, 3]``.

Tokenizers are transformers' (they read the users' own tokenizer folders); the encoders are ours,
each run under one ``jax.jit`` per input shape.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)

# Files a tokenizer folder needs: any one of the groups (the slow files or tokenizers' JSON).
_CLIP_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
_T5_FILES = (("spiece.model",), ("tokenizer.json",))


def _check_folder(path: Path, what: str, groups: tuple[tuple[str, ...], ...]) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} tokenizer folder {str(path)!r} does not exist")
    if not any(all((path / f).is_file() for f in group) for group in groups):
        wanted = " or ".join(" + ".join(group) for group in groups)
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"{what} tokenizer folder {str(path)!r} lacks {wanted} (it holds {found})"
        )


def load_tokenizers(clip_dir: str | Path, t5_dir: str | Path) -> tuple[Any, Any]:
    """``(CLIPTokenizer, T5TokenizerFast)`` from local folders (FLUX's ``tokenizer`` and
    ``tokenizer_2``); never touches the network.

    Raises ``FileNotFoundError`` naming the folder and the files it lacks.
    """
    from transformers import CLIPTokenizer, T5TokenizerFast  # heavy import, only when needed

    clip_dir, t5_dir = Path(clip_dir), Path(t5_dir)
    _check_folder(clip_dir, "CLIP", _CLIP_FILES)
    _check_folder(t5_dir, "T5", _T5_FILES)
    clip = CLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    t5 = T5TokenizerFast.from_pretrained(str(t5_dir), local_files_only=True)
    return clip, t5


def tokenize(tokenizer: Any, prompts: Sequence[str], length: int, what: str) -> np.ndarray:
    """Ids ``[B, length]`` int32, padded and truncated to ``length``; warns naming truncations."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=length,
        truncation=True,
        return_tensors="np",
    )["input_ids"]
    full = tokenizer(list(prompts), truncation=False)["input_ids"]
    cut = {i: len(f) for i, f in enumerate(full) if len(f) > length}
    if cut:
        log.warning(
            "%s: prompt(s) %s truncated to %d tokens (they had %s)",
            what,
            sorted(cut),
            length,
            [cut[i] for i in sorted(cut)],
        )
    return np.asarray(ids, np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _clip_pooled(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(ids)[1]


@functools.partial(jax.jit, static_argnums=0)
def _t5_hidden(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(ids)


def encode_prompts(
    pipeline: Any, prompts: str | Sequence[str], *, max_sequence_length: int = 256
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Text conditioning of FLUX for ``B`` prompts, through the tokenizers and encoders of a
    :class:`~distill_jax.pipeline.pipeline.Pipeline` (``Pipeline.encode`` calls this).

    Returns ``(t5 [B, S, D_t5], pooled [B, D_clip], txt_ids [S, 3])`` with
    ``S = max_sequence_length``; embeddings in the encoders' compute dtype, ids float32 zeros.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("encode_prompts: no prompts given")
    if max_sequence_length < 1:
        raise ValueError(f"max_sequence_length={max_sequence_length} must be >= 1")
    # diffusers pads CLIP to the tokenizer's model_max_length (77 for CLIP-L); a folder without a
    # tokenizer_config.json reports a huge one, so the position table bounds it.
    clip_len = min(
        int(pipeline.clip_tokenizer.model_max_length), pipeline.clip.cfg.max_position_embeddings
    )
    clip_ids = tokenize(pipeline.clip_tokenizer, prompts, clip_len, "CLIP")
    t5_ids = tokenize(pipeline.t5_tokenizer, prompts, max_sequence_length, "T5")
    for what, ids, vocab in (
        ("CLIP", clip_ids, pipeline.clip.cfg.vocab_size),
        ("T5", t5_ids, pipeline.t5.cfg.vocab_size),
    ):
        if ids.max() >= vocab:
            raise ValueError(
                f"{what} tokenizer produced id {ids.max()} but the encoder's vocab_size is {vocab}"
            )
    pooled = _clip_pooled(*nnx.split(pipeline.clip), jnp.asarray(clip_ids))
    t5 = _t5_hidden(*nnx.split(pipeline.t5), jnp.asarray(t5_ids))
    txt_ids = jnp.zeros((max_sequence_length, 3), jnp.float32)
    return t5, pooled, txt_ids


__all__ = ["encode_prompts", "load_tokenizers", "tokenize"]
