"""Flow-GRPO (Liu et al. 2025, arXiv 2505.05470) for the flow-matching generator, as Resonate (arXiv 2603.11661) runs
it. One epoch of `train.py --stage=grpo`: sample_epoch -> gather_advantages -> train_epoch. t = 1 is noise."""

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from data import all_gather, is_distributed, seeded_generator
from flow import euler_sample, guided_velocity, sde_step_with_logprob


@dataclass
class GRPOConfig:
    """Flow-GRPO settings, train.py's --grpo_<field>; the defaults are the released config/GRPO_*.yaml."""
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
        return int(self.num_steps * self.timestep_fraction)

    def check(self, world_size: int = 1):
        """Raise ValueError, naming the setting, for a value out of range, a layout that does not divide evenly or an
        unknown name."""
        counts = ("num_steps", "group_size", "sample_batch_size", "num_batches_per_epoch", "grad_accum_steps",
                  "num_inner_epochs")
        least = {"group_size": 2}  # a group of one has no advantage: such a run never trains
        bad = [f"{k}={getattr(self, k)}" for k in counts if not getattr(self, k) >= least.get(k, 1)]
        bad += [f"{k}={getattr(self, k)}" for k in ("noise_level", "clip_range", "lr", "grad_clip", "adv_clip_max")
                if not getattr(self, k) > 0]
        bad += [] if self.beta >= 0 else [f"beta={self.beta}"]
        if bad:
            raise ValueError(f"GRPO settings (train.py: --grpo_<name>) out of range: {', '.join(bad)}; counts must "
                             "be at least 1 (group_size 2), beta at least 0, the others above 0")
        if (world_size * self.sample_batch_size) % self.group_size:
            raise ValueError(f"world_size x sample_batch_size = {world_size} x {self.sample_batch_size} must be a "
                             f"multiple of group_size={self.group_size}: every rollout batch holds whole groups")
        if self.num_batches_per_epoch % self.grad_accum_steps:
            raise ValueError(f"num_batches_per_epoch={self.num_batches_per_epoch} must be a multiple of "
                             f"grad_accum_steps={self.grad_accum_steps}")
        if not 1 <= self.num_train_steps <= self.num_steps:
            raise ValueError(f"timestep_fraction={self.timestep_fraction} trains on {self.num_train_steps} of "
                             f"{self.num_steps} steps; it must give at least one")
        if self.advantage_std not in ("global", "per_prompt"):
            raise ValueError(f"advantage_std must be 'global' or 'per_prompt', got {self.advantage_std!r}")


# ---------------------------------------------------------------- advantages

def _groups(prompts, device) -> list[torch.Tensor]:  # sample indices of each distinct prompt
    index = {}
    for i, p in enumerate(prompts):
        index.setdefault(p, []).append(i)
    return [torch.tensor(ix, device=device) for ix in index.values()]


def compute_advantages(rewards, prompts, std="global", clip=5.0, eps=1e-4):
    """Advantages (B,) of rewards (B,): (r - its prompt group's mean) / (std + eps), clipped to +-clip; the std (ddof 0,
    float64 as released) of all B rewards ("global", released) or of the group ("per_prompt")."""
    assert std in ("global", "per_prompt") and rewards.shape == (len(prompts),), (std, rewards.shape, len(prompts))
    r = rewards.detach().to(torch.float64)
    global_scale = r.std(correction=0) + eps
    advantages = torch.empty_like(r)
    for idx in _groups(prompts, r.device):
        group = r[idx]
        scale = global_scale if std == "global" else group.std(correction=0) + eps
        advantages[idx] = (group - group.mean()) / scale
    return advantages.clamp(-clip, clip).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def zero_std_fraction(rewards, prompts) -> float:
    """Share of prompt groups whose rewards are all equal, hence zero advantages (released: zero_std_ratio)."""
    groups = _groups(prompts, rewards.device)
    return sum(bool((rewards[idx] == rewards[idx[0]]).all()) for idx in groups) / len(groups)


