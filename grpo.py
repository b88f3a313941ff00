"""Flow-GRPO for the flow-matching generator, as Resonate runs it.

Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470) turns
the deterministic Euler sampler into an SDE with the same marginals, so every sampling step is a Gaussian
policy with a log-prob. Resonate (arXiv 2603.11661) samples a group of clips per caption, scores them with a
reward (reward.py), and updates the transformer with a PPO-style clipped loss plus a KL penalty to a frozen
copy of the starting weights. The loop is four named pieces:

    rollout           sample with the SDE, keep (latent, next latent, log-prob, t) per step
    compute_advantages per-caption group baseline, batch-wide scale, clipped
    grpo_loss         clipped ratio loss + beta * KL between Gaussian step means
    train_step        recompute log-probs of stored steps under the current weights and update

Time convention as in flow.py: t = 1 is noise, t = 0 is data, the network predicts v = noise - data.
"""

import math
from dataclasses import dataclass

import torch

from flow import guided_velocity, sde_step_with_logprob


@dataclass
class GRPOConfig:
    """Flow-GRPO hyper-parameters; defaults are the released Resonate run (config/GRPO_*.yaml)."""
    num_steps: int = 10               # SDE sampling steps per rollout, on t = linspace(1, 0, num_steps + 1)
    noise_level: float = 0.7          # a in sigma_t = a * sqrt(t / (1 - t))
    cfg_strength: float = 4.5         # CFG also during rollouts and training
    group_size: int = 24              # clips sampled per caption
    sample_batch_size: int = 24       # clips per rollout batch (per device)
    num_batches_per_epoch: int = 4    # rollout batches per epoch, also the number of training minibatches
    grad_accum_steps: int = 2         # minibatches per optimizer step (each also accumulates over timesteps)
    num_inner_epochs: int = 1         # passes over one epoch's rollouts
    timestep_fraction: float = 0.99   # train on the first int(num_steps * fraction) sampling steps
    advantage_std: str = "global"     # "global": batch-wide reward std (released); "per_prompt": group std
    adv_clip_max: float = 5.0         # advantages clipped to +-adv_clip_max
    clip_range: float = 1e-4          # PPO ratio clip
    beta: float = 0.04                # weight of the KL penalty to the reference model
    lr: float = 1e-4                  # AdamW
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    grad_clip: float = 1.0            # max global grad norm

    @property
    def num_train_steps(self) -> int:
        """Number of sampling steps trained on per rollout (9 for the defaults)."""
        return int(self.num_steps * self.timestep_fraction)


def _groups(prompts) -> list[torch.Tensor]:
    """Sample indices of each distinct prompt, in order of first appearance."""
    index = {}
    for i, p in enumerate(prompts):
        index.setdefault(p, []).append(i)
    return [torch.tensor(ix) for ix in index.values()]


def _check_rewards(rewards, prompts):
    if rewards.ndim != 1 or len(prompts) != rewards.shape[0]:
        raise ValueError(f"rewards must be (B,) with one prompt each; got rewards {tuple(rewards.shape)} "
                         f"and {len(prompts)} prompts")


def compute_advantages(rewards, prompts, std="global", clip=5.0, eps=1e-4):
    """GRPO advantages: each reward minus the mean reward of its prompt's group, over a std, clipped.

    std="global" (released): A = (r - mean_group) / (std(all B rewards) + eps).
    std="per_prompt":        A = (r - mean_group) / (std(group) + eps).
    Both stds are population stds (ddof 0, numpy's default, as released); eps is added after the std.
    Computed in float64 as released (numpy), returned in the rewards' float dtype. The group baseline comes
    from the current batch only: the released tracker is cleared every epoch.

    Args:
        rewards: (B,) rewards.
        prompts: B prompts; equal strings form one group.
        std: "global" or "per_prompt".
        clip: advantages are clamped to [-clip, clip]; None for no clip.
    Returns:
        (B,) advantages.
    Raises:
        ValueError on a bad std name or mismatched lengths.
    """
    if std not in ("global", "per_prompt"):
        raise ValueError(f"std must be 'global' or 'per_prompt', got {std!r}")
    _check_rewards(rewards, prompts)
    r = rewards.detach().to(torch.float64)
    global_scale = r.std(correction=0) + eps
    advantages = torch.empty_like(r)
    for idx in _groups(prompts):
        idx = idx.to(r.device)
        group = r[idx]
        scale = global_scale if std == "global" else group.std(correction=0) + eps
        advantages[idx] = (group - group.mean()) / scale
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return advantages.to(out_dtype)


