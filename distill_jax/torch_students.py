"""Students that run in PyTorch: exported distill-jax folders sampled with diffusers' FLUX.

``distill-jax export CKPT OUT --format diffusers`` writes a ``FluxTransformer2DModel`` folder whose
``config.json`` also records, under ``_distill_jax``, the model's ``time_scale``, its extra heads
and its sampler. This module adds what diffusers lacks to sample it as distill-jax does:

- :class:`FluxStudent`: diffusers' transformer with the time-scale glue (diffusers multiplies
  ``timestep`` and ``guidance`` by 1000 inside the model, so a ``time_scale=1`` student is fed
  ``t / 1000``) and MeanFlow's second time embedder ``timestep_embedder2`` on ``t - r`` (diffusers'
  own ``Timesteps`` and ``TimestepEmbedding`` blocks, added to the conditioning vector by a forward
  hook on ``time_text_embed``, spec section 1.2); sCM's ``logvar_linear`` is loaded too (it only
  matters for training).
- :func:`euler_sample`, :func:`scm_sample`, :func:`meanflow_sample`: the samplers of
  :mod:`distill_jax.pipeline.samplers`, step for step, on the same schedules
  (:mod:`distill_jax.pipeline.schedules`).
- :class:`FluxStudentPipeline`: ``FluxPipeline`` with the student's sampler in its loop's place.

torch and diffusers are imported here only (``pip install "distill-jax[torch]"``): the JAX paths
never import this module, and it imports no JAX.

Shapes: B batch, L image tokens, C packed channels (4 x the latent channels), S text tokens,
D_t / P the text embedding and pooled widths. Latents are packed, ``[B, L, C]``, in standard units
(FLUX's ``(VAE - shift) * scale``), as FluxPipeline keeps them.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open

from distill_jax import hub
from distill_jax.pipeline.schedules import (
    flux_shift_mu,
    flux_sigmas,
    meanflow_sigmas,
    scm_timesteps,
)

Tensor = torch.Tensor
# The default steps and embedded guidance of each sampler (spec 5.5).
DEFAULTS = {"teacher": (28, 3.5), "scm": (2, 4.5), "meanflow": (4, 3.5)}
HEADS = ("timestep_embedder2", "logvar_linear")
_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_SINGLE = "diffusion_pytorch_model.safetensors"


class FluxStudent(ModelMixin):
    """An exported distill-jax FLUX transformer (teacher or student) in diffusers.

    Called with the diffusers transformer's arguments, times in the model's own units before its
    ``time_scale`` (flow time ``s`` in [0, 1], as ``FluxPipeline`` passes ``t / 1000``, and the raw
    guidance), plus ``timestep2`` = ``t - r`` for a MeanFlow student. ``method`` names its sampler:
    ``"teacher"`` (Euler), ``"scm"`` or ``"meanflow"``. A ``ModelMixin``, so that ``FluxPipeline``
    and :class:`FluxStudentPipeline` take it as their transformer.
    """

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        *,
        time_scale: float = 1000.0,
        method: str | None = None,
        timestep_embedder2: TimestepEmbedding | None = None,
        logvar_linear: torch.nn.Linear | None = None,
    ):
        super().__init__()
        if not (isinstance(time_scale, int | float) and 0 < time_scale < math.inf):
            raise ValueError(f"time_scale={time_scale!r}: expected a finite number > 0")
        self.transformer = transformer
        self.timestep_embedder2 = timestep_embedder2
        self.logvar_linear = logvar_linear
        self.time_scale = float(time_scale)
        default = "meanflow" if timestep_embedder2 is not None else None
        default = default or ("scm" if logvar_linear is not None else None)
        self.method = method or default or "teacher"
        if self.method not in DEFAULTS:
            raise ValueError(f"method={self.method!r}; choose one of {list(DEFAULTS)}")
        if (self.method == "meanflow") != (timestep_embedder2 is not None):
            raise ValueError(
                f"method={self.method!r} but timestep_embedder2 is {timestep_embedder2}"
            )
        self._delta: Tensor | None = None
        if timestep_embedder2 is not None:
            self.time_proj2 = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
            transformer.time_text_embed.register_forward_hook(self._add_delta)

    @property
    def config(self) -> Any:
        """The diffusers transformer's config (``in_channels``, ``guidance_embeds``, ...)."""
        return self.transformer.config

    def cache_context(self, name: str, **kwargs: Any) -> contextlib.AbstractContextManager:
        return self.transformer.cache_context(name, **kwargs)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        guidance: Tensor | None = None,
        timestep2: Tensor | None = None,
        joint_attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> Any:
        """Velocity (MeanFlow: average velocity over ``[t - timestep2, t]``) ``[B, L, C]``.

        hidden_states ``[B, L, C]``, encoder_hidden_states ``[B, S, D_t]``, pooled_projections
        ``[B, P]``, timestep / guidance / timestep2 ``[B]``, img_ids ``[L, 3]``, txt_ids ``[S, 3]``;
        returns what ``FluxTransformer2DModel`` returns.
        """
        if (timestep2 is None) != (self.timestep_embedder2 is None):
            raise ValueError(
                "timestep2 = t - r is needed by a MeanFlow student and only by one "
                f"(this is a {self.method} model)"
            )
        k = self.time_scale / 1000.0  # diffusers multiplies by 1000 itself
        self._delta = timestep2
        try:
            return self.transformer(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep * k,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=None if guidance is None else guidance * k,
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=return_dict,
            )
        finally:
            self._delta = None

    def _add_delta(self, module: torch.nn.Module, args: Any, temb: Tensor) -> Tensor:
        """``temb + E_2(phi(time_scale (t - r)))``: the conditioning vector of spec 1.2 item 2."""
        if self._delta is None:
            raise ValueError("a MeanFlow student runs through FluxStudent, with timestep2 = t - r")
        # rounded to the model's dtype first, as diffusers rounds timestep and guidance
        delta = torch.as_tensor(self._delta, device=temb.device).to(temb.dtype).float()
        proj = self.time_proj2(delta.expand(temb.shape[0]) * self.time_scale)
        emb = self.timestep_embedder2(proj.to(self.timestep_embedder2.linear_1.weight.dtype))
        return temb + emb.to(temb.dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> FluxStudent:
        """An exported folder (a path or a Hub id, as :func:`distill_jax.hub.resolve`): diffusers'
        transformer, the heads it has and the ``time_scale`` and ``method`` of its config (a
        stock diffusers FLUX transformer folder loads as a ``time_scale=1000`` teacher)."""
        folder = hub.resolve(path, subfolder=subfolder, revision=revision, token=token).path
        config = json.loads((folder / "config.json").read_text())
        extra = config.get("_distill_jax") or {}
        fixed = {"rope_theta": 10000.0, "time_embed_dim": 256}  # diffusers' constants
        if wrong := {k: extra[k] for k, v in fixed.items() if extra.get(k, v) != v}:
            raise ValueError(f"{folder}: diffusers' FLUX has {fixed}; this model has {wrong}")
        ratio = float(extra.get("mlp_ratio", 4.0))
        if ratio == 4.0:
            with _diffusers_quiet():  # the heads are "unexpected keys" to diffusers
                transformer = FluxTransformer2DModel.from_pretrained(
                    folder, torch_dtype=torch_dtype
                )
        else:
            transformer = _with_mlp_ratio(folder, config, ratio)
        heads = _read_tensors(folder, lambda key: key.split(".")[0] in HEADS)
        modules: dict[str, torch.nn.Module] = {}
        d = transformer.inner_dim
        for name, make in (
            ("timestep_embedder2", lambda: TimestepEmbedding(256, d)),
            ("logvar_linear", lambda: torch.nn.Linear(d, 1)),
        ):
            weights = {k[len(name) + 1 :]: v for k, v in heads.items() if k.startswith(name + ".")}
            if weights:
                modules[name] = make()
                modules[name].load_state_dict(weights, strict=True)
        student = cls(
            transformer,
            time_scale=extra.get("time_scale", 1000.0),
            method=extra.get("method"),
            **modules,
        )
        student.eval()
        if torch_dtype is not None:
            student.to(dtype=torch_dtype)
        return student if device is None else student.to(device)


@contextlib.contextmanager
def _diffusers_quiet() -> Iterator[None]:
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _read_tensors(folder: Path, keep: Callable[[str], bool]) -> dict[str, Tensor]:
    """The tensors of an exported folder whose keys ``keep`` accepts."""
    if (folder / _INDEX).is_file():
        weight_map = json.loads((folder / _INDEX).read_text())["weight_map"]
    else:
        with safe_open(folder / _SINGLE, "pt") as f:
            weight_map = dict.fromkeys(f.keys(), _SINGLE)
    wanted = {k: f for k, f in weight_map.items() if keep(k)}
    out = {}
    for file in sorted(set(wanted.values())):
        with safe_open(folder / file, "pt") as f:
            out.update({k: f.get_tensor(k) for k, g in wanted.items() if g == file})
    return out


def _with_mlp_ratio(folder: Path, config: dict, ratio: float) -> FluxTransformer2DModel:
    """diffusers' FLUX with feed-forward width ``ratio x`` the model width (the toy world's is
    2; diffusers builds 4): its blocks rebuilt from diffusers' own ``FeedForward`` and
    ``FluxSingleTransformerBlock``, then the folder's weights loaded strictly."""
    model = FluxTransformer2DModel.from_config({k: v for k, v in config.items() if k[0] != "_"})
    dim, heads = model.inner_dim, model.config.num_attention_heads
    for block in model.transformer_blocks:
        for name in ("ff", "ff_context"):
            ff = FeedForward(dim=dim, dim_out=dim, mult=ratio, activation_fn="gelu-approximate")
            setattr(block, name, ff)
    model.single_transformer_blocks = torch.nn.ModuleList(
        FluxSingleTransformerBlock(dim, heads, model.config.attention_head_dim, mlp_ratio=ratio)
        for _ in model.single_transformer_blocks
    )
    model.load_state_dict(_read_tensors(folder, lambda key: key.split(".")[0] not in HEADS))
    return model.eval()


# --- samplers ---------------------------------------------------------------------------------


class _Conditioning:
    """The model call of every step: one prompt batch, ids and guidance, float32 state."""

    def __init__(self, model, prompt_embeds, pooled, img_ids, txt_ids, guidance, batch: int):
        self.model, self.batch = model, batch
        dev, dtype = model.device, model.dtype
        self.prompt = prompt_embeds.to(dev, dtype)
        self.pooled = pooled.to(dev, dtype)
        self.img_ids = img_ids.to(dev)
        S = prompt_embeds.shape[1]
        self.txt_ids = torch.zeros(S, 3, device=dev) if txt_ids is None else txt_ids.to(dev)
        embeds = model.config.guidance_embeds
        if embeds and guidance is None:
            raise ValueError("the transformer embeds guidance; pass a guidance value (e.g. 3.5)")
        if not embeds and guidance is not None:
            raise ValueError(f"guidance={guidance} but the transformer has no guidance embedder")
        self.guidance = None if guidance is None else self.full(guidance)

    def full(self, value: float | Tensor) -> Tensor:
        return torch.as_tensor(value, dtype=torch.float32, device=self.model.device).expand(
            self.batch
        )

    def __call__(self, z: Tensor, t: Tensor, delta: Tensor | None = None) -> Tensor:
        out = self.model(
            hidden_states=z.to(self.model.dtype),
            encoder_hidden_states=self.prompt,
            pooled_projections=self.pooled,
            timestep=self.full(t),
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            guidance=self.guidance,
            **({} if delta is None else {"timestep2": self.full(delta)}),
            return_dict=False,
        )[0]
        return out.float()


def _schedule(values: Any, device: torch.device, what: str) -> Tensor:
    out = torch.as_tensor(np.asarray(values, np.float32), device=device)
    if out.ndim != 1 or len(out) < 2 or out[-1] != 0 or bool((out[1:] > out[:-1]).any()):
        raise ValueError(f"{what} must be [N + 1] decreasing times ending at 0, got {values}")
    return out


@torch.no_grad()
def euler_sample(
    model: FluxStudent,
    latents: Tensor,
    prompt_embeds: Tensor,
    pooled_prompt_embeds: Tensor,
    img_ids: Tensor,
    txt_ids: Tensor | None = None,
    *,
    steps: int = 28,
    guidance: float | None = 3.5,
    sigmas: Sequence[float] | None = None,
) -> Tensor:
    """FLUX's flow-matching Euler sampler (spec 5.2; FluxPipeline's loop, and
    :func:`distill_jax.pipeline.samplers.euler_sample`): ``z <- z + (s_next - s) v(z, s)``.

    Args:
      latents: packed noise ``[B, L, C]``; img_ids ``[L, 3]`` (``FluxPipeline
        ._prepare_latent_image_ids``); txt_ids ``[S, 3]`` (default zeros, FLUX's).
      sigmas: ``[N + 1]`` flow times ending at 0 (default ``flux_sigmas(steps, L)``).
    Returns the final latents ``[B, L, C]`` float32.
    """
    call = _Conditioning(
        model, prompt_embeds, pooled_prompt_embeds, img_ids, txt_ids, guidance, len(latents)
    )
    sig = flux_sigmas(steps, latents.shape[1]) if sigmas is None else sigmas
    sig = _schedule(sig, model.device, "sigmas")
    z = latents.to(model.device).float()
    for s, s_next in zip(sig[:-1], sig[1:], strict=True):
        z = z + (s_next - s) * call(z, s)
    return z


@torch.no_grad()
def meanflow_sample(
    model: FluxStudent,
    latents: Tensor,
    prompt_embeds: Tensor,
    pooled_prompt_embeds: Tensor,
    img_ids: Tensor,
    txt_ids: Tensor | None = None,
    *,
    steps: int = 4,
    guidance: float | None = 3.5,
    sigmas: Sequence[float] | None = None,
) -> Tensor:
    """MeanFlow's few-step sampler (spec 5.4, :func:`distill_jax.pipeline.samplers
    .meanflow_sample`): ``z_r = z_t - (t - r) u(z_t, t, t - r)`` on FLUX's shifted schedule.

    The same step as FluxPipeline's Euler one with ``u`` in place of ``v``; what FluxPipeline
    cannot give the model is ``t - r``. Arguments as :func:`euler_sample`; ``sigmas`` default
    ``meanflow_sigmas(steps, flux_shift_mu(L))``.
    """
    call = _Conditioning(
        model, prompt_embeds, pooled_prompt_embeds, img_ids, txt_ids, guidance, len(latents)
    )
    sig = meanflow_sigmas(steps, flux_shift_mu(latents.shape[1])) if sigmas is None else sigmas
    sig = _schedule(sig, model.device, "sigmas")
    z = latents.to(model.device).float()
    for t, r in zip(sig[:-1], sig[1:], strict=True):
        z = z - (t - r) * call(z, t, t - r)
    return z


def trigflow_velocity(call: Any, x_hat: Tensor, t: Tensor) -> Tensor:
    """The TrigFlow velocity ``F`` of a flow-velocity model at TrigFlow state ``x_hat`` and time
    ``t`` (the paper's ``FluxTrigFlow``, spec 1.3; :func:`distill_jax.parameterization
    .trigflow_velocity`): flow time ``s = sin t / (sin t + cos t)``, input ``n(s) x_hat`` with
    ``n(s) = sqrt(s^2 + (1 - s)^2)``, output ``[(1 - 2s) x_s + (1 - 2s + 2s^2) v] / n(s)``."""
    sin, cos = torch.sin(t), torch.cos(t)
    s = sin / (sin + cos)
    n = torch.sqrt(s * s + (1.0 - s) ** 2)
    x_s = n * x_hat
    v = call(x_s, s)
    return ((1.0 - 2.0 * s) * x_s + (1.0 - 2.0 * s + 2.0 * s * s) * v) / n


@torch.no_grad()
def scm_sample(
    model: FluxStudent,
    latents: Tensor,
    prompt_embeds: Tensor,
    pooled_prompt_embeds: Tensor,
    img_ids: Tensor,
    txt_ids: Tensor | None = None,
    *,
    steps: int = 2,
    guidance: float | None = 4.5,
    times: Sequence[float] | None = None,
    sigma_d: float = 0.5,
    generator: torch.Generator | None = None,
    step_noise: Sequence[Tensor] | None = None,
) -> Tensor:
    """sCM's multistep consistency sampler (spec 5.3, :func:`distill_jax.pipeline.samplers
    .scm_sample`): from ``x = sigma_d latents``, per step ``x0 = cos t x - sin t sigma_d F(x /
    sigma_d, t)`` and ``x <- cos t' x0 + sin t' sigma_d z`` with fresh noise ``z``; returns
    ``x0 / sigma_d``.

    The times are diffusers' ``SCMScheduler.set_timesteps`` (``[1.5708, 1.3, 0]`` at two steps,
    else ``linspace(1.5708, 0, N + 1)``) and the update its ``step``, written out so that the
    noise can be given: ``step_noise`` holds the ``N - 1`` draws ``z`` ``[B, L, C]`` (e.g. a JAX
    run's ``jax.random.normal(jax.random.split(key, N)[i], ...)``); else they come from
    ``generator``. Other arguments as :func:`euler_sample`; ``times`` are TrigFlow times.
    """
    call = _Conditioning(
        model, prompt_embeds, pooled_prompt_embeds, img_ids, txt_ids, guidance, len(latents)
    )
    ts = _schedule(scm_timesteps(steps) if times is None else times, model.device, "times")
    if step_noise is not None and len(step_noise) != len(ts) - 2:
        raise ValueError(f"step_noise: {len(step_noise)} draws for {len(ts) - 1} steps")
    x = sigma_d * latents.to(model.device).float()
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:], strict=True)):
        x0 = torch.cos(t) * x - torch.sin(t) * sigma_d * trigflow_velocity(call, x / sigma_d, t)
        if i == len(ts) - 2:  # t_next = 0: the sample itself
            x = x0
            break
        if step_noise is None:
            z = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        else:
            z = step_noise[i].to(x.device).float()
        x = torch.cos(t_next) * x0 + torch.sin(t_next) * sigma_d * z
    return x / sigma_d


