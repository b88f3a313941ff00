"""Flow-GRPO for the flow-matching generator, as Resonate runs it.

Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470) turns
the deterministic Euler sampler into an SDE with the same marginals (flow.sde_step_with_logprob), so every
sampling step is a Gaussian policy with a log-prob. Resonate (arXiv 2603.11661) samples a group of clips per
caption, scores them with a reward (reward.py), and updates the transformer with a PPO-style clipped loss plus a
KL penalty to a frozen copy of the starting weights. One epoch of `train.py --stage=grpo` is:

    sample_epoch       rollouts (SDE + CFG) for this rank's share of the global batch, decoded and scored
    gather_advantages  rewards and prompt ids from every rank -> per-caption advantages -> this rank's slice
    train_epoch        drop samples without signal, shuffle, minibatches -> train_step (clipped loss + KL, update)

built from `rollout`, `compute_advantages`, `grpo_loss` and `train_step`. Memory: `apply_lora` (the frozen
base doubles as the reference model) and `Resonate.grad_checkpointing`; `memory_estimate` does the arithmetic.

Time convention as in flow.py: t = 1 is noise, t = 0 is data, the network predicts v = noise - data.
"""

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from data import seeded_generator
from flow import euler_sample, guided_velocity, sde_step_with_logprob


@dataclass
class GRPOConfig:
    """Flow-GRPO hyper-parameters; defaults are the released Resonate run (the released config/GRPO_*.yaml).

    Per epoch and process: num_batches_per_epoch rollout batches of sample_batch_size clips; across processes
    each rollout batch holds world_size * sample_batch_size / group_size captions, group_size clips each. The
    epoch's samples (less those without signal) are then split into num_batches_per_epoch training minibatches,
    and every grad_accum_steps of them (each accumulated over its num_train_steps timesteps) make one update.
    train.py reads every field from its setting grpo_<field> (`--grpo_group_size=4`); the defaults live here only.
    """
    num_steps: int = 10               # SDE sampling steps per rollout, on t = linspace(1, 0, num_steps + 1)
    noise_level: float = 0.7          # a in sigma_t = a * sqrt(t / (1 - t))
    cfg_strength: float = 4.5         # CFG also during rollouts and training
    group_size: int = 24              # clips sampled per caption
    sample_batch_size: int = 24       # clips per rollout batch (per process)
    num_batches_per_epoch: int = 4    # rollout batches per epoch, also the number of training minibatches
    grad_accum_steps: int = 2         # minibatches per optimizer step (each also accumulates over timesteps)
    num_inner_epochs: int = 1         # passes over one epoch's rollouts
    timestep_fraction: float = 0.99   # train on the first int(num_steps * fraction) sampling steps
    advantage_std: str = "global"     # "global": batch-wide reward std (released); "per_prompt": group std
    same_noise: bool = False          # a group's clips share their starting noise (flow_grpo's same_latent)
    adv_clip_max: float = 5.0         # advantages clipped to +-adv_clip_max
    clip_range: float = 1e-4          # PPO ratio clip
    beta: float = 0.04                # weight of the KL penalty to the reference model
    lr: float = 1e-4                  # AdamW, constant (no warm-up or decay, as released)
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    grad_clip: float = 1.0            # max global grad norm

    @property
    def num_train_steps(self) -> int:
        """Number of sampling steps trained on per rollout (9 for the defaults)."""
        return int(self.num_steps * self.timestep_fraction)

    def check(self, world_size: int = 1):
        """Raise ValueError, naming the setting, for a layout that does not divide evenly or an unknown name."""
        problems = [
            ((world_size * self.sample_batch_size) % self.group_size,
             f"world_size x sample_batch_size = {world_size} x {self.sample_batch_size} must be a multiple of "
             f"group_size={self.group_size}: every rollout batch holds whole groups"),
            (self.num_batches_per_epoch % self.grad_accum_steps, f"num_batches_per_epoch="
             f"{self.num_batches_per_epoch} must be a multiple of grad_accum_steps={self.grad_accum_steps}"),
            (not 1 <= self.num_train_steps <= self.num_steps, f"timestep_fraction={self.timestep_fraction} trains "
             f"on {self.num_train_steps} of {self.num_steps} steps; it must give at least one"),
            (self.advantage_std not in ("global", "per_prompt"),
             f"advantage_std must be 'global' or 'per_prompt', got {self.advantage_std!r}")]
        for bad, message in problems:
            if bad:
                raise ValueError(message)


