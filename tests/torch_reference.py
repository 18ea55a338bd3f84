"""An independent PyTorch transcription of the paper's sCM and MeanFlow losses, for parity tests
and benchmarks.

Written from ``shared/spec/t2i-distill.md`` (sections 1.2, 1.3, 2.3, 3.2, 4.3), on top of stock
diffusers ``FluxTransformer2DModel``, in the paper's own units and control flow (sCM in the code
units ``x_t = sigma_d x_hat``; MeanFlow's CFG and non-CFG samples in separate JVP passes), with
``torch.func.jvp`` under math attention (the other passes keep PyTorch's default SDPA kernel:
the same numbers, faster), float32 throughout. Randomness (noise, times, guidance, dropout
mask) is passed in, so that a JAX run and this one see identical inputs.

Shapes: latents are packed, ``[B, L, C]`` (packing is a permutation of the paper's
``[B, 16, h, w]``: means and per-sample norms are unchanged). ``cond`` is a dict of per-sample
tensors ``{"txt": [B, S, Dt], "pooled": [B, P], "g": [B]}``; the rotary ids ``img_ids [L, 3]``,
``txt_ids [S, 3]`` are attributes of :class:`X1Flux` (shared by the batch).

Switches (defaults = the paper's code; the other value = distill-jax's fixed defaults):

- sCM ``logvar_time``: ``"trig"`` feeds the TrigFlow time to the logvar head (spec 1.3, 7.9);
  ``"flow"`` the flow time ``s`` the backbone sees.
- MeanFlow ``tangent_velocity``: ``"ground_truth"`` (``eps - x0`` in the non-CFG tangent, spec
  7.2) or ``"teacher"`` (``v_T``); ``cfg_at_r_equals_t``: False evaluates ``u_c, u_0`` at the
  sample's own ``t - r`` (spec 7.3), True at ``t - r = 0``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import TimestepEmbedding
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

Tensor = torch.Tensor
Cond = dict[str, Tensor]


def math_attention() -> contextlib.AbstractContextManager:
    """SDPA restricted to its composite math kernel: the fused CPU/GPU kernels have no
    forward-mode rule, so ``torch.func.jvp`` needs this (the paper's "vanilla" attention)."""
    return sdpa_kernel(SDPBackend.MATH)


class X1Flux(nn.Module):
    """The paper's ``TimestepX1GuidanceX1`` FLUX (spec 1.2): stock diffusers blocks, timestep and
    guidance fed to the sinusoid unscaled, plus the distillation heads when asked for. ``flux``
    must embed guidance (``guidance_embeds=True``, as FLUX.1-dev and -lite do).

    ``delta_embed`` adds ``timestep_embedder2`` (MeanFlow): ``temb += E_2(phi(t - r))``;
    ``logvar_head`` adds ``logvar_linear`` = Linear(D -> 1) on ``temb`` (sCM; xavier-uniform
    weight, zero bias, spec 1.3).
    """

    def __init__(
        self,
        flux: FluxTransformer2DModel,
        img_ids: Tensor,
        txt_ids: Tensor,
        *,
        delta_embed: bool = False,
        logvar_head: bool = False,
    ):
        super().__init__()
        self.flux = flux
        self.register_buffer("ids", torch.cat([txt_ids, img_ids]).float(), persistent=False)
        d = flux.inner_dim
        self.timestep_embedder2 = TimestepEmbedding(256, d) if delta_embed else None
        self.logvar_linear = None
        if logvar_head:
            self.logvar_linear = nn.Linear(d, 1)
            nn.init.xavier_uniform_(self.logvar_linear.weight)
            nn.init.zeros_(self.logvar_linear.bias)

    def temb(self, t: Tensor, g: Tensor, pooled: Tensor, delta: Tensor | None = None) -> Tensor:
        """``E_t(phi(t)) + E_g(phi(g)) + E_txt(pooled) [+ E_2(phi(delta))]``, ×1 times. [B, D]."""
        emb = self.flux.time_text_embed(t, g, pooled)
        if self.timestep_embedder2 is not None:
            if delta is None:
                raise ValueError("X1Flux with a Δ-time embedder needs delta = t - r")
            phi = self.flux.time_text_embed.time_proj(delta).to(pooled.dtype)
            emb = emb + self.timestep_embedder2(phi)
        return emb

    def forward(self, x: Tensor, t: Tensor, cond: Cond, delta: Tensor | None = None) -> Tensor:
        """Flow velocity (or MeanFlow average velocity) of packed latents ``x [B, L, C]`` at flow
        time ``t [B]`` (and interval ``delta [B]``). Returns ``[B, L, C_out]``."""
        f = self.flux
        temb = self.temb(t, cond["g"], cond["pooled"], delta)
        img = f.x_embedder(x)
        txt = f.context_embedder(cond["txt"])
        rope = f.pos_embed(self.ids)
        for block in f.transformer_blocks:
            txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=temb,
                             image_rotary_emb=rope)  # fmt: skip
        for block in f.single_transformer_blocks:
            txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=temb,
                             image_rotary_emb=rope)  # fmt: skip
        return f.proj_out(f.norm_out(img, temb))

    def logvar(self, time: Tensor, cond: Cond) -> Tensor:
        """sCM's log-variance head on the conditioning at ``time [B]``. Returns ``[B]``."""
        return self.logvar_linear(self.temb(time, cond["g"], cond["pooled"]))[:, 0]