def zero_std_fraction(rewards, prompts) -> float:
    """Share of prompt groups whose rewards are all equal (zero std): their advantages are all zero,
    so they carry no policy-gradient signal. The diagnostic to log each epoch (released: zero_std_ratio)."""
    _check_rewards(rewards, prompts)
    groups = _groups(prompts)
    flat = sum(bool((rewards[idx.to(rewards.device)] == rewards[idx[0]]).all()) for idx in groups)
    return flat / len(groups)


def informative_mask(rewards, prompts, multiple_of=1, generator=None):
    """(B,) bool mask keeping samples whose group has reward spread; zero-std groups are dropped.

    The released loop drops samples whose advantage is exactly zero, which is the same set except for a sample
    that happens to equal its group mean. If the kept count is not a multiple of `multiple_of` (the number of
    training minibatches), randomly chosen dropped samples are put back to make it one, as released (when there
    are enough of them; otherwise the mask is returned as is).
    """
    _check_rewards(rewards, prompts)
    mask = torch.zeros(len(prompts), dtype=torch.bool)
    for idx in _groups(prompts):
        group = rewards[idx.to(rewards.device)]
        mask[idx] = not bool((group == group[0]).all())
    short = (-int(mask.sum())) % multiple_of
    dropped = torch.nonzero(~mask).flatten()
    if short and len(dropped) >= short:
        mask[dropped[torch.randperm(len(dropped), generator=generator)[:short]]] = True
    return mask.to(rewards.device)


def grpo_loss(log_prob, old_log_prob, advantages, prev_sample_mean=None, prev_sample_mean_ref=None,
              std_dev_t=None, clip_range=1e-4, beta=0.04):
    """Flow-GRPO loss of one sampling step: PPO clipped surrogate plus beta * KL to the reference policy.

        ratio  = exp(log_prob - old_log_prob)
        policy = mean(max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + clip_range)))   (PPO, Schulman 2017)
        KL     = mean_b[ mean_elements((mu_theta - mu_ref)^2) / (2 sigma_t^2) ]
        loss   = policy + beta * KL
    The KL is the closed form between the two Gaussian steps with equal covariance, divided by the step's
    element count as the log-prob is; the released code divides by sigma_t^2, not (sigma_t^2 * -dt), and so do we.

    Args:
        log_prob: (B,) log-probs of the stored next latents under the current weights (with gradient).
        old_log_prob: (B,) log-probs stored at rollout time.
        advantages: (B,) advantages (already clipped).
        prev_sample_mean, prev_sample_mean_ref: (B, ...) step means under the current and reference weights;
            only needed when beta > 0.
        std_dev_t: (B,) or (B, 1, ..., 1) sigma_t of the step; only needed when beta > 0.
        clip_range: PPO clip epsilon.
        beta: KL weight; 0 skips the KL term.
    Returns:
        loss (scalar), stats: dict of detached scalars policy_loss, kl_loss, approx_kl
        (= 0.5 * mean((log_prob - old_log_prob)^2), as released) and clipfrac (share with |ratio - 1| > clip_range).
    Raises:
        ValueError on mismatched (B,) shapes or beta > 0 without the means and std.
    """
    B = log_prob.shape[0]
    if log_prob.shape != (B,) or old_log_prob.shape != (B,) or advantages.shape != (B,):
        raise ValueError(f"log_prob, old_log_prob, advantages must all be ({B},), got {tuple(log_prob.shape)}, "
                         f"{tuple(old_log_prob.shape)}, {tuple(advantages.shape)}")
    advantages = advantages.to(log_prob.dtype)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()

    kl_loss = torch.zeros((), device=log_prob.device)
    if beta > 0:
        if prev_sample_mean is None or prev_sample_mean_ref is None or std_dev_t is None:
            raise ValueError("beta > 0 needs prev_sample_mean, prev_sample_mean_ref and std_dev_t; pass beta=0 "
                             "to train without the KL term")
        sq = ((prev_sample_mean - prev_sample_mean_ref) ** 2).flatten(1).mean(1)  # (B,)
        kl_loss = (sq / (2 * std_dev_t.reshape(B) ** 2)).mean()
    loss = policy_loss + beta * kl_loss

    stats = {
        "policy_loss": policy_loss.detach(),
        "kl_loss": kl_loss.detach(),
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
    }
    return loss, stats


# ---------------------------------------------------------------- rollout and update (model in the loop)

def _unconditional(model, B, text_f, text_f_c):
    """The stored empty-caption features, (B, 77, Dt) and (B, Dc), for the CFG branch."""
    neg_f, neg_f_c = getattr(model, "module", model).empty_conditions(B)
    return neg_f.to(text_f.dtype), neg_f_c.to(text_f_c.dtype)


