"""Flow matching for Resonate: the pretraining loss, the Euler sampler with classifier-free guidance, and the
stochastic (SDE) sampling step with its log-prob that Flow-GRPO trains through (grpo.py).

Convention (rectified flow, Liu et al. 2022 arXiv 2209.03003; Lipman et al. 2022 arXiv 2210.02747; SPEC "Flow
matching"): t = 1 is noise, x_t = (1 - t) * x_data + t * noise, and the network predicts the velocity
v = dx_t/dt = noise - x_data. Sampling integrates from t = 1 down to t = 0. All latents here are normalised
(`model.normalize`); decode them only after `model.unnormalize`.
"""

import math

import torch
from tqdm import tqdm


def _unwrap(model):
    # DDP hides our helpers behind .module; the forward must still go through the wrapper for its hooks
    return getattr(model, "module", model)


def flow_matching_loss(model, x_data, text_f, text_f_c, t=None, noise=None, drop_text=None, cfg_dropout=0.1,
                       generator=None, empty=None):
    """Conditional flow-matching loss, mean squared error of the predicted velocity.

    Args:
        model: `Resonate` (or a DDP / compiled wrapper of it).
        x_data: (B, N, C) normalised clean latents.
        text_f (B, 77, Dt), text_f_c (B, Dc): caption features.
        t: (B,) flow times; default sigmoid(N(0, 1)) (logit-normal, Esser et al. 2024).
        noise: (B, N, C); default N(0, I).
        drop_text: (B,) bool, True where the caption is replaced by the stored empty-string features (trains
            the unconditional branch for CFG); default Bernoulli(cfg_dropout).
        generator: torch.Generator for whatever is drawn here.
        empty: ((B, 77, Dt), (B, Dc)) unconditional features; default `model.empty_conditions(B)` (pass them
            when a wrapper such as torch.compile hides the model's helpers).
        Pass t / noise / drop_text explicitly to make a step reproducible (e.g. drawn for the global batch).
    Returns: loss (scalar), loss_per_sample (B,) fp32, t (B,).
    Raises ValueError if x_data is not (B, N, C).
    """
    if x_data.ndim != 3:
        raise ValueError(f"x_data must be (B, N, C) normalised latents, got {tuple(x_data.shape)}")
    B, device = x_data.shape[0], x_data.device
    if t is None:
        t = torch.sigmoid(torch.randn(B, device=device, generator=generator))
    if noise is None:
        noise = torch.randn(x_data.shape, device=device, dtype=x_data.dtype, generator=generator)
    if drop_text is None:
        drop_text = torch.rand(B, device=device, generator=generator) < cfg_dropout
    empty_f, empty_f_c = empty if empty is not None else _unwrap(model).empty_conditions(B)
    text_f = torch.where(drop_text[:, None, None], empty_f.to(text_f.dtype), text_f)  # (B, 77, Dt)
    text_f_c = torch.where(drop_text[:, None], empty_f_c.to(text_f_c.dtype), text_f_c)  # (B, Dc)

    t = t.to(x_data.dtype)
    t_ = t[:, None, None]  # (B, 1, 1)
    x_t = (1 - t_) * x_data + t_ * noise  # (B, N, C)
    v_pred = model(x_t, text_f, text_f_c, t)  # (B, N, C)
    loss_per_sample = (v_pred.float() - (noise - x_data).float()).pow(2).mean(dim=(1, 2))  # (B,)
    return loss_per_sample.mean(), loss_per_sample, t


def loss_by_t_bin(loss_per_sample, t, bins: int = 4) -> dict:
    """Mean loss per equal-width bin of t in [0, 1] (minRF-style diagnostic): {"loss_t0.00-0.25": float, ...}.
    Empty bins are left out. loss_per_sample, t: (B,)."""
    idx = (t.detach().float() * bins).long().clamp(0, bins - 1)  # (B,)
    out = {}
    for b in range(bins):
        sel = idx == b
        if sel.any():
            out[f"loss_t{b / bins:.2f}-{(b + 1) / bins:.2f}"] = loss_per_sample.detach()[sel].mean().item()
    return out


def guided_velocity(model, x, t, text_f, text_f_c, neg_f, neg_f_c, cfg: float):
    """CFG velocity cfg * v_cond + (1 - cfg) * v_uncond (Ho & Salimans 2022), both branches in one forward.

    x (B, N, C); t (B,); text features (B, 77, Dt), (B, Dc); negative (unconditional) features the same shapes.
    cfg == 1 skips the unconditional branch. Returns (B, N, C).
    """
    if cfg == 1.0:
        return model(x, text_f, text_f_c, t)
    v = model(torch.cat([x, x]), torch.cat([text_f, neg_f]), torch.cat([text_f_c, neg_f_c]), torch.cat([t, t]))
    v_cond, v_uncond = v.chunk(2)  # (B, N, C) each
    return cfg * v_cond + (1 - cfg) * v_uncond