def diffusers_keys(model: X1Flux) -> dict[str, str]:
    """``{torch parameter name: diffusers / paper state-dict key}`` (drops the ``flux.`` prefix;
    the heads keep the paper's names ``timestep_embedder2.*``, ``logvar_linear.*``)."""
    return {name: name.removeprefix("flux.") for name, _ in model.named_parameters()}


def state_dict_numpy(model: X1Flux) -> dict[str, np.ndarray]:
    """The diffusers-layout state dict (with the paper's head keys) as float32 NumPy."""
    keys = diffusers_keys(model)
    return {keys[n]: p.detach().numpy().copy() for n, p in model.named_parameters()}


def grads_numpy(model: X1Flux) -> dict[str, np.ndarray]:
    """``.grad`` of every parameter under its diffusers key (zeros where no gradient arrived)."""
    keys = diffusers_keys(model)
    return {
        keys[n]: (torch.zeros_like(p) if p.grad is None else p.grad).detach().numpy().copy()
        for n, p in model.named_parameters()
    }


def _b(x: Tensor) -> Tensor:
    """[B] -> [B, 1, 1]: per-sample scalars against packed latents."""
    return x[:, None, None]


# --- sCM: FluxTrigFlow (spec 1.3) and sCMLoss (spec 3.2) --------------------------------------


