"""Prompt encoding against diffusers' ``FluxPipeline.encode_prompt`` on tiny local components.

Everything is built here, offline: a CLIP BPE tokenizer from a hand-written vocab.json/merges.txt,
a T5 tokenizer from a sentencepiece unigram model trained on a few sentences, random tiny
CLIPTextModel / T5EncoderModel / FluxTransformer2DModel / AutoencoderKL. ``tiny_flux_pipeline``
and ``to_pipeline`` are shared with ``test_pipeline.py``.

Tolerance: float32 throughout; embeddings agree to 1e-5 of the reference's max |value|.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)

from distill_jax.models.autoencoder import AutoencoderConfig
from distill_jax.models.clip import CLIPTextConfig
from distill_jax.models.flux import FluxConfig
from distill_jax.models.t5 import T5Config
from distill_jax.pipeline.pipeline import Pipeline
from distill_jax.pipeline.text import encode_prompts, load_tokenizers
from distill_jax.port.autoencoder import autoencoder_from_diffusers
from distill_jax.port.clip import clip_from_transformers
from distill_jax.port.flux import flux_from_diffusers
from distill_jax.port.t5 import t5_from_transformers

TOL = 1e-5
CORPUS = [
    "a photo of a red cube on a blue sphere",
    "three green triangles next to a yellow circle",
    "an astronaut riding a horse on the moon",
    "a small purple square above a large orange star",
    "the quick brown fox jumps over the lazy dog",
]
# Long enough (one CLIP token per letter in the tiny vocab) to be cut at 77 CLIP and 32 T5 tokens.
LONG = " ".join(CORPUS * 2)
PROMPTS = ["a red cube on the moon", LONG, "three green stars"]
# FLUX.1-dev scheduler_config.json
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def write_clip_tokenizer(folder: Path) -> None:
    """A CLIP BPE vocabulary: letters (word-inner and word-final), a few merges, and the two
    specials last, so that end-of-text has the largest id as in CLIP-L (legacy pooling)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = [("r", "e"), ("re", "d</w>"), ("c", "u"), ("cu", "b"), ("cub", "e</w>")]
    merges += [("o", "n</w>"), ("a", "n</w>"), ("t", "h"), ("th", "e</w>"), ("s", "t")]
    tokens = list(letters) + [c + "</w>" for c in letters] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))