@torch.no_grad()
def euler_sample(model, noise, text_f, text_f_c, num_steps: int = 25, cfg: float = 4.5, negative_text_f=None,
                 negative_text_f_c=None, progress: bool = False):
    """Generate latents by Euler integration of the guided velocity from t = 1 (noise) to t = 0 (data).

    Args:
        model: `Resonate`.
        noise: (B, N, C) standard normal starting point.
        text_f (B, 77, Dt), text_f_c (B, Dc): caption features.
        num_steps: Euler steps (NFE = num_steps, or 2 * num_steps counting both CFG branches) on the uniform grid
            linspace(1, 0, num_steps + 1).
        cfg: guidance scale; 1 = no guidance.
        negative_text_f (B or 1, 77, Dt), negative_text_f_c (B or 1, Dc): unconditional branch; default the
            model's stored empty-string features.
    Returns: (B, N, C) normalised latents (apply `model.unnormalize` before the VAE decoder).
    """
    B = noise.shape[0]
    if (negative_text_f is None) != (negative_text_f_c is None):
        raise ValueError("give both negative_text_f and negative_text_f_c, or neither")
    if negative_text_f is None:
        negative_text_f, negative_text_f_c = _unwrap(model).empty_conditions(B)
    neg_f = negative_text_f.to(text_f.dtype).expand(B, -1, -1)  # (B, 77, Dt)
    neg_f_c = negative_text_f_c.to(text_f_c.dtype).expand(B, -1)  # (B, Dc)

    ts = torch.linspace(1, 0, num_steps + 1, device=noise.device)  # fp32 grid, as released
    x = noise
    for i in tqdm(range(num_steps), disable=not progress, desc="euler"):
        t = ts[i].to(x.dtype).expand(B)  # (B,)
        v = guided_velocity(model, x, t, text_f, text_f_c, neg_f, neg_f_c, cfg)
        x = x + (ts[i + 1] - ts[i]) * v  # dt < 0
    return x


# ---------------------------------------------------------------- the SDE sampler of Flow-GRPO

def _time_per_sample(t, B: int, device, name: str) -> torch.Tensor:
    """A float or (B,) time as a float32 (B,) tensor on `device`."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"{name} must be a float or a ({B},) tensor, got shape {tuple(t.shape)}")
    return t


def sde_step_with_logprob(x, velocity, t, t_next, noise_level=0.7, noise=None, prev_sample=None, generator=None):
    """One Flow-GRPO SDE step from time t to t_next < t, and the Gaussian log-prob of the result.

    The reverse-time SDE with the flow's marginals (Flow-GRPO, arXiv 2505.05470, eq. 9), discretised with
    Euler-Maruyama, dt = t_next - t < 0:
        sigma_t = a * sqrt(t / (1 - t))        (infinite at t = 1, where 1 - t_next replaces 1 - t, as released)
        mean    = x + [v + sigma_t^2 / (2 t) * (x + (1 - t) v)] * dt
        x_next  = mean + sigma_t * sqrt(-dt) * eps,   eps ~ N(0, I)
    Everything runs in float32 (bf16 overflows in the mean). The log-prob is the Gaussian log-density of
    x_next averaged (not summed) over all latent elements, as released; its gradient flows through the mean.

    Args:
        x: (B, ...) latent at time t, e.g. (B, N, C).
        velocity: (B, ...) guided velocity at (x, t).
        t, t_next: float or (B,) times in [0, 1], 0 < t <= 1, t_next < t.
        noise_level: a >= 0. At 0 the step is a plain Euler step and the log-prob is NaN.
        noise: (B, ...) eps to use instead of drawing it (for reproducibility).
        prev_sample: (B, ...) a stored x_next whose log-prob to compute instead of sampling one
            (training recomputes stored transitions under the current weights).
        generator: torch.Generator for eps when neither noise nor prev_sample is given.
    Returns:
        prev_sample (B, ...) float32 x_next, log_prob (B,), prev_sample_mean (B, ...), std_dev_t (B, 1, ..., 1)
        (sigma_t, without the sqrt(-dt) factor).
    Raises:
        ValueError on mismatched shapes, times outside 0 < t <= 1 or t_next >= t, or both noise and prev_sample.
    """
    if velocity.shape != x.shape:
        raise ValueError(f"velocity shape {tuple(velocity.shape)} must equal x shape {tuple(x.shape)}")
    if noise is not None and prev_sample is not None:
        raise ValueError("pass either noise (to sample) or prev_sample (to score), not both")
    x, velocity = x.float(), velocity.float()
    B = x.shape[0]
    bcast = (B,) + (1,) * (x.ndim - 1)  # times broadcast over every latent dim
    t = _time_per_sample(t, B, x.device, "t")
    t_next = _time_per_sample(t_next, B, x.device, "t_next")
    if not ((t > 0) & (t <= 1)).all() or not (t_next < t).all():
        raise ValueError(f"need 0 < t <= 1 and t_next < t, got t={t.tolist()}, t_next={t_next.tolist()}")
    t, t_next = t.view(bcast), t_next.view(bcast)
    dt = t_next - t  # (B, 1, ..., 1), negative: we integrate from noise towards data

    std_dev_t = noise_level * torch.sqrt(t / (1 - torch.where(t == 1, t_next, t)))
    mean = x + (velocity + std_dev_t**2 / (2 * t) * (x + (1 - t) * velocity)) * dt
    step_std = std_dev_t * torch.sqrt(-dt)  # std of x_next given x

    if prev_sample is None:
        if noise is None:
            gen_device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=gen_device).to(x.device)
        elif noise.shape != x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x shape {tuple(x.shape)}")
        prev_sample = mean + step_std * noise.float()
    elif prev_sample.shape != x.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} must equal x shape {tuple(x.shape)}")
    prev_sample = prev_sample.float().detach()  # the action is fixed; only the policy mean carries gradient

    log_density = (-(prev_sample - mean) ** 2 / (2 * step_std**2)
                   - torch.log(step_std) - 0.5 * math.log(2 * math.pi))
    log_prob = log_density.mean(dim=tuple(range(1, x.ndim)))  # (B,)
    return prev_sample, log_prob, mean, std_dev_t