# ---------------------------------------------------------------- advantages

def _groups(prompts) -> list[torch.Tensor]:
    """Sample indices of each distinct prompt, in order of first appearance."""
    index = {}
    for i, p in enumerate(prompts):
        index.setdefault(p, []).append(i)
    return [torch.tensor(ix) for ix in index.values()]


def compute_advantages(rewards, prompts, std="global", clip=5.0, eps=1e-4):
    """GRPO advantages: each reward minus the mean reward of its prompt's group, over a std, clipped.

    std="global" (released): A = (r - mean_group) / (std(all B rewards) + eps).
    std="per_prompt":        A = (r - mean_group) / (std(group) + eps).
    Both stds are population stds (ddof 0, numpy's default, as released); eps is added after the std.
    Computed in float64 as released (numpy), returned in the rewards' float dtype. The group baseline comes
    from the current batch only: the released tracker is cleared every epoch.
    rewards: (B,); prompts: B prompts, equal ones form a group; clip: |A| <= clip (None: no clip). Returns (B,).
    """
    assert std in ("global", "per_prompt") and rewards.shape == (len(prompts),), (std, rewards.shape, len(prompts))
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
    groups = _groups(prompts)
    flat = sum(bool((rewards[idx.to(rewards.device)] == rewards[idx[0]]).all()) for idx in groups)
    return flat / len(groups)


