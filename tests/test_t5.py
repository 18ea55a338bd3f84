"""T5 encoder against transformers' T5EncoderModel: outputs, the key table, config parsing."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.t5.modeling_t5 import T5Attention as TorchT5Attention

from distill_jax.models.t5 import (
    T5Config,
    T5Encoder,
    relative_position_buckets,
    t5_v1_1_xxl,
    tiny,
)
from distill_jax.port.params import param_shapes
from distill_jax.port.t5 import t5_from_transformers, t5_rules, t5_to_transformers
from distill_jax.port.table import PortError
from distill_jax.sharding import DEFAULT_RULES

# name -> (transformers T5Config kwargs, sequence length). The first uses T5's 32 buckets / 128
# and 150 tokens so distances past max_distance occur; the second has few buckets and a short
# max_distance, odd widths and three layers.
CONFIGS = {
    "tiny": (
        dict(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4),
        150,
    ),
    "few_buckets": (
        dict(
            vocab_size=77,
            d_model=24,
            d_kv=5,
            d_ff=40,
            num_layers=3,
            num_heads=3,
            relative_attention_num_buckets=12,
            relative_attention_max_distance=20,
            layer_norm_epsilon=1e-5,
        ),
        41,
    ),
}
BATCH = 3
TOL = 1e-5  # max abs error relative to the reference output's max abs value


def _torch_config(name: str, **overrides) -> transformers.T5Config:
    kwargs = dict(CONFIGS[name][0], feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return transformers.T5Config(**{**kwargs, **overrides}, attn_implementation="eager")


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    """(torch model, its NumPy state dict, our converted model, sequence length)."""
    torch.manual_seed(0)
    ref = transformers.T5EncoderModel(_torch_config(request.param)).eval()
    with torch.no_grad():  # a stronger position bias, so a wrong bucket would show in outputs
        ref.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(4.0)
    sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    cfg = T5Config.from_transformers(ref.config.to_dict())
    return ref, sd, t5_from_transformers(sd, cfg), CONFIGS[request.param][1]


def _relative_error(ours: jax.Array, ref: torch.Tensor) -> tuple[float, float]:
    ref = ref.detach().numpy()
    err = float(np.max(np.abs(np.asarray(ours) - ref)))
    return err, err / float(np.max(np.abs(ref)))


def _compare(pair, with_mask: bool) -> None:
    ref, _, model, seq = pair
    rng = np.random.default_rng(1)
    ids = rng.integers(0, ref.config.vocab_size, (BATCH, seq)).astype(np.int32)
    mask = None
    if with_mask:  # right padding of different lengths, and one left-padded row
        mask = np.ones((BATCH, seq), np.int32)
        mask[0, seq // 2 :] = 0
        mask[1, 3:] = 0
        mask[2, :5] = 0
    with torch.no_grad():
        out = ref(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=None if mask is None else torch.from_numpy(mask).long(),
        ).last_hidden_state
    with jax.default_matmul_precision("highest"):  # keep TF32 out if this runs on a GPU
        ours = model(jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
    assert ours.shape == tuple(out.shape)
    err, rel = _relative_error(ours, out)
    print(f"T5 {seq=} mask={with_mask}: max abs {err:.3g}, relative {rel:.3g}")
    assert rel < TOL


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "padding_mask"])
def test_matches_transformers(pair, with_mask):
    _compare(pair, with_mask)


@pytest.mark.parametrize(("buckets", "max_distance"), [(32, 128), (12, 20), (8, 16), (64, 256)])
def test_buckets_match_transformers(buckets, max_distance):
    seq = 600
    rel = torch.arange(-(seq - 1), seq)
    ref = TorchT5Attention._relative_position_bucket(rel, True, buckets, max_distance)
    ours = relative_position_buckets(seq, buckets, max_distance)
    np.testing.assert_array_equal(ours, ref.numpy())


def test_round_trip_is_bit_exact(pair):
    _, sd, model, _ = pair
    back = t5_to_transformers(model)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert back[key].tobytes() == value.tobytes(), key


def test_corrupted_state_dict_names_every_problem(pair):
    _, sd, model, _ = pair
    bad = dict(sd)
    missing = "encoder.block.1.layer.0.SelfAttention.k.weight"
    extra = "encoder.block.0.layer.0.SelfAttention.q.bias"
    wrong = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    del bad[missing]
    bad[extra] = np.zeros(3, np.float32)
    bad[wrong] = bad[wrong][:, :-1]
    with pytest.raises(PortError) as info:
        t5_from_transformers(bad, model.cfg)
    assert len(info.value.problems) == 3
    for key in (missing, extra, wrong):
        assert key in str(info.value)


def test_tied_embeddings(pair):
    _, sd, model, _ = pair
    # save_pretrained keeps one key of a tied pair: the other is aliased to it.
    only_shared = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    loaded = t5_from_transformers(only_shared, model.cfg)
    np.testing.assert_array_equal(loaded.embed.embedding[...], sd["shared.weight"])
    differ = dict(sd, **{"encoder.embed_tokens.weight": sd["shared.weight"] + 1.0})
    with pytest.raises(PortError, match="tied"):
        t5_from_transformers(differ, model.cfg)


def test_config_from_transformers():
    cfg = T5Config.from_transformers(_torch_config("few_buckets").to_dict())
    assert cfg == T5Config(**CONFIGS["few_buckets"][0])
    assert T5Config.from_transformers(_torch_config("tiny").to_dict()) == tiny()
    for proj in ("relu", "gated-silu"):
        with pytest.raises(ValueError, match="feed_forward_proj"):
            T5Config.from_transformers(_torch_config("tiny", feed_forward_proj=proj).to_dict())


def test_xxl_preset_is_fully_ruled():
    """The table covers T5-XXL exactly (abstract: nothing is allocated)."""
    cfg = t5_v1_1_xxl()
    model = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
    shapes = param_shapes(model)
    assert {r.target for r in t5_rules(cfg)} == set(shapes)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 4_762_310_656


def test_every_param_has_known_logical_axes():
    model = nnx.eval_shape(lambda: T5Encoder(tiny(), rngs=nnx.Rngs(0)))
    known = {name for name, _ in DEFAULT_RULES}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata("logical_axes", None)
        assert names is not None and len(names) == var.get_value().ndim, path
        assert set(names) - {None} <= known, path