def informative_mask(advantages, multiple_of=1, generator=None):
    """(B,) mask of the non-zero advantages (as released) plus random others, to a positive multiple of multiple_of."""
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
    """Flow-GRPO loss of one step: PPO's clipped surrogate of exp(log_prob - old_log_prob), all (B,), plus beta x
    mean_b[mean((mu - mu_ref)^2) / (2 sigma_t^2)] (divided by sigma_t^2, not sigma_t^2 * -dt, as released); means
    (B, ...), std_dev_t (B,) or (B, 1, ...). Returns loss, {policy_loss, kl_loss, approx_kl, clipfrac} detached."""
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

    stats = {"policy_loss": policy_loss, "kl_loss": kl_loss, "approx_kl": 0.5 * (log_ratio ** 2).mean(),
             "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean()}
    return loss, {k: v.detach() for k, v in stats.items()}


# ---------------------------------------------------------------- rollout and update (model in the loop)

def _unconditional(model, B, text_f, text_f_c):
    neg_f, neg_f_c = getattr(model, "module", model).empty_conditions(B)
    return neg_f.to(text_f.dtype), neg_f_c.to(text_f_c.dtype)


@torch.no_grad()
def rollout(model, noise, text_f, text_f_c, num_steps=10, cfg_strength=4.5, noise_level=0.7, keep_steps=None,
            step_noise=None, generator=None):
    """SDE sampling from noise (B, N, C), eps from step_noise (B, num_steps, N, C) or `generator`. Keeps T = keep_steps
    (default all) steps, latents (B, T + 1, N, C), log_probs (B, T) fp32, timesteps (B, T + 1), and sample (B, N, C)."""
    B, T = noise.shape[0], num_steps if keep_steps is None else keep_steps
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
        chain.append(x_next)
        log_probs.append(log_prob)
    return {"latents": torch.stack(chain[:T + 1], 1), "log_probs": torch.stack(log_probs, 1)[:, :T],
            "timesteps": grid[:T + 1].expand(B, -1).contiguous(), "sample": x}


def step_log_prob(model, batch, j, cfg_strength=4.5, noise_level=0.7):
    """Re-score stored step j of `batch` (a rollout plus text_f, text_f_c): log_prob (B,), mean (B, N, C), sigma_t."""
    x, x_next = batch["latents"][:, j], batch["latents"][:, j + 1]  # (B, N, C)
    t, t_next = batch["timesteps"][:, j], batch["timesteps"][:, j + 1]  # (B,)
    neg_f, neg_f_c = _unconditional(model, x.shape[0], batch["text_f"], batch["text_f_c"])
    dtype = batch["text_f"].dtype
    v = guided_velocity(model, x.to(dtype), t.to(dtype), batch["text_f"], batch["text_f_c"], neg_f, neg_f_c,
                        cfg_strength)
    _, log_prob, mean, std = sde_step_with_logprob(x, v, t, t_next, noise_level, prev_sample=x_next)
    return log_prob, mean, std


def train_step(model, ref_model, optimizer, batches, cfg: GRPOConfig, micro_batch=0, autocast=None):
    """One update from `batches` (rollouts plus text_f, text_f_c, advantages (B,)): the loss averaged over them x the
    trained steps; micro_batch > 0: clips per backward (same gradient). Returns mean stats, loss, grad_norm (floats)."""
    T, jobs, totals = cfg.num_train_steps, [], {}
    for batch in batches:  # (minibatch, step, micro-batch) per backward
        B = len(batch["advantages"])
        size = micro_batch if 0 < micro_batch < B else B
        jobs += [(batch, j, slice(i, i + size)) for j in range(T) for i in range(0, B, size)]
    optimizer.zero_grad(set_to_none=True)
    for n, (batch, j, sl) in enumerate(jobs):
        part = {k: v[sl] for k, v in batch.items()}
        weight = len(part["advantages"]) / len(batch["advantages"]) / (T * len(batches))
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
    grad_norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
    if torch.isfinite(grad_norm):  # a NaN or inf gradient changes no weight (it shows as grad_norm in the log)
        optimizer.step()
    return {**totals, "grad_norm": grad_norm.item()}


# ---------------------------------------------------------------- LoRA (the lean reference model)

LORA_TARGETS = ("attn.qkv", "linear1", "ffn.w1", "ffn.w2", "ffn.w3")  # attention and MLP projections


class LoRA(nn.Module):
    """base(x) + (alpha / rank) up(down(x)) (arXiv 2106.09685), `down` a Linear or a conv like the frozen base's; up
    starts at zero. enabled = False: exactly the base, the KL's reference."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        assert rank >= 1 and (isinstance(base, nn.Linear) or type(base).__name__ == "Conv1dNLC"), (rank, base)
        if isinstance(base, nn.Linear):
            down = nn.Linear(base.in_features, rank, bias=False)
        else:
            down = type(base)(base.in_channels, rank, base.kernel_size[0], padding=base.padding[0], bias=False)
        self.base = base.requires_grad_(False)
        self.lora_down, self.lora_up = down, nn.Linear(rank, base.weight.shape[0], bias=False)
        nn.init.zeros_(self.lora_up.weight)
        self.scale, self.enabled = alpha / rank, True

    def forward(self, x):
        y = self.base(x)
        return y + self.scale * self.lora_up(self.lora_down(x)) if self.enabled else y

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:  # the update in the base weight's layout
        up, down = self.lora_up.weight, self.lora_down.weight  # (out, r), (r, in) or (r, in, k)
        return self.scale * torch.einsum("or,r...->o...", up, down)


def apply_lora(model: nn.Module, rank: int = 32, alpha: float = 64.0, targets=LORA_TARGETS) -> list:
    """Freeze `model`, wrap each module named `targets` in LoRA (rank 32, alpha 64 as released); returns its weights."""
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
    """Run `model` as its frozen base, every LoRA switched off (a no-op without LoRA)."""
    loras = [m for m in model.modules() if isinstance(m, LoRA)]
    for m in loras:
        m.enabled = False
    try:
        yield
    finally:
        for m in loras:
            m.enabled = True


def lora_state_dict(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if ".lora_down." in k or ".lora_up." in k}


def merged_state_dict(model) -> dict:
    """State dict with every LoRA folded into its base weight, under the unwrapped model's keys."""
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
    """Caption ids (world_size * sample_batch_size,) of rollout batch `batch`, seeded by (seed, epoch, batch): whole
    groups, shuffled across processes (as released); rank r takes slice r. Raises ValueError if too few captions."""
    G = world_size * cfg.sample_batch_size
    m = G // cfg.group_size
    if m > n_prompts:
        raise ValueError(f"a rollout batch needs {m} distinct captions but the prompt list has {n_prompts}; "
                         f"lower sample_batch_size or raise group_size")
    g = seeded_generator(seed, 'prompts', epoch, batch)
    ids = torch.randperm(n_prompts, generator=g)[:m].repeat_interleave(cfg.group_size)
    return ids[torch.randperm(G, generator=g)]


def draw_noise(seed, epoch, sample_index, num_steps, latent_shape) -> torch.Tensor:
    """(B, num_steps + 1, N, C): starting noise and SDE eps, seeded by (seed, epoch, global sample index)."""
    return torch.stack([torch.randn(num_steps + 1, *latent_shape, generator=seeded_generator(seed, 'noise', epoch, i))
                        for i in sample_index.tolist()])


def rollout_noise(seed, epoch, batch, prompt_ids, cfg: GRPOConfig, latent_shape, rank=0, world_size=1):
    """draw_noise of this rank's clips of rollout batch `batch`; with cfg.same_noise (flow_grpo's same_latent) a
    caption's clips share their starting noise, seeded by (seed, epoch, batch, caption id), not their SDE eps."""
    per = cfg.sample_batch_size
    noise = draw_noise(seed, epoch, batch * world_size * per + rank * per + torch.arange(per), cfg.num_steps,
                       latent_shape)
    if cfg.same_noise:
        noise[:, 0] = torch.stack([torch.randn(latent_shape, generator=seeded_generator(seed, 'group', epoch, batch, i))
                                   for i in prompt_ids.tolist()])
    return noise


def sample_epoch(policy, pipe, reward_fn, text, prompts, cfg: GRPOConfig, epoch, seed, latent_shape, rank=0,
                 world_size=1, autocast=None):
    """This rank's rollouts of an epoch, B = num_batches_per_epoch * sample_batch_size: latents (B, T + 1, N, C),
    log_probs (B, T), timesteps (B, T + 1), prompt_ids (B,) and rewards (B,) of reward_fn(audio, rate, captions)."""
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


def gather_advantages(rewards, prompt_ids, cfg: GRPOConfig, rank=0):
    """This rank's advantages (B,) over all processes' rewards; global reward_mean, reward_std, zero_std_share."""
    all_rewards, ids = all_gather(rewards.float()), all_gather(prompt_ids).tolist()
    advantages = compute_advantages(all_rewards, ids, std=cfg.advantage_std, clip=cfg.adv_clip_max)
    B = rewards.shape[0]
    stats = {"reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std(correction=0).item(),
             "zero_std_share": zero_std_fraction(all_rewards, ids)}
    return advantages[rank * B:(rank + 1) * B], stats


def train_epoch(model, ref_model, optimizer, samples, text, prompts, cfg: GRPOConfig, generator, micro_batch=0,
                autocast=None):
    """Drop zero-signal samples, shuffle into minibatches, a train_step per grad_accum_steps; returns their stats."""
    mask = informative_mask(samples["advantages"], cfg.num_batches_per_epoch, generator)
    kept = {k: samples[k][mask] for k in ("latents", "log_probs", "timesteps", "prompt_ids", "advantages")}
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
    """Mean reward of Euler (CFG) samples of `prompts` over all processes; prompt i's noise is seeded by (seed, i)."""
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
        total += torch.tensor([rewards.double().sum().item(), len(idx)], dtype=torch.float64, device=device)
    if is_distributed():
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


# ---------------------------------------------------------------- memory arithmetic

GiB = 2**30

# The other models of the released GRPO run, resident on every GPU: (parameters, bytes per parameter).
RELEASED_FROZEN = {
    "text encoder flan-t5-large encoder (fp32)": (341_231_104, 4),
    "VAE v1-44 (fp32)": (305_479_938, 4),  # fixtures/manifest_vae_44k.json
    "vocoder BigVGAN v2 44k (fp32)": (122_187_145, 4),  # fixtures/manifest_bigvgan_v2_44khz_128band_512x.json
    "reward Qwen2.5-Omni-7B thinker (bf16)": (8_931_813_888, 2),  # approximate: LLM 7.6 B + audio/vision encoders
}


def saved_bytes_per_token(hidden_dim, num_heads, mlp_ratio=4.0, dtype=torch.bfloat16) -> float:
    """Bytes per token an audio-stream block saves for backward (not weights), measured with saved-tensor hooks on the
    CPU, whose attention kernel, like CUDA's fused ones, saves no attention matrix; bfloat16 = under autocast."""
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
                    checkpointing=False, micro_batch=0, dtype=torch.bfloat16, frozen=RELEASED_FROZEN) -> dict:
    """Peak GPU memory of one GRPO process's training step, GiB by part and "total". lora_rank 0: full fine-tuning with
    an fp32 reference copy; micro_batch: clips per backward; frozen: {name: (parameters, bytes each)} of the other
    resident models. Excludes fragmentation and the rollout, decoding and reward transients (freed before training)."""
    from transformer import Resonate
    N = latent_frames or model_cfg.latent_seq_len
    with torch.device("meta"):
        model = Resonate(model_cfg)
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