def informative_mask(advantages, multiple_of=1, generator=None):
    """(B,) bool mask of the samples to train on: those with a non-zero advantage.

    A zero-std group has all advantages exactly zero and carries no policy-gradient signal, so it is dropped
    (as released). If the kept count is not a positive multiple of `multiple_of` (the number of training
    minibatches), randomly chosen dropped samples are put back to make it one (released; we also make sure at
    least `multiple_of` are kept, so that every process takes the same number of steps under DDP).
    """
    assert advantages.ndim == 1 and advantages.shape[0] >= multiple_of, (advantages.shape, multiple_of)
    mask = advantages.detach().cpu() != 0
    kept = int(mask.sum())
    short = multiple_of if kept == 0 else (-kept) % multiple_of
    dropped = torch.nonzero(~mask).flatten()
    if short and len(dropped) >= short:
        mask[dropped[torch.randperm(len(dropped), generator=generator)[:short]]] = True
    return mask.to(advantages.device)


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
    """
    B = log_prob.shape[0]
    assert log_prob.shape == old_log_prob.shape == advantages.shape == (B,), (old_log_prob.shape, advantages.shape)
    advantages = advantages.to(log_prob.dtype)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()

    kl_loss = torch.zeros((), device=log_prob.device)
    if beta > 0:
        assert prev_sample_mean is not None and prev_sample_mean_ref is not None and std_dev_t is not None
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
def rollout(model, noise, text_f, text_f_c, num_steps=10, cfg_strength=4.5, noise_level=0.7, keep_steps=None,
            step_noise=None, generator=None):
    """Sample latents with the Flow-GRPO SDE and keep what training needs to re-score its steps, nothing more.

    Args:
        model: velocity model, model(latent (B, N, C), text_f, text_f_c, t (B,)) -> (B, N, C), with
            empty_conditions(B) for the unconditional CFG branch.
        noise: (B, N, C) starting latents at t = 1.
        text_f (B, 77, Dt), text_f_c (B, Dc): caption features.
        num_steps: SDE steps on t = linspace(1, 0, num_steps + 1); cfg_strength: CFG scale (also in training).
        noise_level: a of the SDE.
        keep_steps: T, how many of the first steps to keep for training (default all); later steps are still
            sampled, but their latents are not stored.
        step_noise: (B, num_steps, N, C) the eps of every step (reproducible per sample); otherwise drawn from
            `generator`.
    Returns:
        dict of latents (B, T + 1, N, C): the chain x_0 .. x_T, so step j goes from latents[:, j] to
        latents[:, j + 1] (latent and next latent share one tensor); log_probs (B, T) fp32; timesteps (B, T + 1),
        step j going from timesteps[:, j] to timesteps[:, j + 1]; sample (B, N, C), the final normalised latents.
    """
    B = noise.shape[0]
    T = num_steps if keep_steps is None else keep_steps
    assert 0 <= T <= num_steps, (keep_steps, num_steps)
    assert step_noise is None or step_noise.shape == (B, num_steps, *noise.shape[1:]), step_noise.shape
    neg_f, neg_f_c = _unconditional(model, B, text_f, text_f_c)
    grid = torch.linspace(1, 0, num_steps + 1, device=noise.device)  # fp32, as released
    x, chain, log_probs = noise, [noise.float()], []
    for i in range(num_steps):
        v = guided_velocity(model, x, grid[i].to(x.dtype).expand(B), text_f, text_f_c, neg_f, neg_f_c, cfg_strength)
        eps = None if step_noise is None else step_noise[:, i]
        x_next, log_prob, _, _ = sde_step_with_logprob(x, v, grid[i], grid[i + 1], noise_level, noise=eps,
                                                       generator=generator)
        x = x_next.to(noise.dtype)
        if i < T:
            chain.append(x_next)
            log_probs.append(log_prob)
    empty = noise.new_zeros(B, 0)
    return {"latents": torch.stack(chain, 1), "log_probs": torch.stack(log_probs, 1) if log_probs else empty,
            "timesteps": grid[:T + 1].expand(B, -1).contiguous(), "sample": x}


def step_log_prob(model, batch, j, cfg_strength=4.5, noise_level=0.7):
    """Re-score stored step j of `batch` (a rollout dict plus text_f, text_f_c) under `model`'s current weights.

    Returns log_prob (B,), step mean (B, N, C) and sigma_t (B, 1, 1); gradients flow if enabled.
    """
    x, x_next = batch["latents"][:, j], batch["latents"][:, j + 1]  # (B, N, C)
    t, t_next = batch["timesteps"][:, j], batch["timesteps"][:, j + 1]  # (B,)
    neg_f, neg_f_c = _unconditional(model, x.shape[0], batch["text_f"], batch["text_f_c"])
    dtype = batch["text_f"].dtype
    v = guided_velocity(model, x.to(dtype), t.to(dtype), batch["text_f"], batch["text_f_c"], neg_f, neg_f_c,
                        cfg_strength)
    _, log_prob, mean, std = sde_step_with_logprob(x, v, t, t_next, noise_level, prev_sample=x_next)
    return log_prob, mean, std


def _micro_slices(B, micro_batch):
    size = micro_batch if 0 < micro_batch < B else B
    return [slice(i, min(i + size, B)) for i in range(0, B, size)]


def train_step(model, ref_model, optimizer, batches, cfg: GRPOConfig, micro_batch=0, autocast=None):
    """One optimizer update from `batches` (a list of minibatches, the gradient-accumulation group).

    Each minibatch is a rollout dict (latents, log_probs, timesteps) plus text_f, text_f_c and advantages (B,).
    The loss of every minibatch and each of its first cfg.num_train_steps sampling steps is averaged into one
    gradient (as the released accumulation over minibatches x timesteps does), clipped to cfg.grad_clip, then
    applied. micro_batch > 0 runs each minibatch in slices of that many clips, weighted by their share: the
    same gradient (up to float rounding) with activations for micro_batch clips only. Under DDP (model wrapped),
    gradients are synchronised on the last backward only. ref_model: the frozen reference (a copy of the starting
    weights, or the LoRA policy itself with its adapters switched off), used if cfg.beta > 0.
    Returns the mean of grpo_loss's stats over all terms, plus loss and grad_norm, as floats.
    """
    T = cfg.num_train_steps
    jobs = [(batch, j, sl) for batch in batches for j in range(T)
            for sl in _micro_slices(len(batch["advantages"]), micro_batch)]
    totals = {}
    optimizer.zero_grad(set_to_none=True)
    for n, (batch, j, sl) in enumerate(jobs):
        part = {k: v[sl] for k, v in batch.items()}
        weight = (sl.stop - sl.start) / len(batch["advantages"]) / (T * len(batches))
        sync = n == len(jobs) - 1 or not hasattr(model, "no_sync")
        with (nullcontext() if sync else model.no_sync()), (autocast or nullcontext()):
            log_prob, mean, std = step_log_prob(model, part, j, cfg.cfg_strength, cfg.noise_level)
            mean_ref = None
            if cfg.beta > 0:
                with torch.no_grad(), adapters_disabled(ref_model):
                    _, mean_ref, _ = step_log_prob(ref_model, part, j, cfg.cfg_strength, cfg.noise_level)
            loss, stats = grpo_loss(log_prob, part["log_probs"][:, j], part["advantages"], mean, mean_ref, std,
                                    clip_range=cfg.clip_range, beta=cfg.beta)
            (loss * weight).backward()
        for k, v in {**stats, "loss": loss.detach()}.items():
            totals[k] = totals.get(k, 0.0) + v.item() * weight
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    return {**totals, "grad_norm": grad_norm.item()}


# ---------------------------------------------------------------- LoRA (the lean reference model)

LORA_TARGETS = ("attn.qkv", "linear1", "ffn.w1", "ffn.w2", "ffn.w3")  # attention and MLP projections


class LoRA(nn.Module):
    """A frozen projection plus a trainable low-rank update: y = base(x) + (alpha / rank) * up(down(x)).

    LoRA (Hu et al. 2021, arXiv 2106.09685). `base` is an nn.Linear, or a channels-last Conv1d over time
    (transformer.Conv1dNLC, the audio stream's kernel-3 projections): then `down` is a conv with the same
    kernel and padding and `up` a linear map, so the update is itself a rank-r conv. `up` starts at zero, so
    the wrapped model starts equal to the base. With `enabled` False the module is exactly the base: that is
    the frozen reference of the KL term, with no second copy of the weights.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        assert rank >= 1 and (isinstance(base, nn.Linear) or type(base).__name__ == "Conv1dNLC"), (rank, base)
        if isinstance(base, nn.Linear):
            down, out_features = nn.Linear(base.in_features, rank, bias=False), base.out_features
        else:
            down = type(base)(base.in_channels, rank, base.kernel_size[0], padding=base.padding[0], bias=False)
            out_features = base.out_channels
        self.base = base.requires_grad_(False)
        self.lora_down, self.lora_up = down, nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(self.lora_up.weight)
        self.scale, self.enabled = alpha / rank, True

    def forward(self, x):
        y = self.base(x)
        return y + self.scale * self.lora_up(self.lora_down(x)) if self.enabled else y

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The update in the base weight's layout: (out, in) for a Linear, (out, in, kernel) for a conv."""
        up, down = self.lora_up.weight, self.lora_down.weight  # (out, r), (r, in) or (r, in, k)
        return self.scale * torch.einsum("or,r...->o...", up, down)


def apply_lora(model: nn.Module, rank: int = 32, alpha: float = 64.0, targets=LORA_TARGETS) -> list:
    """Freeze `model` and wrap every module whose name ends in one of `targets` with LoRA, in place.

    Default targets: the attention qkv and output projections and the three SwiGLU projections of every
    block, on both streams (Linear on the text stream, kernel-3 convs on the audio stream); embedders, adaLN
    modulation and the output layer stay frozen. rank 32, alpha 64 as the released LoRA option.
    Returns the trainable LoRA parameters.
    """
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]
    assert names, f"no module of {type(model).__name__} matches the LoRA targets {targets}"
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, LoRA(getattr(holder, child), rank, alpha))
    return [p for m in model.modules() if isinstance(m, LoRA) for p in (m.lora_down.weight, m.lora_up.weight)]