@torch.no_grad()
def rollout(model, noise, text_f, text_f_c, num_steps=10, cfg_strength=4.5, noise_level=0.7, generator=None):
    """Sample latents with the Flow-GRPO SDE and keep what training needs to re-score every step.

    Args:
        model: velocity model, model(latent (B, N, C), text_f, text_f_c, t (B,)) -> (B, N, C), with
            empty_conditions(B) for the unconditional CFG branch.
        noise: (B, N, C) starting latents at t = 1.
        text_f (B, 77, Dt), text_f_c (B, Dc): caption features.
        num_steps: SDE steps on t = linspace(1, 0, num_steps + 1); cfg_strength: CFG scale (also in training).
        noise_level: a of the SDE; generator: for the step noise.
    Returns:
        dict of latents (B, T, N, C) before each step, next_latents (B, T, N, C) after it, log_probs (B, T)
        and timesteps (B, T + 1), the time grid (step j goes from timesteps[:, j] to timesteps[:, j + 1]).
        The final sample is next_latents[:, -1] (normalised latents).
    """
    B = noise.shape[0]
    neg_f, neg_f_c = _unconditional(model, B, text_f, text_f_c)
    grid = torch.linspace(1, 0, num_steps + 1, device=noise.device)  # fp32, as released
    x, latents, next_latents, log_probs = noise, [], [], []
    for i in range(num_steps):
        v = guided_velocity(model, x, grid[i].to(x.dtype).expand(B), text_f, text_f_c, neg_f, neg_f_c, cfg_strength)
        x_next, log_prob, _, _ = sde_step_with_logprob(x, v, grid[i], grid[i + 1], noise_level, generator=generator)
        latents.append(x)
        x = x_next.to(noise.dtype)
        next_latents.append(x)
        log_probs.append(log_prob)
    return {"latents": torch.stack(latents, 1), "next_latents": torch.stack(next_latents, 1),
            "log_probs": torch.stack(log_probs, 1), "timesteps": grid.expand(B, -1)}


def step_log_prob(model, batch, j, cfg_strength=4.5, noise_level=0.7):
    """Re-score stored step j of `batch` (a rollout dict plus text_f, text_f_c) under `model`'s current weights.

    Returns log_prob (B,), step mean (B, N, C) and sigma_t (B, 1, 1); gradients flow if enabled.
    """
    x, x_next = batch["latents"][:, j], batch["next_latents"][:, j]  # (B, N, C)
    t, t_next = batch["timesteps"][:, j], batch["timesteps"][:, j + 1]  # (B,)
    neg_f, neg_f_c = _unconditional(model, x.shape[0], batch["text_f"], batch["text_f_c"])
    v = guided_velocity(model, x, t.to(x.dtype), batch["text_f"], batch["text_f_c"], neg_f, neg_f_c, cfg_strength)
    _, log_prob, mean, std = sde_step_with_logprob(x, v, t, t_next, noise_level, prev_sample=x_next)
    return log_prob, mean, std


def train_step(model, ref_model, optimizer, batches, cfg: GRPOConfig):
    """One optimizer update from `batches` (a list of minibatches, the gradient-accumulation group).

    Each minibatch is a rollout dict plus text_f, text_f_c and advantages (B,). The loss of every minibatch and
    each of its first cfg.num_train_steps sampling steps is averaged into one gradient (as the released
    accumulation over minibatches x timesteps does), clipped to cfg.grad_clip, then applied.
    ref_model: frozen copy of the starting weights (only used when cfg.beta > 0).
    Returns the mean of grpo_loss's stats over all terms, plus loss and grad_norm, as floats.
    """
    T = cfg.num_train_steps
    n_terms = T * len(batches)
    totals = {}
    optimizer.zero_grad(set_to_none=True)
    for batch in batches:
        for j in range(T):
            log_prob, mean, std = step_log_prob(model, batch, j, cfg.cfg_strength, cfg.noise_level)
            mean_ref = None
            if cfg.beta > 0:
                with torch.no_grad():
                    _, mean_ref, _ = step_log_prob(ref_model, batch, j, cfg.cfg_strength, cfg.noise_level)
            loss, stats = grpo_loss(log_prob, batch["log_probs"][:, j], batch["advantages"], mean, mean_ref, std,
                                    clip_range=cfg.clip_range, beta=cfg.beta)
            (loss / n_terms).backward()
            for k, v in {**stats, "loss": loss.detach()}.items():
                totals[k] = totals.get(k, 0.0) + v.item() / n_terms
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return {**totals, "grad_norm": grad_norm.item()}
