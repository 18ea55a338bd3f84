"""Training configs: the shared defaults every ``configs/*.py`` derives from, and loading.

Configs are ``ml_collections.ConfigDict`` built by ``get_config(arg)`` in a Python file; they are
locked, so a mistyped field (on the command line or in code) is an error, not a silent no-op.
Command lines use the JAX-ecosystem form ``--config path.py:arg --config.optim.lr=1e-6``.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

METHODS = ("flow_matching", "rescale", "scm", "meanflow")
DATA_KINDS = ("synthetic", "latents", "shapes")
# The settings that "auto" leaves to config.loss.paper_slips, and each one's values, the fixed
# default first: "auto" takes the paper's value (distill_jax.losses.paper_slips) when the switch
# is on and the method has that slip, else the default; any other value is kept (it wins over the
# switch). distill_jax.methods.resolve gives the effective values.
AUTO_SETTINGS = {
    "loss.time_dtype": ("float32", "bfloat16"),
    "model.logvar_time": ("flow", "trig"),
    "model.delta_init": ("zero", "copy"),
}


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with defaults; method configs override what they need."""
    c = ml_collections.ConfigDict()
    c.method = "scm"  # one of METHODS
    c.seed = 0
    c.total_steps = 1000
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3  # the newest steps kept; 0 keeps every one
    c.async_checkpoints = True
    c.max_consecutive_nonfinite = 20  # stop (with a checkpoint) past this many skipped steps
    c.grad_accum = 1  # micro-batches per optimizer step

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # a FluxConfig preset, used when teacher.path is empty
    c.model.overrides = ml_collections.ConfigDict()  # FluxConfig fields, e.g. {"num_double": 2}
    c.model.dtype = "bfloat16"  # compute dtype; parameters (master weights) are float32
    c.model.remat = "none"  # distill_jax.models.flux.REMAT_POLICIES
    # Blocks as one scan over stacked parameters (True) or a loop (False); None: the teacher's
    # layout (FluxConfig.scan_layers: stacked for the full-size presets). A teacher in the
    # other layout is restacked when it loads.
    c.model.scan_layers = config_dict.placeholder(bool)
    # Attention of the forward and backward passes; "auto": cuDNN on GPU, splash on TPU,
    # blockwise on CPU (distill_jax.models.attention.auto_impl). When it equals jvp_attn_impl
    # (blockwise on CPU, or "hijax") the student runs forward once per sCM / MeanFlow step.
    c.model.attn_impl = "auto"
    # Attention of the tangent (JVP) pass: "blockwise" never materialises the T x T matrix.
    c.model.jvp_attn_impl = "blockwise"
    # "auto" (AUTO_SETTINGS): the paper's value with config.loss.paper_slips, else the first.
    c.model.delta_init = "auto"  # MeanFlow Δ-embedder init: "zero" (student = teacher) | "copy"
    c.model.logvar_time = "auto"  # sCM logvar head on flow time s: "flow" | "trig" t (spec 7.9)
    # The student's time, guidance and Δ embeddings (sinusoid and MLP, and their JVP tangents)
    # in float32 whatever model.dtype, cast once summed (FluxConfig.time_embed_float32): NVIDIA
    # rCM's JVP route for sCM / MeanFlow from a stock (time_scale 1000) teacher
    c.model.time_embed_float32 = False

    c.teacher = ml_collections.ConfigDict()
    c.teacher.path = ""  # a `distill-jax convert` folder (or its transformer/); "" = random init
    # The student's initial parameters. "": the teacher's where the student has the same ones
    # (its extra heads random). A converted FLUX folder (`distill-jax convert` output or its
    # transformer/, or the WORKDIR/student that a finished run writes):
    # every parameter the folder has comes from it, the rest as without it. Read when a run
    # starts, never on resume (the workdir's checkpoints hold the state).
    c.teacher.init_checkpoint = ""

    c.data = ml_collections.ConfigDict()
    # "synthetic" | "latents" (a `distill-jax prepare` dataset) | "shapes" (the toy's world,
    # rendered on the fly and captioned by the toy teacher's text encoder: toy_config)
    c.data.kind = "synthetic"
    c.data.path = ""
    c.data.batch_size = 8  # global batch
    c.data.shuffle_seed = 0
    c.data.latent_grid = (8, 8)  # synthetic: latent h, w (before 2x2 packing)
    c.data.latent_channels = 4  # synthetic: VAE latent channels
    c.data.text_len = 8  # synthetic: text tokens
    c.data.synthetic_size = 1 << 20  # synthetic: records (= batch_size for one fixed batch)
    c.data.caption_dropout = 0.1  # shapes: the fraction of captions replaced by ""
    c.data.text_layers = 2  # shapes, teacher from scratch: T5 layers of its fixed text encoder
    # shapes, teacher from scratch: its autoencoder's latent channels per ae_patch^2 pixels
    # (principal components; 3 ae_patch^2 = the pixels themselves)
    c.data.ae_channels = 48
    c.data.ae_patch = 4
    c.data.ae_kind = "linear"  # or "mask_colour" (distill_jax.pipeline.toy.AUTOENCODERS)
    c.data.text_context = 0  # shapes, from scratch: neighbours in each word's token (0, 1, 2)

    # Shared loss settings, then one group per method whose fields are the keyword arguments of
    # its pure loss in distill_jax.losses (the trainer passes **config.loss.<method>).
    c.loss = ml_collections.ConfigDict()
    c.loss.guidance_values = (4.0, 4.5, 5.0)  # embedded guidance drawn per sample (spec 3.2, 4.3)
    # sCM and MeanFlow reproduce the paper code's slips (spec 7), the "auto" settings included
    c.loss.paper_slips = False
    # sCM and MeanFlow's times and coefficients, the TrigFlow wrapper's s and n(s), the models'
    # time inputs: "float32" | "bfloat16" (the paper's arithmetic, spec 7.6) | "auto"
    c.loss.time_dtype = "auto"
    # sCM and MeanFlow's time derivative d_t F in the tangent: "jvp" (exact, forward mode through
    # the time embedding) | "finite_difference" (exact JVP in the image input, central difference
    # (F(t + fd_dt) - F(t - fd_dt)) / (2 fd_dt) in float32 times: NVIDIA rCM's route for a stock
    # time_scale 1000 teacher; needs float32 time_dtype). Either of it and
    # model.time_embed_float32 lets sCM / MeanFlow take a stock teacher without the rescale stage.
    c.loss.time_derivative = "jvp"
    c.loss.fd_dt = 1e-4  # the finite difference's time step (TrigFlow t for sCM, flow t MeanFlow)
    # flow_matching_loss: flow times ~ logit-normal(logit_mean, logit_std); a positive mean
    # trains more at high noise, where a layout is decided (SD3 samples logit-normal(0, 1)).
    c.loss.flow_matching = ml_collections.ConfigDict()
    c.loss.flow_matching.logit_mean = 0.0
    c.loss.flow_matching.logit_std = 1.0
    c.loss.rescale = ml_collections.ConfigDict()  # rescale_regression_loss (spec 2.2)
    c.loss.rescale.guidance_range = (2.0, 5.0)  # g ~ U[lo, hi], raw units
    c.loss.rescale.loss = "mse"  # or "smooth_l1" (the paper's, with smooth_l1_beta)
    c.loss.rescale.smooth_l1_beta = 1.0
    c.loss.scm = ml_collections.ConfigDict()  # scm_loss (spec 3.3)
    c.loss.scm.sigma_d = 0.5
    c.loss.scm.p_mean = 0.2
    c.loss.scm.p_std = 1.6
    c.loss.scm.tangent_warmup_steps = 4000
    c.loss.scm.tangent_norm_c = 0.1
    c.loss.meanflow = ml_collections.ConfigDict()  # meanflow_loss (spec 4.4)
    c.loss.meanflow.cfg_prob = 0.1
    c.loss.meanflow.use_cfg = True
    c.loss.meanflow.omega = 1.0
    c.loss.meanflow.kappa = 0.5
    c.loss.meanflow.cfg_t_min = 0.0
    c.loss.meanflow.cfg_t_max = 1.0
    c.loss.meanflow.adaptive_p = 1.0
    c.loss.meanflow.adaptive_c = 1e-3
    c.loss.meanflow.mu = -0.4
    c.loss.meanflow.sigma = 1.0
    c.loss.meanflow.ratio_r_neq_t = 0.75

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-6
    c.optim.schedule = "constant"  # "constant" | "cosine" | "linear"
    c.optim.warmup_steps = 0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-4
    c.optim.clip = 1.0  # global-norm clipping (the paper's effective value, spec 7.1)
    c.optim.ema_decay = 0.0  # 0 = no EMA (the paper); e.g. 0.9999 as sCM evaluates

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 takes the remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.devices = -1  # how many devices the mesh uses (-1: all)
    c.mesh.rules = ml_collections.ConfigDict()  # overrides of sharding.DEFAULT_RULES
    c.mesh.replicated_threshold_bytes = 1 << 20  # assert nothing larger is replicated
    c.multihost = False  # join the auto-detected cluster first (the CLI's --multihost)
    c.peak_tflops_per_device = 0.0  # for MFU when the device is not in the known table
    # A finished run writes its student (the EMA when optim.ema_decay > 0) to WORKDIR/student,
    # a converted folder; its parameters stored in this dtype ("" = as trained, float32).
    c.save_dtype = ""
    return c