@contextmanager
def adapters_disabled(model):
    """Run `model` as its frozen base: every LoRA update switched off (a no-op for a model without LoRA)."""
    loras = [m for m in model.modules() if isinstance(m, LoRA)]
    for m in loras:
        m.enabled = False
    try:
        yield
    finally:
        for m in loras:
            m.enabled = True


def lora_state_dict(model) -> dict:
    """Only the LoRA weights (keys containing lora_down / lora_up), for checkpoints."""
    return {k: v for k, v in model.state_dict().items() if ".lora_down." in k or ".lora_up." in k}


def merged_state_dict(model) -> dict:
    """The model's state dict with every LoRA folded into its base weight, under the plain keys: loads into
    the unwrapped model (e.g. sample.py). Without LoRA this is model.state_dict()."""
    state = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, LoRA):
            state[f"{name}.weight"] = state.pop(f"{name}.base.weight") + m.delta_weight().to(m.base.weight.dtype)
            if m.base.bias is not None:
                state[f"{name}.bias"] = state.pop(f"{name}.base.bias")
            for k in (f"{name}.lora_down.weight", f"{name}.lora_up.weight"):
                state.pop(k)
    return state


# ---------------------------------------------------------------- one epoch, across processes

def draw_prompt_ids(seed, epoch, batch, n_prompts, cfg: GRPOConfig, world_size=1) -> torch.Tensor:
    """Caption ids of rollout batch `batch` of `epoch` for all processes: (world_size * sample_batch_size,).

    world_size * sample_batch_size / group_size distinct captions, each repeated group_size times, shuffled so
    a caption's group spans processes (as the released sampler does); process r takes slice r. Drawn from a
    generator seeded by (seed, epoch, batch), so a resumed run draws the same. Raises ValueError if there are
    fewer captions than one batch needs.
    """
    G = world_size * cfg.sample_batch_size
    m = G // cfg.group_size
    if m > n_prompts:
        raise ValueError(f"a rollout batch needs {m} distinct captions but the prompt list has {n_prompts}; "
                         f"lower sample_batch_size or raise group_size")
    g = seeded_generator(seed, 'prompts', epoch, batch)
    ids = torch.randperm(n_prompts, generator=g)[:m].repeat_interleave(cfg.group_size)
    return ids[torch.randperm(G, generator=g)]


