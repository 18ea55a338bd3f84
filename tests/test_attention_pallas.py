"""The Pallas forward-and-tangent attention kernel in the Pallas interpreter (CPU), against the
float64 closed forms of tests/test_attention.py and against the blockwise sweep (``_sweep``, the
JVP rule of ``blockwise_attention``) at the same tiles.

Shapes: B, T, H, K = 2, 37, 3, 16 (T prime: no tile divides it). Tolerances are max |error| /
max |reference|. Against float64: 5e-6 for float32 (observed <= 9e-7), 2e-2 for bfloat16 on
the same rounded inputs (observed <= 8.3e-3). Against the blockwise sweep (the same recurrence,
the same casts): 1e-6 for float32, 4e-3 (one bfloat16 ulp at the output's scale)
for bfloat16; observed 0 for both.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import TOL, arrays, assert_close, largest_buffer, ref_attention, ref_tangent

from distill_jax.models.attention import _sweep
from distill_jax.models.attention_pallas import pallas_forward_and_tangent

SWEEP_TOL = {"float32": 1e-6, "bfloat16": 4e-3}
CASES = [  # dtype, block_q, block_kv
    ("float32", 16, 8),
    ("float32", 8, 16),
    ("float32", 8, 36),  # the last key tile holds one real key and 35 padded ones
    ("float32", 64, 64),  # tiles larger than T: one tile each way
    ("bfloat16", 16, 8),
    ("bfloat16", 64, 64),
]


@pytest.mark.parametrize("dtype,block_q,block_kv", CASES)
def test_value_and_tangent_match_closed_form_and_blockwise(dtype, block_q, block_kv):
    q, k, v, dq, dk, dv = xs = arrays(dtype)
    out, d_out = pallas_forward_and_tangent(*xs, block_q=block_q, block_kv=block_kv, interpret=True)
    assert out.dtype == d_out.dtype == q.dtype

    f64 = [np.asarray(x, np.float64) for x in xs]
    assert_close(out, ref_attention(*f64[:3]), TOL[dtype], "value")
    assert_close(d_out, ref_tangent(*f64), TOL[dtype], "tangent")

    # _sweep runs the tiles as given (blockwise_attention would even them out first).
    sweep, d_sweep = _sweep(q, k, v, (dq, dk, dv), block_q, block_kv)
    assert_close(out, sweep, SWEEP_TOL[dtype], "value vs blockwise")
    assert_close(d_out, d_sweep, SWEEP_TOL[dtype], "tangent vs blockwise")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="compiles the kernel off CPU")
def test_interprets_by_default_on_cpu():
    xs = arrays("float32", shape=(1, 5, 1, 8), seed=1)
    default = pallas_forward_and_tangent(*xs, block_q=8, block_kv=4)
    interpreted = pallas_forward_and_tangent(*xs, block_q=8, block_kv=4, interpret=True)
    np.testing.assert_array_equal(default, interpreted)


def test_never_holds_the_score_matrix():
    """Compiled (interpreted) HLO at T = 512, tiles of 128: no buffer as large as one head's
    T x T scores (the largest: [128, 128] tiles and the [1, 2, 512, 16] inputs; tiles of 512
    would hold [512, 512])."""
    x = jax.ShapeDtypeStruct((1, 512, 2, 16), jnp.float32)
    fn = lambda *xs: pallas_forward_and_tangent(*xs, block_q=128, block_kv=128, interpret=True)  # noqa: E731
    size, shape = largest_buffer(jax.jit(fn).lower(*(x,) * 6).compile().as_text())
    assert size < 512 * 512, f"holds a [{shape}] buffer"


@pytest.mark.parametrize(
    "block_q,block_kv,name",
    [(0, 8, "block_q"), (8, -1, "block_kv"), (8.0, 8, "block_q"), (8, True, "block_kv")],
)
def test_bad_tiles_have_clear_errors(block_q, block_kv, name):
    xs = arrays("float32", shape=(1, 5, 1, 8))
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        pallas_forward_and_tangent(*xs, block_q=block_q, block_kv=block_kv)


def test_mismatched_shapes_have_a_clear_error():
    xs = arrays("float32", shape=(1, 5, 1, 8))
    with pytest.raises(ValueError, match=r"one shape \[B, T, H, K\]"):
        pallas_forward_and_tangent(*xs[:5], xs[5][:, :4], block_q=8, block_kv=8)