def load_config(
    spec: str, overrides: list[str] | tuple[str, ...] = ()
) -> ml_collections.ConfigDict:
    """``load_config("configs/scm.py:runlocal", ["--config.optim.lr=1e-5"])``: a locked config.

    Overrides are type-checked against the config's fields; an unknown field is an error.
    """
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise ValueError(f"config overrides must look like --config.field=value, got {bad}")
    config = _parse(spec, overrides)
    check_config(config)
    return config


def _parse(spec: str, overrides: list[str] | tuple[str, ...]) -> ml_collections.ConfigDict:
    """absl's parse of ``spec`` and ``overrides``, its errors as one-line ``ValueError``s."""
    path = spec.split(":", 1)[0]
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist (spec {spec!r})")
    argv = ["distill-jax", f"--config={spec}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", default=None, flag_values=values, lock_config=True, sys_argv=argv
    )
    try:
        values(argv)
    except flags.Error as err:  # a value of the wrong type, a file that does not load
        text = str(err).strip()
        if "Traceback" in text:  # the config file raised: its last line says what
            text = f"--config={spec}: {text.splitlines()[-1]}"
        raise ValueError(text) from None
    except (AttributeError, KeyError):  # an unknown field: name the nearest one
        if not overrides:
            raise
        known = set(_field_paths(_parse(spec, ())))
        for override in overrides:
            field = override.removeprefix("--config.").split("=", 1)[0]
            if field not in known and not any(k.startswith(field + ".") for k in known):
                near = difflib.get_close_matches(field, known, n=1, cutoff=0.5)
                hint = f"; did you mean config.{near[0]}?" if near else ""
                raise ValueError(f"{override}: {spec} has no field config.{field}{hint}") from None
        raise
    return values.config