def draw_noise(seed, epoch, sample_index, num_steps, latent_shape) -> torch.Tensor:
    """(B, num_steps + 1, N, C): the starting noise and the eps of every SDE step of each listed sample.

    Each sample of an epoch has its own generator, seeded by (seed, epoch, global sample index), so a sample's
    noise does not depend on how the batch is split across processes or on a resume."""
    out = []
    for i in sample_index.tolist():
        out.append(torch.randn(num_steps + 1, *latent_shape, generator=seeded_generator(seed, 'noise', epoch, i)))
    return torch.stack(out)


def rollout_noise(seed, epoch, batch, prompt_ids, cfg: GRPOConfig, latent_shape, rank=0, world_size=1):
    """(B, num_steps + 1, N, C): draw_noise for this rank's B = sample_batch_size clips of rollout batch `batch`.

    With cfg.same_noise (flow_grpo's same_latent) the clips of one caption (prompt_ids (B,)) share their starting
    noise, drawn by (seed, epoch, batch, caption id) so that it is equal across processes too; their SDE steps'
    eps still differ, so reward differences within a group come only from the steps the policy is trained on."""
    per = cfg.sample_batch_size
    noise = draw_noise(seed, epoch, batch * world_size * per + rank * per + torch.arange(per), cfg.num_steps,
                       latent_shape)
    if cfg.same_noise:
        noise[:, 0] = torch.stack([torch.randn(*latent_shape, generator=seeded_generator(seed, 'group', epoch, batch, i))
                                   for i in prompt_ids.tolist()])
    return noise