def write_t5_tokenizer(folder: Path, work: Path) -> None:
    """A sentencepiece unigram model with T5's special ids (pad 0, eos 1, unk 2, no bos), saved
    as transformers writes T5's tokenizer folder."""
    work.mkdir(parents=True)
    (work / "corpus.txt").write_text("\n".join(CORPUS * 3) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"),
        model_prefix=str(work / "spiece"),
        vocab_size=80,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    transformers.T5TokenizerFast.from_pretrained(str(work)).save_pretrained(str(folder))


def tokenizer_dirs(root: Path) -> tuple[Path, Path]:
    clip_dir, t5_dir = root / "tokenizer", root / "tokenizer_2"
    write_clip_tokenizer(clip_dir)
    write_t5_tokenizer(t5_dir, root / "spm")
    return clip_dir, t5_dir


def tiny_flux_pipeline(
    root: Path, flux_cfg: FluxConfig | None = None, *, seed: int = 0
) -> FluxPipeline:
    """A diffusers FluxPipeline of tiny random parts. The VAE has four levels, so that its scale
    factor is FLUX's 8."""
    clip_dir, t5_dir = tokenizer_dirs(root)
    clip_tok, t5_tok = load_tokenizers(clip_dir, t5_dir)
    torch.manual_seed(seed)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=clip_tok.bos_token_id,
            pad_token_id=clip_tok.pad_token_id,
            eos_token_id=2,  # FLUX's CLIP-L config: legacy pooling at the largest id
            attn_implementation="eager",
        )
    ).eval()
    text_encoder_2 = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=len(t5_tok),
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            attn_implementation="eager",
        )
    ).eval()
    cfg = flux_cfg or FluxConfig.tiny().replace(pooled_dim=32)
    transformer = FluxTransformer2DModel(
        **{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=cfg.in_channels // 4,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def to_pipeline(pipe: FluxPipeline, **flux_overrides) -> Pipeline:
    """Our Pipeline holding the same weights and tokenizers, converted through distill_jax.port."""
    flux_cfg = FluxConfig.from_diffusers(dict(pipe.transformer.config), **flux_overrides)
    return Pipeline(
        transformer=flux_from_diffusers(state_dict(pipe.transformer), flux_cfg),
        vae=autoencoder_from_diffusers(
            state_dict(pipe.vae), AutoencoderConfig.from_diffusers(dict(pipe.vae.config))
        ),
        clip=clip_from_transformers(
            state_dict(pipe.text_encoder),
            CLIPTextConfig.from_transformers(pipe.text_encoder.config.to_dict()),
        ),
        t5=t5_from_transformers(
            state_dict(pipe.text_encoder_2),
            T5Config.from_transformers(pipe.text_encoder_2.config.to_dict()),
        ),
        clip_tokenizer=pipe.tokenizer,
        t5_tokenizer=pipe.tokenizer_2,
    )


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(diffusers FluxPipeline, our Pipeline) sharing weights and tokenizers."""
    pipe = tiny_flux_pipeline(tmp_path_factory.mktemp("flux"))
    return pipe, to_pipeline(pipe)


def assert_close(ours, ref, tol=TOL):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < tol, f"max error {err:.2e} of the reference's scale (tolerance {tol:.0e})"


@pytest.mark.parametrize("max_sequence_length", [16, 32])
def test_matches_diffusers_encode_prompt(pipes, max_sequence_length, caplog):
    pipe, ours = pipes
    # The long prompt really is cut by both tokenizers (else the test would not cover truncation).
    assert len(pipe.tokenizer(LONG).input_ids) > 77
    assert len(pipe.tokenizer_2(LONG).input_ids) > max_sequence_length
    with torch.no_grad():
        ref_t5, ref_pooled, ref_ids = pipe.encode_prompt(
            PROMPTS, prompt_2=None, max_sequence_length=max_sequence_length
        )
    with caplog.at_level(logging.WARNING, logger="distill_jax.pipeline.text"):
        t5, pooled, txt_ids = encode_prompts(ours, PROMPTS, max_sequence_length=max_sequence_length)
    assert t5.shape == (3, max_sequence_length, 32) and pooled.shape == (3, 32)
    assert_close(t5, ref_t5.numpy())
    assert_close(pooled, ref_pooled.numpy())
    np.testing.assert_array_equal(txt_ids, ref_ids.numpy())
    assert "CLIP: prompt(s) [1] truncated to 77 tokens" in caplog.text
    cut = [
        i for i, p in enumerate(PROMPTS) if len(pipe.tokenizer_2(p).input_ids) > max_sequence_length
    ]
    assert f"T5: prompt(s) {cut} truncated to {max_sequence_length} tokens" in caplog.text
    # Different prompts give different embeddings: the encoders are not degenerate.
    assert np.abs(np.asarray(pooled[0] - pooled[2])).max() > 1e-2


def test_single_prompt_string(pipes):
    _, ours = pipes
    t5, pooled, _ = encode_prompts(ours, PROMPTS[0], max_sequence_length=16)
    t5_batch, pooled_batch, _ = encode_prompts(ours, PROMPTS, max_sequence_length=16)
    assert t5.shape == (1, 16, 32)
    np.testing.assert_allclose(t5[0], t5_batch[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled[0], pooled_batch[0], rtol=1e-5, atol=1e-6)


def test_missing_tokenizer_files_are_named(tmp_path):
    clip_dir, t5_dir = tokenizer_dirs(tmp_path)
    good_clip = tmp_path / "tokenizer_copy"
    write_clip_tokenizer(good_clip)
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_tokenizers(tmp_path / "does_not_exist", t5_dir)
    (clip_dir / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"CLIP tokenizer folder .*tokenizer.* merges\.txt"):
        load_tokenizers(clip_dir, t5_dir)
    for f in t5_dir.iterdir():
        f.unlink()
    with pytest.raises(
        FileNotFoundError, match=r"T5 tokenizer folder .*tokenizer_2.*spiece\.model"
    ):
        load_tokenizers(good_clip, t5_dir)


def test_empty_prompts_rejected(pipes):
    with pytest.raises(ValueError, match="no prompts"):
        encode_prompts(pipes[1], [])
