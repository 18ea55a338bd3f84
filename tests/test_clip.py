"""CLIP text encoder against transformers' CLIPTextModel: outputs, pooling, key table, config."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from distill_jax.models.clip import CLIPTextConfig, CLIPTextEncoder, clip_l, tiny
from distill_jax.port.clip import clip_from_transformers, clip_rules, clip_to_transformers
from distill_jax.port.params import param_shapes
from distill_jax.port.table import PortError
from distill_jax.sharding import DEFAULT_RULES

VOCAB, MAX_POS = 99, 77
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=37,
    max_position_embeddings=MAX_POS,
)
# name -> config overrides. "legacy": eos id 2 (as FLUX's CLIP-L), pooled at the largest id.
# "eos": a real eos id that is not the largest id, pooled at its first occurrence.
CONFIGS = {
    "legacy": dict(eos_token_id=2, hidden_act="quick_gelu"),
    "eos": dict(eos_token_id=VOCAB - 3, hidden_act="gelu", layer_norm_eps=1e-6),
}
TOL = 1e-5  # max abs error relative to the reference output's max abs value


def _torch_config(name: str, **overrides) -> transformers.CLIPTextConfig:
    kwargs = {**SIZES, "bos_token_id": 0, "pad_token_id": 1, **CONFIGS[name], **overrides}
    return transformers.CLIPTextConfig(**kwargs, attn_implementation="eager")


def _input_ids(eos: int, seq: int) -> np.ndarray:
    """Rows with the end-of-text token at different places, padded with it as FLUX's tokenizer does.

    Ordinary tokens stay below ``eos`` except in the last row, which holds the largest id before
    its first eos (legacy pooling then picks that token, first-occurrence pooling the eos).
    """
    rng = np.random.default_rng(1)
    ids = rng.integers(3, min(eos, VOCAB - 3), (4, seq))
    ids[:, 0] = 0  # start of text
    for row, end in enumerate((5, seq - 1, 17, 30)):
        ids[row, end:] = eos
    ids[3, 12] = VOCAB - 1
    return ids.astype(np.int32)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    """(torch model, its NumPy state dict, our converted model)."""
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(_torch_config(request.param)).eval()
    sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    cfg = CLIPTextConfig.from_transformers(ref.config.to_dict())
    return ref, sd, clip_from_transformers(sd, cfg)


def _relative_error(ours: jax.Array, ref: torch.Tensor) -> tuple[float, float]:
    ref = ref.detach().numpy()
    err = float(np.max(np.abs(np.asarray(ours) - ref)))
    return err, err / float(np.max(np.abs(ref)))


@pytest.mark.parametrize("seq", [MAX_POS, 40])
def test_matches_transformers(pair, seq):
    ref, _, model = pair
    eos = VOCAB - 1 if model.cfg.eos_token_id == 2 else model.cfg.eos_token_id
    ids = _input_ids(eos, seq)
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids).long())
    with jax.default_matmul_precision("highest"):  # keep TF32 out if this runs on a GPU
        hidden, pooled = model(jnp.asarray(ids))
    for name, ours, theirs in (
        ("last_hidden_state", hidden, out.last_hidden_state),
        ("pooled", pooled, out.pooler_output),
    ):
        assert ours.shape == tuple(theirs.shape)
        err, rel = _relative_error(ours, theirs)
        print(f"CLIP eos={model.cfg.eos_token_id} {seq=} {name}: max abs {err:.3g}, rel {rel:.3g}")
        assert rel < TOL


@pytest.mark.parametrize(
    ("eos_token_id", "expect"), [(2, [5, 76, 17, 12]), (VOCAB - 3, [5, 76, 17, 30])]
)
def test_pool_index(eos_token_id, expect):
    """Legacy: first largest id (row 3 holds VOCAB-1 before its eos); else first eos."""
    cfg = CLIPTextConfig(**{**SIZES, "eos_token_id": eos_token_id})
    model = nnx.eval_shape(lambda: CLIPTextEncoder(cfg, rngs=nnx.Rngs(0)))
    ids = _input_ids(VOCAB - 1 if eos_token_id == 2 else eos_token_id, MAX_POS)
    np.testing.assert_array_equal(model.pool_index(jnp.asarray(ids)), expect)


def test_round_trip_is_bit_exact(pair):
    _, sd, model = pair
    back = clip_to_transformers(model)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert back[key].tobytes() == value.tobytes(), key


def test_corrupted_state_dict_names_every_problem(pair):
    _, sd, model = pair
    bad = dict(sd)
    missing = "encoder.layers.1.self_attn.v_proj.bias"
    extra = "text_projection.weight"
    wrong = "encoder.layers.0.mlp.fc1.weight"
    del bad[missing]
    bad[extra] = np.zeros((4, 32), np.float32)
    bad[wrong] = bad[wrong][:-1]
    with pytest.raises(PortError) as info:
        clip_from_transformers(bad, model.cfg)
    assert len(info.value.problems) == 3
    for key in (missing, extra, wrong):
        assert key in str(info.value)


def test_checkpoint_naming(pair):
    """On-disk checkpoints: ``text_model.`` prefix and a persisted ``position_ids`` buffer."""
    _, sd, model = pair
    on_disk = {f"text_model.{k}": v for k, v in sd.items()}
    on_disk["text_model.embeddings.position_ids"] = np.arange(MAX_POS)[None]
    loaded = clip_from_transformers(on_disk, model.cfg)
    back = clip_to_transformers(loaded)
    assert all(back[k].tobytes() == v.tobytes() for k, v in sd.items())
    on_disk["text_model.embeddings.position_ids"] = np.arange(MAX_POS)[None, ::-1]
    with pytest.raises(PortError, match="position_ids"):
        clip_from_transformers(on_disk, model.cfg)


def test_config_from_transformers():
    for name in CONFIGS:
        cfg = CLIPTextConfig.from_transformers(_torch_config(name).to_dict())
        assert cfg == CLIPTextConfig(**{**SIZES, **CONFIGS[name]})
    assert CLIPTextConfig.from_transformers(_torch_config("legacy").to_dict()) == tiny()
    full = transformers.CLIPConfig(text_config=_torch_config("legacy").to_dict()).to_dict()
    assert CLIPTextConfig.from_transformers(full) == tiny()
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_transformers(_torch_config("legacy", hidden_act="relu").to_dict())


def test_clip_l_preset_is_fully_ruled():
    cfg = clip_l()
    shapes = param_shapes(nnx.eval_shape(lambda: CLIPTextEncoder(cfg, rngs=nnx.Rngs(0))))
    assert {r.target for r in clip_rules(cfg)} == set(shapes)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 123_060_480


def test_every_param_has_known_logical_axes():
    model = nnx.eval_shape(lambda: CLIPTextEncoder(tiny(), rngs=nnx.Rngs(0)))
    known = {name for name, _ in DEFAULT_RULES}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata("logical_axes", None)
        assert names is not None and len(names) == var.get_value().ndim, path
        assert set(names) - {None} <= known, path