def sample_epoch(policy, pipe, reward_fn, text, prompts, cfg: GRPOConfig, epoch, seed, latent_shape, rank=0,
                 world_size=1, autocast=None):
    """This rank's rollouts of one epoch, decoded and scored.

    Args:
        policy: the transformer (unwrapped); pipe: sample.Pipeline for decoding (its vae, vocoder, mel_cfg).
        reward_fn: reward.score-like callable (audio (B, S), sample_rate, prompts) -> (B,).
        text: callable (captions, device) -> text_f (B, 77, Dt), text_f_c (B, Dc) (e.g. a caching encoder).
        prompts: the caption list; latent_shape: (N, C) latent frames and channels.
    Returns dict with (B_rank, ...) tensors latents (B, T + 1, N, C), log_probs (B, T), timesteps (B, T + 1),
    prompt_ids (B,) and rewards (B,) fp32, B_rank = num_batches_per_epoch * sample_batch_size.
    """
    device, dtype = policy.latent_mean.device, policy.latent_mean.dtype
    per = cfg.sample_batch_size
    batches = []
    for b in range(cfg.num_batches_per_epoch):
        ids = draw_prompt_ids(seed, epoch, b, len(prompts), cfg, world_size)[rank * per:(rank + 1) * per]
        noise = rollout_noise(seed, epoch, b, ids, cfg, latent_shape, rank, world_size).to(device, dtype)
        captions = [prompts[i] for i in ids.tolist()]
        text_f, text_f_c = (x.to(dtype) for x in text(captions, device))
        with autocast or nullcontext():
            out = rollout(policy, noise[:, 0], text_f, text_f_c, cfg.num_steps, cfg.cfg_strength, cfg.noise_level,
                          keep_steps=cfg.num_train_steps, step_noise=noise[:, 1:])
        audio = pipe.decode(out.pop("sample"))[2][:, 0]  # (B, S)
        rewards = torch.as_tensor(reward_fn(audio, pipe.sample_rate, captions)).float().to(device)
        batches.append({**out, "prompt_ids": ids.to(device), "rewards": rewards})
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every process) over processes, in rank order; x itself without DDP."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_advantages(rewards, prompt_ids, cfg: GRPOConfig, rank=0):
    """Advantages of this rank's samples, computed over every process's rewards so a caption's group may
    span processes. rewards, prompt_ids: (B,) of this rank (same B on every rank).

    Returns (advantages (B,), stats) with the global reward_mean, reward_std (ddof 0) and zero_std_share (the
    share of caption groups whose rewards are all equal).
    """
    all_rewards, all_ids = all_gather(rewards.float()), all_gather(prompt_ids)
    ids = all_ids.tolist()
    advantages = compute_advantages(all_rewards, ids, std=cfg.advantage_std, clip=cfg.adv_clip_max)
    B = rewards.shape[0]
    stats = {"reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std(correction=0).item(),
             "zero_std_share": zero_std_fraction(all_rewards, ids)}
    return advantages[rank * B:(rank + 1) * B], stats


