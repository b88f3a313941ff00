"""Flow matching as released (arXiv 2603.11661; rectified flow, arXiv 2209.03003): x_t = (1 - t) x_data + t noise
(t = 1: noise), v = noise - x_data, on normalised latents: the loss, the Euler/CFG sampler, Flow-GRPO's SDE step."""

import math

import torch
from tqdm import tqdm


def flow_matching_loss(model, x_data, text_f, text_f_c, t=None, noise=None, drop_text=None, cfg_dropout=0.1,
                       generator=None, empty=None):
    """Velocity MSE for x_data (B, N, C), text_f (B, 77, Dt), text_f_c (B, Dc). Unless given, from `generator`:
    t ~ sigmoid(N(0, 1)) (Esser et al. 2024), noise ~ N(0, I), drop_text ~ Bernoulli(cfg_dropout) (text -> `empty`).
    Returns loss, loss_per_sample (B,) fp32, t (B,)."""
    B, device = x_data.shape[0], x_data.device
    if t is None:
        t = torch.sigmoid(torch.randn(B, device=device, generator=generator))
    if noise is None:
        noise = torch.randn(x_data.shape, device=device, dtype=x_data.dtype, generator=generator)
    if drop_text is None:
        drop_text = torch.rand(B, device=device, generator=generator) < cfg_dropout
    empty_f, empty_f_c = empty if empty is not None else model.empty_conditions(B)
    text_f = torch.where(drop_text[:, None, None], empty_f.to(text_f.dtype), text_f)  # (B, 77, Dt)
    text_f_c = torch.where(drop_text[:, None], empty_f_c.to(text_f_c.dtype), text_f_c)  # (B, Dc)

    t = t.to(x_data.dtype)
    t_ = t[:, None, None]  # (B, 1, 1)
    x_t = (1 - t_) * x_data + t_ * noise  # (B, N, C)
    v_pred = model(x_t, text_f, text_f_c, t)  # (B, N, C)
    loss_per_sample = (v_pred.float() - (noise - x_data).float()).pow(2).mean(dim=(1, 2))  # (B,)
    return loss_per_sample.mean(), loss_per_sample, t


def loss_by_t_bin(loss_per_sample, t, bins: int = 4) -> dict:
    """Mean loss per equal-width bin of t (B,), as minRF logs it: {"loss_t0.00-0.25": float, ...}; no empty bins."""
    idx = (t.detach().float() * bins).long().clamp(0, bins - 1)  # (B,)
    out = {}
    for b in range(bins):
        sel = idx == b
        if sel.any():
            out[f"loss_t{b / bins:.2f}-{(b + 1) / bins:.2f}"] = loss_per_sample.detach()[sel].mean().item()
    return out


def guided_velocity(model, x, t, text_f, text_f_c, neg_f, neg_f_c, cfg_strength: float):
    """CFG velocity w * v_cond + (1 - w) * v_uncond (Ho & Salimans 2022), w = cfg_strength, in one batched forward."""
    if cfg_strength == 1.0:
        return model(x, text_f, text_f_c, t)
    v = model(torch.cat([x, x]), torch.cat([text_f, neg_f]), torch.cat([text_f_c, neg_f_c]), torch.cat([t, t]))
    v_cond, v_uncond = v.chunk(2)  # (B, N, C) each
    return cfg_strength * v_cond + (1 - cfg_strength) * v_uncond


@torch.no_grad()
def euler_sample(model, noise, text_f, text_f_c, num_steps: int = 25, cfg_strength: float = 4.5,
                 negative_text_f=None, negative_text_f_c=None, progress: bool = False):
    """Guided Euler steps on linspace(1, 0, num_steps + 1): noise (B, N, C) -> normalised latents; the negative
    features default to the model's empty caption."""
    B = noise.shape[0]
    assert (negative_text_f is None) == (negative_text_f_c is None), "give both negative features or neither"
    if negative_text_f is None:
        negative_text_f, negative_text_f_c = model.empty_conditions(B)
    neg_f = negative_text_f.to(text_f.dtype).expand(B, -1, -1)  # (B, 77, Dt)
    neg_f_c = negative_text_f_c.to(text_f_c.dtype).expand(B, -1)  # (B, Dc)

    ts = torch.linspace(1, 0, num_steps + 1, device=noise.device)  # fp32 grid, as released
    x = noise
    for i in tqdm(range(num_steps), disable=not progress, desc="euler"):
        t = ts[i].to(x.dtype).expand(B)  # (B,)
        v = guided_velocity(model, x, t, text_f, text_f_c, neg_f, neg_f_c, cfg_strength)
        x = x + (ts[i + 1] - ts[i]) * v  # dt < 0
    return x


# ---------------------------------------------------------------- the SDE sampler of Flow-GRPO

def sde_step_with_logprob(x, velocity, t, t_next, noise_level=0.7, noise=None, prev_sample=None, generator=None):
    """Flow-GRPO's SDE step 1 >= t > t_next (arXiv 2505.05470, eq. 9), dt = t_next - t < 0, in float32 (bf16
    overflows), x and velocity (B, ...): sigma_t = a * sqrt(t / (1 - t)) (a = noise_level; 0 is Euler, NaN log-prob),
    mean = x + [v + sigma_t^2 / (2 t) * (x + (1 - t) v)] * dt, x_next = mean + sigma_t * sqrt(-dt) * eps (eps =
    `noise` or drawn; `prev_sample` scores a stored x_next). Returns x_next, log_prob (B,) (a mean over elements, as
    released), mean, sigma_t (B, 1, ..., 1)."""
    assert velocity.shape == x.shape, (velocity.shape, x.shape)
    assert noise is None or prev_sample is None, "pass noise (to sample) or prev_sample (to score), not both"
    x, velocity = x.float(), velocity.float()
    B = x.shape[0]
    bcast = (B,) + (1,) * (x.ndim - 1)  # times broadcast over every latent dim
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(B)
    t_next = torch.as_tensor(t_next, dtype=torch.float32, device=x.device).expand(B)
    assert ((t > 0) & (t <= 1) & (t_next < t)).all(), f"need 0 < t <= 1, t_next < t: {t.tolist()}, {t_next.tolist()}"
    t, t_next = t.reshape(bcast), t_next.reshape(bcast)
    dt = t_next - t  # (B, 1, ..., 1), negative: from noise towards data

    std_dev_t = noise_level * torch.sqrt(t / (1 - torch.where(t == 1, t_next, t)))  # 1 - t_next at t = 1, as released
    mean = x + (velocity + std_dev_t**2 / (2 * t) * (x + (1 - t) * velocity)) * dt
    step_std = std_dev_t * torch.sqrt(-dt)  # std of x_next given x

    if prev_sample is None:
        if noise is None:
            gen_device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=gen_device).to(x.device)
        assert noise.shape == x.shape, (noise.shape, x.shape)
        prev_sample = mean + step_std * noise.float()
    assert prev_sample.shape == x.shape, (prev_sample.shape, x.shape)
    prev_sample = prev_sample.float().detach()  # the action is fixed; only the policy mean carries gradient

    log_density = (-(prev_sample - mean) ** 2 / (2 * step_std**2)
                   - torch.log(step_std) - 0.5 * math.log(2 * math.pi))
    log_prob = log_density.mean(dim=tuple(range(1, x.ndim)))  # (B,)
    return prev_sample, log_prob, mean, std_dev_t