def _field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every field's dotted path, nested configs' own paths included."""
    paths = []
    for name, value in config.items():
        paths.append(prefix + name)
        if isinstance(value, ml_collections.ConfigDict):
            paths += _field_paths(value, f"{prefix}{name}.")
    return paths


def _fields(config: ml_collections.ConfigDict, prefix: str) -> list[tuple[str, object]]:
    """``(dotted path, value)`` of every leaf field, nested configs walked."""
    out = []
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += _fields(value, f"{prefix}{name}.")
        else:
            out.append((prefix + name, value))
    return out


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses, naming the field, what would fail later (after a compile) or silently."""
    if config.method not in METHODS:
        raise ValueError(f"config.method={config.method!r}; choose one of {METHODS}")
    for field in ("total_steps", "log_every", "checkpoint_every", "grad_accum"):
        if config[field] < 1:
            raise ValueError(f"config.{field}={config[field]} must be >= 1")
    for field, value in (("seed", config.seed), ("data.shuffle_seed", config.data.shuffle_seed)):
        if not 0 <= value < 2**32:  # JAX's seeds are 32-bit: larger ones alias smaller ones
            raise ValueError(f"config.{field}={value} must be in [0, 2**32)")
    if config.keep_checkpoints < 0:
        raise ValueError(
            f"config.keep_checkpoints={config.keep_checkpoints}: the newest steps to keep, "
            "or 0 for all"
        )
    for group in ("optim", "loss"):
        for name, value in _fields(config[group], f"config.{group}."):
            values = value if isinstance(value, tuple | list) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f"{name}={value} is not finite")
    for path, values in AUTO_SETTINGS.items():
        if config[path] not in ("auto", *values):
            raise ValueError(f"config.{path}={config[path]!r}; choose one of {('auto', *values)}")
    if config.data.kind not in DATA_KINDS:
        raise ValueError(f"config.data.kind={config.data.kind!r}; choose one of {DATA_KINDS}")
    if config.save_dtype not in ("", "bfloat16", "float32"):
        raise ValueError(f"config.save_dtype={config.save_dtype!r}: '', bfloat16 or float32")
    if config.data.batch_size % config.grad_accum:
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} is not divisible by "
            f"config.grad_accum={config.grad_accum}"
        )