def trigflow(
    model: X1Flux, x_hat: Tensor, t: Tensor, cond: Cond, *, logvar_time: str | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """``FluxTrigFlow.forward``: TrigFlow velocity ``F [B, L, C]`` at ``x_hat = x_t / sigma_d``
    and trig time ``t [B]`` (and with ``logvar_time`` the logvar ``[B]``)."""
    c, s_ = torch.cos(t), torch.sin(t)
    s = s_ / (c + s_)  # flow time, tan t = s / (1 - s)
    n = torch.sqrt(s**2 + (1 - s) ** 2)
    x_s = _b(n) * x_hat
    v = model(x_s, s, cond)
    F = (_b(1 - 2 * s) * x_s + _b(1 - 2 * s + 2 * s**2) * v) / _b(n)
    if logvar_time is None:
        return F
    return F, model.logvar(t if logvar_time == "trig" else s, cond)


def scm_loss(
    student: X1Flux,
    teacher: X1Flux,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    cond: Cond,
    *,
    step: int,
    sigma_d: float = 0.5,
    tangent_warmup_steps: int = 4000,
    tangent_norm_c: float = 0.1,
    logvar_time: str = "trig",
) -> tuple[Tensor, dict[str, Tensor]]:
    """``sCMLoss.__call__`` steps 4-12 (spec 3.2) for clean latents ``x0`` and noise ``noise``
    in standard units, [B, L, C], and trig times ``t`` [B]. Differentiable in the student's
    parameters; returns ``(loss, {"l2", "g_norm", "mean_weight"})``."""
    x = sigma_d * x0  # the code's latent units (spec 2.4)
    z = sigma_d * noise
    c, s = _b(torch.cos(t)), _b(torch.sin(t))
    x_t = c * x + s * z
    with torch.no_grad():
        dxdt = sigma_d * trigflow(teacher, x_t / sigma_d, t, cond)
        # Tangent of the student along the teacher PF-ODE: (cs dxdt / sigma_d, cs).
        cs = torch.cos(t) * torch.sin(t)
        with math_attention():
            _, dF = torch.func.jvp(
                lambda xh, tt: trigflow(student, xh, tt, cond),
                (x_t / sigma_d, t),
                (_b(cs) * dxdt / sigma_d, cs),
            )
    F, logvar = trigflow(student, x_t / sigma_d, t, cond, logvar_time=logvar_time)
    logvar = _b(logvar)
    F_minus = F.detach()
    r = min(1.0, step / tangent_warmup_steps)
    g = -(c**2) * (sigma_d * F_minus - dxdt) - r * (c * s * x_t + sigma_d * dF)
    g_norm = torch.linalg.vector_norm(g, dim=(1, 2), keepdim=True)
    g = g / (g_norm + tangent_norm_c)
    w = 1.0 / (sigma_d * torch.tan(t))
    loss = ((_b(w) / torch.exp(logvar)) * (F - F_minus - g) ** 2 + logvar).mean()
    return loss, {"l2": (g**2).mean(), "g_norm": g_norm.mean(), "mean_weight": w.mean()}


# --- MeanFlow: MeanFlowLoss (spec 4.3) ---------------------------------------------------------


def _rows(cond: Cond, idx: Tensor) -> Cond:
    return {k: v[idx] for k, v in cond.items()}


def meanflow_loss(
    student: X1Flux,
    teacher: X1Flux,
    x0: Tensor,
    noise: Tensor,
    r: Tensor,
    t: Tensor,
    drop: Tensor,
    cond: Cond,
    uncond: Cond,
    *,
    use_cfg: bool = True,
    omega: float = 1.0,
    kappa: float = 0.5,
    cfg_t_min: float = 0.0,
    cfg_t_max: float = 1.0,
    adaptive_p: float = 1.0,
    adaptive_c: float = 1e-3,
    tangent_velocity: str = "ground_truth",
    cfg_at_r_equals_t: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``MeanFlowLoss.__call__`` steps 2-9 (spec 4.3) for clean latents ``x0`` and noise in
    standard units [B, L, C], flow times ``r <= t`` [B] and the label-dropout mask ``drop`` [B]
    bool. ``uncond`` is the ``" "`` conditioning, [B, ...] like ``cond`` (its ``g`` = cond's).
    Returns ``(loss, {"mse"})``, differentiable in the student's parameters."""
    cond = {k: torch.where(_mask(drop, v), uncond[k], v) for k, v in cond.items()}  # dropout
    tb = _b(t)
    z_t = (1 - tb) * x0 + tb * noise
    v_gt = noise - x0
    delta = t - r
    u = student(z_t, t, cond, delta)
    with torch.no_grad():
        v_T = teacher(z_t, t, cond)
    v_plain = v_gt if tangent_velocity == "ground_truth" else v_T
    cfg_mask = (t >= cfg_t_min) & (t <= cfg_t_max) & ~drop

    def dudt(idx: Tensor, v_tan: Tensor) -> Tensor:
        """d/dt u(z, r, t) on the samples ``idx``: JVP through (z, r, t) along (v, 0, 1)."""
        c = _rows(cond, idx)
        with torch.no_grad(), math_attention():
            _, out = torch.func.jvp(
                lambda z, rr, tt: student(z, tt, c, tt - rr),
                (z_t[idx], r[idx], t[idx]),
                (v_tan, torch.zeros_like(r[idx]), torch.ones_like(t[idx])),
            )
        return out

    u_tgt = torch.empty_like(u)
    if use_cfg and cfg_mask.any():
        i, j = cfg_mask.nonzero()[:, 0], (~cfg_mask).nonzero()[:, 0]
        d_cfg = torch.zeros_like(delta[i]) if cfg_at_r_equals_t else delta[i]
        with torch.no_grad():  # u_c and u_0 batched as 2x, as the paper does
            both = student(
                z_t[i].repeat(2, 1, 1),
                t[i].repeat(2),
                {k: torch.cat([cond[k][i], uncond[k][i]]) for k in cond},
                d_cfg.repeat(2),
            )
            u_c, u_0 = both.chunk(2)
            v_mix = omega * v_T[i] + kappa * u_c + (1 - omega - kappa) * u_0
        u_tgt[i] = v_mix - _b(delta[i]) * dudt(i, v_mix)
        if len(j):
            u_tgt[j] = v_T[j] - _b(delta[j]) * dudt(j, v_plain[j])
    else:
        every = torch.arange(len(t))
        u_tgt = v_T - _b(delta) * dudt(every, v_plain)

    err = u - u_tgt.detach()
    e = (err**2).sum(dim=(1, 2))  # summed per sample (spec 4.3.9)
    w = 1.0 / (e.detach() + adaptive_c) ** adaptive_p
    return (w * e).mean(), {"mse": (err.detach() ** 2).mean()}


def _mask(drop: Tensor, v: Tensor) -> Tensor:
    return drop.reshape(-1, *([1] * (v.ndim - 1)))
