"""Scanned blocks (``FluxConfig.scan_layers``): the same function as the per-block loop, the same
checkpoints in and out.

A model with stacked blocks and one without, built from one seed, hold the same weights
(:func:`relayout` moves them bit for bit). Outputs, JVPs (in the latents and in time) and
parameter gradients agree to 1e-5 of their scale in float32, without remat and under remat
(dots; the trainer's test runs full), with the attention implementations of both trainer
passes; so do the trainer's sCM loss and its
gradient, with the tangent pass on its own graphdef (blockwise attention) or on the student's.
The port tables convert diffusers and BFL state dicts straight into the stacked layout and
export them back bit for bit; Orbax checkpoints and converted folders round-trip; sharding of
the stacked parameters keeps the rules of the per-block ones. The trainer restacks a teacher
folder into the configured layout, trains, resumes and saves a scanned student, counts every
block's FLOPs, and its dry run compiles the real step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from test_flux import (
    Case,
    assert_close,
    inputs,
    sharded_forward,
    state_dict,
    student_heads,
    torch_flux,
    torch_forward,
)

from distill_jax.checkpoint import Checkpoints
from distill_jax.config import base_config, load_config
from distill_jax.folders import load_flux, save_model
from distill_jax.memory import abstract_inputs, abstract_teacher, lower_step, plan_memory
from distill_jax.models.flux import Flux, FluxConfig, relayout
from distill_jax.port.flux import (
    abstract_flux,
    bfl_rules,
    diffusers_rules,
    flux_from_bfl,
    flux_from_diffusers,
    flux_to_bfl,
    flux_to_diffusers,
)
from distill_jax.port.params import flat_params
from distill_jax.port.table import PortError
from distill_jax.sharding import (
    DEFAULT_RULES,
    abstract_sharded,
    assert_not_replicated,
    init_sharded,
    make_mesh,
    state_shardings,
)
from distill_jax.train import load_teacher, make_setup, mesh_and_rules, train, unrolled_flops

REL = 1e-5
CFG = FluxConfig.tiny().replace(num_double=2, num_single=3)  # two scan steps of each kind
TOY_TEACHER = "distill_jax/assets/toy_teacher"


def both(cfg: FluxConfig = CFG, seed: int = 0, **kw) -> tuple[Flux, Flux]:
    """(per-block, stacked) models from one seed."""
    return tuple(
        Flux(cfg.replace(scan_layers=scan), rngs=nnx.Rngs(seed), **kw) for scan in (False, True)
    )


def flat(state: nnx.State) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def assert_same_state(a: nnx.State, b: nnx.State) -> None:
    """Bit-for-bit equal values and equal logical axes, path by path."""
    fa, fb = dict(nnx.to_flat_state(a)), dict(nnx.to_flat_state(b))
    assert set(fa) == set(fb)
    for path, var in fa.items():
        np.testing.assert_array_equal(var.get_value(), fb[path].get_value(), err_msg=str(path))
        names = var.get_metadata("logical_axes", None)
        assert names == fb[path].get_metadata("logical_axes", None), path


def assert_trees_close(got, want, rel: float = REL) -> None:
    """Every leaf within ``rel`` of its own scale (max |want|)."""
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape
        scale = max(np.abs(w).max(), np.finfo(np.float32).tiny)
        assert np.abs(g - w).max() <= rel * scale, (np.abs(g - w).max() / scale, w.shape)


# --- structure --------------------------------------------------------------------------------


def test_presets_scan_when_full_size_and_the_toy_teacher_loads_as_written():
    for name in ("flux1_dev", "flux1_schnell", "flux1_lite_8b"):
        assert FluxConfig.preset(name).scan_layers, name
    for name in ("tiny", "mid", "toy"):
        assert not FluxConfig.preset(name).scan_layers, name
    # Explicit values win over the depth rule, and replace() keeps the resolved layout.
    assert FluxConfig.tiny().replace(scan_layers=True).scan_layers
    assert FluxConfig.flux1_lite_8b().replace(num_double=1, num_single=1).scan_layers
    # The shipped toy teacher predates the field: per-block, checksums verified by load_flux.
    model = load_flux(TOY_TEACHER)
    assert not model.cfg.scan_layers
    assert isinstance(model.double_blocks, nnx.List) and len(model.single_blocks) == 2


def test_stacked_parameters_have_a_leading_layers_axis():
    flat_model = abstract_flux(CFG.replace(scan_layers=True))
    state = dict(nnx.to_flat_state(nnx.state(flat_model, nnx.Param)))
    kernel = state[("double_blocks", "img_attn", "qkv", "kernel")]
    assert kernel.get_value().shape == (2, CFG.hidden, 3 * CFG.hidden)
    assert kernel.get_metadata("logical_axes") == ("layers", "embed", "heads")
    scale = state[("single_blocks", "query_norm", "scale")]
    assert scale.get_value().shape == (3, CFG.head_dim)
    assert scale.get_metadata("logical_axes") == ("layers", "norm")
    assert not any(isinstance(p[1], int) for p in state if p[0].endswith("_blocks"))
    # The same parameter count as the per-block layout.
    per_block = nnx.state(abstract_flux(CFG), nnx.Param)
    count = lambda s: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s))  # noqa: E731
    assert count(nnx.state(flat_model, nnx.Param)) == count(per_block)


def test_one_seed_gives_one_model_in_both_layouts_and_relayout_is_bit_exact():
    loop, scan = both()
    a, b = nnx.state(loop, nnx.Param), nnx.state(scan, nnx.Param)
    assert_same_state(relayout(a, True), b)
    assert_same_state(relayout(b, False), a)
    assert_same_state(relayout(a, False), a)  # already in that layout: unchanged
    with pytest.raises(ValueError, match="not 0..N-1"):
        kept = [(p, v) for p, v in nnx.to_flat_state(a) if p[:2] != ("double_blocks", 0)]
        relayout(nnx.from_flat_state(kept), True)


# --- the same function --------------------------------------------------------------------------


# Each attention once, the tangent pass's blockwise under a remat policy (the trainer's
# sCM test below runs remat full).
@pytest.mark.parametrize(("remat", "attn_impl"), [("none", "xla"), ("dots", "blockwise")])
def test_outputs_jvps_and_gradients_agree(remat, attn_impl):
    case = Case(CFG, batch=2, grid=(4, 4), text_len=5)
    x = {k: jnp.asarray(v) for k, v in inputs(case).items()}
    rng = np.random.default_rng(3)
    dx = jnp.asarray(rng.standard_normal(x["hidden_states"].shape), jnp.float32)
    dt = jnp.ones_like(x["timestep"])
    results = []
    for model in both(remat=remat, attn_impl=attn_impl):
        graphdef, params = nnx.split(model)

        def run(params, hidden_states, timestep, graphdef=graphdef):
            return nnx.merge(graphdef, params)(
                **{**x, "hidden_states": hidden_states, "timestep": timestep}
            )

        @jax.jit
        def passes(params, run=run):
            out, tangent = jax.jvp(
                lambda h, t: run(params, h, t), (x["hidden_states"], x["timestep"]), (dx, dt)
            )
            grads = jax.grad(lambda p: jnp.sum(jnp.sin(run(p, x["hidden_states"], x["timestep"]))))(
                params
            )
            return out, tangent, grads

        out, tangent, grads = passes(params)
        results.append((out, tangent, relayout(grads, False)))
    (out0, tan0, g0), (out1, tan1, g1) = results
    assert_trees_close(out1, out0)
    assert_trees_close(tan1, tan0)
    assert_trees_close(flat(g1), flat(g0))
    assert np.abs(np.asarray(tan0)).max() > 0


def tiny_scm(scan_layers: bool, jvp_attn_impl: str):
    c = base_config()
    c.method = "scm"
    c.model.overrides = {"time_scale": 1.0, "num_double": 2, "num_single": 2}
    c.model.dtype, c.model.remat = "float32", "full"
    c.model.scan_layers = scan_layers
    c.model.jvp_attn_impl = jvp_attn_impl
    c.mesh.devices = 1
    c.loss.scm.tangent_warmup_steps = 2
    c.data.latent_grid, c.data.latent_channels, c.data.batch_size = (4, 4), 4, 4
    return c


@pytest.mark.parametrize("jvp_attn_impl", ["blockwise", "xla"])
def test_scm_loss_and_gradient_agree_in_the_trainer(jvp_attn_impl):
    """ "blockwise" differs from the gradient pass's "xla": the tangent runs on its own graphdef;
    "xla" takes the student's forward from the JVP's primal (one graphdef)."""
    rng = np.random.default_rng(0)
    batch = {
        "latents": rng.standard_normal((4, 4, 4, 4)).astype(np.float32),
        "t5": rng.standard_normal((4, 8, CFG.context_dim)).astype(np.float32),
        "pooled": rng.standard_normal((4, CFG.pooled_dim)).astype(np.float32),
    }
    aux = {
        "uncond_t5": np.zeros((8, CFG.context_dim), np.float32),
        "uncond_pooled": np.zeros((CFG.pooled_dim,), np.float32),
    }
    results = []
    for scan in (False, True):
        config = tiny_scm(scan, jvp_attn_impl)
        mesh, rules = mesh_and_rules(config)
        teacher_cfg, teacher = load_teacher(config, mesh, rules)
        assert teacher_cfg.scan_layers == scan
        setup = make_setup(config, mesh, rules, teacher_cfg, teacher)
        assert setup.student_cfg.scan_layers == scan
        state = jax.jit(setup.init_fn)(teacher, setup.root)
        grad_fn = jax.jit(jax.value_and_grad(setup.loss_fn, has_aux=True))
        with jax.set_mesh(mesh):
            (loss, metrics), grads = grad_fn(
                state["params"], teacher, batch, aux, jax.random.key(1), jnp.int32(5)
            )
        results.append((teacher, state["params"], loss, metrics, grads))
    (t0, p0, l0, m0, g0), (t1, p1, l1, m1, g1) = results
    assert_same_state(relayout(t0, True), t1)  # one seed, one teacher
    assert_same_state(relayout(p0, True), p1)  # and one student
    assert_trees_close(l1, l0)
    assert_trees_close(m1, m0)
    assert_trees_close(flat(relayout(g1, False)), flat(g0))


# --- checkpoints in and out -----------------------------------------------------------------------


@pytest.mark.parametrize("heads", [False, True])
def test_diffusers_and_bfl_convert_into_the_stacked_layout_and_back_bit_for_bit(heads):
    cfg = CFG.replace(delta_embed=heads, logvar_head=heads)
    ref = torch_flux(cfg.replace(delta_embed=False, logvar_head=False))
    sd = state_dict(ref)
    if heads:  # the students' extra heads, named as the paper's code names them
        sd |= student_heads(cfg, seed=0)
    loop = flux_from_diffusers(sd, cfg.replace(scan_layers=False))
    scan = flux_from_diffusers(sd, cfg.replace(scan_layers=True))
    # Straight into the stacked layout: the per-block model's parameters, stacked.
    assert_same_state(relayout(nnx.state(loop, nnx.Param), True), nnx.state(scan, nnx.Param))
    for model in (loop, scan):
        back = flux_to_diffusers(model)
        assert sorted(back) == sorted(sd)
        for k, v in sd.items():
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    # BFL: both layouts export the same file, which converts back into the stacked layout.
    bfl = flux_to_bfl(loop)
    stacked_bfl = flux_to_bfl(scan)
    assert sorted(bfl) == sorted(stacked_bfl)
    for k, v in bfl.items():
        assert np.array_equal(stacked_bfl[k], v), k
    again = flux_from_bfl(bfl, cfg.replace(scan_layers=True))
    for k, v in flat_params(again).items():
        assert np.array_equal(v, flat_params(scan)[k]), k
    # Every source read once into a stacked target: one rule per parameter name.
    rules = diffusers_rules(cfg.replace(scan_layers=True))
    assert len({s for r in rules for s in r.sources}) == len(sd)
    assert any(r.target == "double_blocks.img_attn.qkv.kernel" for r in rules)
    assert len(bfl_rules(cfg.replace(scan_layers=True))) < len(bfl_rules(cfg))


def test_stacked_model_matches_diffusers():
    case = Case(CFG, batch=2, grid=(4, 6))
    ref = torch_flux(CFG)
    model = flux_from_diffusers(state_dict(ref), CFG.replace(scan_layers=True))
    x = inputs(case)
    assert_close(model(**x), torch_forward(ref, x))


def test_missing_block_of_a_stacked_conversion_is_named():
    sd = state_dict(torch_flux(CFG))
    del sd["single_transformer_blocks.2.proj_out.weight"]
    with pytest.raises(PortError, match="single_transformer_blocks.2.proj_out.weight"):
        flux_from_diffusers(sd, CFG.replace(scan_layers=True))


def test_orbax_checkpoint_and_folder_round_trip_sharded(tmp_path):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg = CFG.replace(scan_layers=True)
    model = init_sharded(lambda: Flux(cfg, rngs=nnx.Rngs(0)), mesh)
    params = nnx.state(model, nnx.Param)
    qkv = params["double_blocks"]["img_attn"]["qkv"]["kernel"].get_value()
    assert qkv.sharding.spec == PartitionSpec(None, "fsdp", "tensor")  # layers never sharded
    ckpts = Checkpoints(tmp_path / "run", async_save=False)
    ckpts.save(3, {"params": params}, config={}, data={})
    ckpts.wait()
    shardings = state_shardings(nnx.state(abstract_flux(cfg), nnx.Param), mesh)
    step, restored, _, _ = ckpts.restore_latest({"params": abstract_sharded(params, shardings)})
    ckpts.close()
    assert step == 3
    assert_same_state(restored["params"], params)
    got = restored["params"]["double_blocks"]["img_attn"]["qkv"]["kernel"].get_value()
    assert got.sharding.is_equivalent_to(qkv.sharding, qkv.ndim)
    # A converted folder keeps its layout in config.json and restores into it.
    save_model(model, tmp_path / "student")
    loaded = load_flux(tmp_path / "student", mesh=mesh)
    assert loaded.cfg == cfg
    assert_same_state(nnx.state(loaded, nnx.Param), params)


def test_sharded_stacked_forward_matches_unsharded():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    loop, scan = both()
    sharded = init_sharded(lambda: Flux(CFG.replace(scan_layers=True), rngs=nnx.Rngs(0)), mesh)
    expected = state_shardings(nnx.state(abstract_flux(CFG.replace(scan_layers=True))), mesh)
    flat_expected = dict(nnx.to_flat_state(expected))
    for path, var in nnx.to_flat_state(nnx.state(sharded)):
        want = flat_expected[path].get_value()
        assert var.get_value().sharding.is_equivalent_to(want, var.get_value().ndim), path
        assert want.spec[0] is None if path[0].endswith("_blocks") else True, path
    x = inputs(Case(CFG, batch=4))
    out = sharded_forward(sharded, x, mesh)
    assert_trees_close(out, loop(**x))


def test_replication_check_judges_stacked_parameters_per_layer():
    """FLUX.1-lite-8B's stacked single-block modulation biases, (38, 9216) float32, are 1.4 MB
    but 36 KiB a layer: replicated as the per-block ones were, and not refused for it."""
    mesh = make_mesh({"fsdp": 8})
    state = nnx.state(abstract_flux(FluxConfig.flux1_lite_8b()), nnx.Param)
    assert_not_replicated(state, state_shardings(state, mesh))
    rules = {**dict(DEFAULT_RULES), "embed": None, "mlp": None, "heads": None}
    with pytest.raises(AssertionError, match=r"single_blocks.*linear1.*kernel"):
        assert_not_replicated(state, state_shardings(state, mesh, tuple(rules.items())))


# --- the trainer ----------------------------------------------------------------------------------


def test_config_field_restacks_a_teacher_folder():
    config = load_config("configs/scm.py:runlocal", ["--config.model.scan_layers=True"])
    assert config.model.scan_layers is True
    config.teacher.path = TOY_TEACHER
    config.mesh.devices = 1
    mesh, rules = mesh_and_rules(config)
    cfg, params = load_teacher(config, mesh, rules)
    assert cfg.scan_layers and cfg.replace(scan_layers=False) == load_flux(TOY_TEACHER).cfg
    assert_same_state(params, relayout(nnx.state(load_flux(TOY_TEACHER), nnx.Param), True))
    assert load_config("configs/scm.py:runlocal").model.scan_layers is None  # the model's own


def test_dry_run_compiles_the_real_step_of_a_scanned_model():
    config = tiny_scm(True, "blockwise")
    plan = plan_memory(config, compile="extrapolate")
    assert plan["compiled"] == "full" and "activations_extrapolated" not in plan
    assert plan["activations_gib"] > 0


def test_flops_of_a_scanned_step_count_every_block_and_attention():
    """XLA's cost analysis counts a scan's body once and the blockwise sweep as one tile;
    unrolled_flops counts the unrolled step with plain attention, one student pass or two as the
    configured program runs."""
    flops = lambda lowered: lowered.cost_analysis()["flops"]  # noqa: E731 (one device)

    def reference(jvp_attn_impl):  # unrolled, loop-free attention
        c = tiny_scm(False, jvp_attn_impl)
        c.model.attn_impl = "plain"
        return flops(lower_step(c))

    counts = []
    for jvp_attn_impl, counted in (("blockwise", "plain"), ("xla", "xla")):
        config = tiny_scm(True, jvp_attn_impl)  # attn_impl "auto": blockwise on CPU
        cfg = abstract_teacher(config, *mesh_and_rules(config))[0]
        assert cfg.scan_layers
        counts.append(unrolled_flops(config, cfg, *abstract_inputs(config, cfg)))
        assert counts[-1] == pytest.approx(reference(counted))
        assert flops(lower_step(config)) < 0.9 * counts[-1]
    one_pass, two_passes = counts
    assert two_passes > 1.1 * one_pass  # the separate tangent pass's student forward


def test_scanned_training_checkpoints_resumes_and_saves_its_student(tmp_path):
    config = tiny_scm(True, "blockwise")
    config.total_steps, config.log_every, config.checkpoint_every = 2, 1, 1
    config.async_checkpoints = False
    first = train(config, tmp_path)
    assert first.metrics[-1]["perf/tflops_per_device"] > 0  # every block counted
    config.total_steps = 3
    second = train(config, tmp_path)
    assert [m["step"] for m in second.metrics] == [3]
    assert np.isfinite(second.metrics[-1]["train/loss"])
    student = load_flux(tmp_path / "student")
    assert student.cfg.scan_layers and student.cfg.logvar_head
    assert_same_state(nnx.state(student, nnx.Param), jax.device_get(second.state["params"]))