def train_epoch(model, ref_model, optimizer, samples, text, prompts, cfg: GRPOConfig, generator, micro_batch=0,
                autocast=None):
    """Train on one epoch's samples: drop those without signal, then per inner epoch shuffle, split into
    cfg.num_batches_per_epoch minibatches and take one train_step per cfg.grad_accum_steps of them.

    samples: sample_epoch's dict plus advantages (B,); text, prompts as in sample_epoch; generator: a seeded
    torch.Generator (CPU) for the mask padding and shuffles, so a resumed run repeats them.
    Returns the list of train_step stats (one per update) with `kept`, the number of samples trained on.
    """
    mask = informative_mask(samples["advantages"], cfg.num_batches_per_epoch, generator).cpu()
    keys = ("latents", "log_probs", "timesteps", "prompt_ids", "advantages")
    kept = {k: samples[k][mask.to(samples[k].device)] for k in keys}
    K = len(kept["advantages"])
    size = K // cfg.num_batches_per_epoch
    dtype = getattr(model, "module", model).latent_mean.dtype
    logs = []
    for _ in range(cfg.num_inner_epochs):
        perm = torch.randperm(K, generator=generator)
        minibatches = []
        for b in range(cfg.num_batches_per_epoch):
            idx = perm[b * size:(b + 1) * size].to(kept["advantages"].device)
            batch = {k: v[idx] for k, v in kept.items()}
            captions = [prompts[i] for i in batch.pop("prompt_ids").tolist()]
            text_f, text_f_c = text(captions, batch["latents"].device)
            minibatches.append({**batch, "text_f": text_f.to(dtype), "text_f_c": text_f_c.to(dtype)})
        for i in range(0, len(minibatches), cfg.grad_accum_steps):
            stats = train_step(model, ref_model, optimizer, minibatches[i:i + cfg.grad_accum_steps], cfg,
                               micro_batch, autocast)
            logs.append({**stats, "kept": K})
    return logs