def flux_lite_512(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's setting: FLUX.1-lite-8B at 512 px (latents 16x64x64, 256 T5 tokens), bf16
    compute with full per-block rematerialization, FSDP over every device, data from `prepare`."""
    c.model.preset = "flux1_lite_8b"
    c.model.dtype, c.model.remat = "bfloat16", "full"
    c.data.kind = "latents"
    c.data.latent_grid, c.data.latent_channels, c.data.text_len = (64, 64), 16, 256
    c.mesh.data, c.mesh.fsdp = 1, -1
    return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU-sized variant every config has: a tiny random model on synthetic latents, float32,
    20 steps, all devices data-parallel."""
    c.total_steps, c.log_every, c.checkpoint_every = 20, 5, 10
    c.model.preset = "tiny"
    c.model.dtype, c.model.remat = "float32", "none"
    c.data.kind = "synthetic"
    c.data.batch_size, c.data.latent_grid, c.data.latent_channels = 8, (4, 4), 4
    c.data.text_len = 8
    c.optim.lr, c.optim.warmup_steps = 1e-3, 0
    c.loss.scm.tangent_warmup_steps = 10
    c.mesh.data, c.mesh.fsdp = -1, 1
    return c


# The MeanFlow settings of the paper's ablation (its script's defaults are the base config's):
# "gamma2" weights the loss by (loss + c) instead of 1 / (loss + c), i.e. adaptive_p = -1 in
# w = 1 / (loss + c)^p, a squared loss ("gamma = 2"); "window" applies CFG-MeanFlow only for
# flow times in [0.3, 0.8]. The paper's best MeanFlow run used both.
MEANFLOW_VARIANTS = {
    "gamma2": {"adaptive_p": -1.0},
    "window": {"use_cfg": True, "cfg_t_min": 0.3, "cfg_t_max": 0.8},
}


def toy_config(method: str = "flow_matching") -> ml_collections.ConfigDict:
    """The toy of the shapes world (:mod:`distill_jax.pipeline.toy`): its teacher
    (``"flow_matching"``, from scratch), a student of it (``"scm"``, ``"meanflow"``: set
    ``teacher.path`` to a toy folder) or the rescale stage of a stock one (``"rescale"``: a
    teacher of ``time_scale`` 1000 to 1). ``configs/toy_teacher.py``, ``configs/toy_distill.py``,
    ``configs/rescale.py:toy`` and `distill-jax demo` use these."""
    c = base_config()
    c.method = method
    c.model.preset = "toy"  # the teacher from scratch; students take the teacher's structure
    c.model.dtype, c.model.remat = "float32", "none"
    c.data.kind = "shapes"
    c.data.text_layers = 0  # word embeddings and positions: the words' meaning is not mixed
    # 16 channels at 1/8 the side, as FLUX's VAE; each patch's object mask apart from its colour
    c.data.ae_kind, c.data.ae_channels, c.data.ae_patch = "mask_colour", 16, 8
    c.data.text_context = 2  # each word's token holds its neighbours (toy.encode_text)
    c.log_every, c.async_checkpoints = 50, False
    c.loss.guidance_values = (0.0,)  # no guidance embedder: unused
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.optim.clip = 1.0
    if method == "flow_matching":
        c.total_steps, c.checkpoint_every = 12000, 1000
        c.data.batch_size = 64
        c.loss.flow_matching.logit_mean = 1.0  # logit-normal(1, 1): median flow time 0.73
        c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 6e-4, 200, "cosine"
        c.optim.ema_decay = 0.999
        c.optim.weight_decay = 0.0
        c.save_dtype = "bfloat16"  # half the size; the demo's accuracies are unchanged (+-0.4%)
    elif method == "scm":
        c.total_steps, c.checkpoint_every = 800, 400
        c.data.batch_size = 32
        # With the first toy teachers (linear latents) a film of noise over the samples grew
        # with the learning rate and with training at a high one (1-step background noise: 8.9
        # at 2e-4, 19.7 after 1600 steps at 2e-4, 8.0 at 1e-4, 6.7 at 5e-5 and 2e-5; the
        # teacher's 2.9): README, the demo.
        c.optim.lr, c.optim.weight_decay = 2e-5, 0.0
        c.loss.scm.tangent_warmup_steps = 100
    elif method == "meanflow":
        c.total_steps, c.checkpoint_every = 800, 400
        c.data.batch_size = 32
        c.optim.lr, c.optim.weight_decay = 5e-5, 0.0  # cleaner than 2e-4 (README, the demo)
        c.loss.meanflow.use_cfg = False
        # The paper's squared loss (its ablation's best): on the toy world it beat the plain
        # weighting and the CFG window at 1, 2 and 4 steps (README, the demo).
        c.loss.meanflow.update(MEANFLOW_VARIANTS["gamma2"])
        c.model.delta_init = "zero"
    elif method == "rescale":
        c.total_steps, c.checkpoint_every = 2000, 500
        c.data.batch_size = 64
        c.loss.rescale.guidance_range = None  # the toy embeds no guidance
        c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-4, 50, 0.0
    else:
        raise ValueError(f"toy_config: method={method!r}; flow_matching, scm, meanflow or rescale")
    return c


def variant(c: ml_collections.ConfigDict, arg: str | None, where: str) -> ml_collections.ConfigDict:
    """Applies a config file's argument: none (the full run), ``runlocal``, and for MeanFlow any
    of :data:`MEANFLOW_VARIANTS`, comma-separated (``gamma2,window``)."""
    names = [a for a in (arg or "").split(",") if a]
    allowed = ["runlocal", *(MEANFLOW_VARIANTS if c.method == "meanflow" else ())]
    unknown = [a for a in names if a not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown argument {arg!r} (use {', '.join(allowed)} or nothing)")
    for name in names:
        if name == "runlocal":
            c = runlocal(c)
        else:
            c.loss.meanflow.update(MEANFLOW_VARIANTS[name])
    return c