SAMPLERS = {"teacher": euler_sample, "scm": scm_sample, "meanflow": meanflow_sample}


# --- the pipeline -----------------------------------------------------------------------------


class FluxStudentPipeline(FluxPipeline):
    """``FluxPipeline`` for distill-jax models: its components, ``from_pretrained`` (pass the
    :class:`FluxStudent` as ``transformer``), prompt encoding, latents and decoding, with the
    student's sampler (``transformer.method``) in place of the scheduler loop.

    Not stock ``FluxPipeline`` with diffusers' ``SCMScheduler``: the scheduler itself would fit
    FLUX's packed latents (its update is element-wise), but FluxPipeline passes ``sigmas`` and
    ``mu`` to ``set_timesteps`` (which SCMScheduler refuses), runs the model at every entry of
    ``scheduler.timesteps`` (SCMScheduler's end with the final 0: one model call too many), and
    feeds the latents to the transformer as they are, while sCM's network is the TrigFlow wrapper
    of a flow model (input ``n(s) x``, time ``s``, output converted). MeanFlow's step is the Euler
    step, but its model needs ``t - r``, which the loop never gives it. The teacher (``method
    "teacher"``) does run in stock ``FluxPipeline`` with a :class:`FluxStudent` transformer.
    """

    def __init__(
        self,
        scheduler,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        transformer: FluxStudent | FluxTransformer2DModel,
        image_encoder=None,
        feature_extractor=None,
    ):
        # FluxPipeline's, with the transformer's type widened: diffusers checks what
        # from_pretrained is given against these annotations.
        super().__init__(
            scheduler,
            vae,
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
            transformer,
            image_encoder,
            feature_extractor,
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        method: str | None = None,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        max_sequence_length: int = 512,
        output_type: str = "pil",
        return_dict: bool = True,
        step_noise: Sequence[Tensor] | None = None,
    ) -> Any:
        """Images for ``prompt`` (FluxPipeline's arguments; no negative prompts: the students
        are guidance-distilled). ``num_inference_steps`` and ``guidance_scale`` default to the
        method's (:data:`DEFAULTS`; guidance None for models without a guidance embedder);
        ``latents`` are packed ``[B, L, C]`` noise; ``step_noise`` goes to :func:`scm_sample`."""
        model = self.transformer
        method = method or getattr(model, "method", "teacher")
        if method not in SAMPLERS:
            raise ValueError(f"method={method!r}; choose one of {list(SAMPLERS)}")
        steps, guidance = DEFAULTS[method]
        steps = num_inference_steps or steps
        guidance = guidance_scale if guidance_scale is not None else guidance
        guidance = guidance if model.config.guidance_embeds else None
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt,
            None,
            height,
            width,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            max_sequence_length=max_sequence_length,
        )
        device = self._execution_device
        prompt_embeds, pooled, text_ids = self.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            device=device,
            max_sequence_length=max_sequence_length,
        )
        noise, img_ids = self.prepare_latents(
            prompt_embeds.shape[0],
            model.config.in_channels // 4,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        kw: dict[str, Any] = dict(steps=steps, guidance=guidance)
        config = self.scheduler.config
        mu = flux_shift_mu(
            noise.shape[1],
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        if method == "scm":
            kw.update(generator=generator, step_noise=step_noise)
        else:
            kw["sigmas"] = meanflow_sigmas(steps, mu)  # FluxPipeline's shifted sigmas
        out = SAMPLERS[method](model, noise, prompt_embeds, pooled, img_ids, text_ids, **kw)
        if output_type == "latent":
            image = out
        else:
            out = self._unpack_latents(out, height, width, self.vae_scale_factor)
            out = out / self.vae.config.scaling_factor + self.vae.config.shift_factor
            image = self.vae.decode(out.to(self.vae.device, self.vae.dtype), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return FluxPipelineOutput(images=image) if return_dict else (image,)


__all__ = [
    "DEFAULTS",
    "FluxStudent",
    "FluxStudentPipeline",
    "euler_sample",
    "meanflow_sample",
    "scm_sample",
    "trigflow_velocity",
]