@torch.no_grad()
def evaluate_reward(policy, pipe, reward_fn, text, prompts, seed, num_steps=25, cfg_strength=4.5, batch_size=16,
                    rank=0, world_size=1, autocast=None) -> float:
    """Mean reward of deterministic (Euler, CFG) samples for `prompts`: the held-out measure of progress.

    Prompt i always starts from the noise of (seed, i), so two calls differ only through the weights; calls
    with different seeds measure the sampling noise. Prompts are shared out across processes and the mean is
    over all of them. latent frames: the policy's default (cfg.latent_seq_len)."""
    device, dtype = policy.latent_mean.device, policy.latent_mean.dtype
    N, C = policy.cfg.latent_seq_len, policy.cfg.latent_dim
    mine = list(range(rank, len(prompts), world_size))
    total = torch.zeros(2, device=device, dtype=torch.float64)  # sum of rewards, count
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        noise = torch.stack([torch.randn(N, C, generator=seeded_generator(seed, 'eval', i)) for i in idx])
        noise = noise.to(device, dtype)
        captions = [prompts[i] for i in idx]
        text_f, text_f_c = (x.to(dtype) for x in text(captions, device))
        with autocast or nullcontext():
            x = euler_sample(policy, noise, text_f, text_f_c, num_steps=num_steps, cfg_strength=cfg_strength)
        rewards = torch.as_tensor(reward_fn(pipe.decode(x)[2][:, 0], pipe.sample_rate, captions))
        total += torch.stack([rewards.double().sum(), torch.tensor(float(len(idx)), dtype=torch.float64)]).to(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


# ---------------------------------------------------------------- memory arithmetic

GiB = 2**30


def saved_bytes_per_token(hidden_dim, num_heads, mlp_ratio=4.0, dtype=torch.bfloat16) -> float:
    """Activation bytes one stream block keeps for backward, per token, measured on the CPU.

    Runs one audio-stream block (the released layout: kernel-3 convs) of this width at two sequence lengths
    with saved-tensor hooks and takes the difference, so weights saved for backward are not counted. dtype
    bfloat16 = under autocast (as the released bf16 training), float32 = full precision. The CPU attention
    kernel, like CUDA's flash/memory-efficient ones, keeps the output and log-sum-exp, not the attention matrix.
    """
    from transformer import StreamBlock, rope_tables
    block = StreamBlock(hidden_dim, num_heads, mlp_ratio, kernel_size=3)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def measure(n):
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights:
                seen[(ptr, t.dtype)] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(1, n, hidden_dim, requires_grad=True)
        c = torch.randn(1, 1, hidden_dim)
        amp = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CPU autocast's note that RMSNorm falls back to the unfused kernel
            block(x, c, rope_tables(n, hidden_dim // num_heads))
        return sum(seen.values())

    return (measure(48) - measure(16)) / 32


def memory_estimate(model_cfg, cfg: GRPOConfig = GRPOConfig(), latent_frames=None, lora_rank=0,
                    checkpointing=False, micro_batch=0, dtype=torch.bfloat16, frozen=None) -> dict:
    """Peak GPU memory of one GRPO process during the training forward/backward, in GiB, by parts.

    Args:
        model_cfg: transformer.ResonateConfig; latent_frames: N (default model_cfg.latent_seq_len).
        cfg: GRPOConfig (sample_batch_size = the training minibatch before dropping zero-signal samples,
            num_steps and timestep_fraction set the stored rollout).
        lora_rank: 0 = full fine-tuning with a frozen fp32 reference copy; r > 0 = apply_lora(rank r), the
            base doubles as the reference, only LoRA weights get gradients and AdamW states.
        checkpointing: Resonate.grad_checkpointing: keep each block's fp32 input, recompute one block at a time.
        micro_batch: clips per forward/backward (0 = the whole minibatch, as released).
        dtype: activation dtype (bfloat16 autocast as released, or float32).
        frozen: {name: (parameters, bytes per parameter)} of the other models held on the GPU (text encoder,
            VAE, vocoder, reward model); default the released stack.
    Returns {part: GiB} plus "total". Weights stay fp32 (AdamW master weights), states two fp32 tensors.
    Activations: saved_bytes_per_token per stream block times the tokens of each block (joint blocks: N audio
    + text tokens; single blocks: N), plus one block's worth for the input/output layers; x 2 for CFG (the
    conditional and unconditional branches run as one batch). Excludes the allocator's fragmentation and
    the transient activations of rollouts, decoding and the reward model (they are freed before training).
    """
    from transformer import Resonate
    N = latent_frames or model_cfg.latent_seq_len
    model = Resonate.from_config(model_cfg, device="meta")
    P = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in apply_lora(model, lora_rank)) if lora_rank else P
    n_joint, n_single = model_cfg.depth - model_cfg.fused_depth, model_cfg.fused_depth
    block_tokens = n_joint * (N + model_cfg.text_seq_len) + n_single * N + N  # + in/out layers ~ one block
    per_token = saved_bytes_per_token(model_cfg.hidden_dim, model_cfg.num_heads, model_cfg.mlp_ratio, dtype)
    clips = micro_batch if 0 < micro_batch < cfg.sample_batch_size else cfg.sample_batch_size
    seqs = 2 * clips if cfg.cfg_strength != 1.0 else clips
    if checkpointing:  # block inputs (fp32 residual streams) + one block recomputed at a time
        acts = seqs * (block_tokens * model_cfg.hidden_dim * 4 + (N + model_cfg.text_seq_len) * per_token)
    else:
        acts = seqs * block_tokens * per_token
    T = cfg.num_train_steps
    if frozen is None:
        frozen = RELEASED_FROZEN
    parts = {
        "weights (fp32)": 4 * P,
        "gradients": 4 * trainable,
        "AdamW states": 8 * trainable,
        "reference copy": 0 if lora_rank else 4 * P,
        "activations": acts,
        "rollout storage": cfg.num_batches_per_epoch * cfg.sample_batch_size * (T + 1) * N * model_cfg.latent_dim * 4,
        **{name: n * b for name, (n, b) in frozen.items()},
    }
    out = {k: v / GiB for k, v in parts.items()}
    out["total"] = sum(out.values())
    out["trainable parameters (M)"] = trainable / 1e6
    out["activation bytes per token per block"] = per_token
    return out


# The other models of the released GRPO run, resident on every GPU: (parameters, bytes per parameter).
RELEASED_FROZEN = {
    "text encoder flan-t5-large encoder (fp32)": (341_231_104, 4),
    "VAE v1-44 (fp32)": (305_479_938, 4),  # fixtures/manifest_vae_44k.json
    "vocoder BigVGAN v2 44k (fp32)": (122_187_145, 4),  # fixtures/manifest_bigvgan_v2_44khz_128band_512x.json
    "reward Qwen2.5-Omni-7B thinker (bf16)": (8_931_813_888, 2),  # approximate: LLM 7.6 B + audio/vision encoders
}

