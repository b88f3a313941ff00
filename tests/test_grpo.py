"""Flow-GRPO pieces against the released implementation's numbers (tests/fixtures) and on a toy policy."""

import copy
from pathlib import Path

import pytest
import torch

from flow import sde_step_with_logprob
from grpo import (GRPOConfig, compute_advantages, grpo_loss, informative_mask, rollout, step_log_prob, train_step,
                  zero_std_fraction)

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-5


def load(name):
    return torch.load(FIXTURES / name, weights_only=True)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------- advantages and loss

@pytest.fixture(scope="module")
def loss_fx():
    return load("grpo_loss_a.pt")


@pytest.mark.parametrize("std", ["global", "per_prompt"])
def test_advantages_match_released(loss_fx, std):
    adv = compute_advantages(loss_fx["rewards"], loss_fx["prompts"], std=std, clip=loss_fx["adv_clip_max"])
    assert max_err(adv, loss_fx[f"advantages_{std}_std"]) < TOL


def test_advantages_are_clipped_and_zero_for_flat_groups():
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    prompts = ["a", "a", "a", "a", "b", "b"]
    adv = compute_advantages(rewards, prompts, std="per_prompt", clip=1.5)
    assert adv[3] == 1.5 and adv[:3].min() >= -1.5  # group a: (1 - 0.25) / (0.433 + 1e-4) = 1.73 -> clipped
    assert torch.equal(adv[4:], torch.zeros(2))
    with pytest.raises(ValueError, match="std must be"):
        compute_advantages(rewards, prompts, std="batch")
    with pytest.raises(ValueError, match="one prompt each"):
        compute_advantages(rewards, prompts[:5])


def test_zero_std_groups_are_counted_and_masked():
    rewards = torch.tensor([1.0, 1.0, 0.2, 0.7, 0.3, 0.3, 0.9, 0.1])
    prompts = ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert zero_std_fraction(rewards, prompts) == 0.5
    mask = informative_mask(rewards, prompts)
    assert mask.tolist() == [False, False, True, True, False, False, True, True]
    padded = informative_mask(rewards, prompts, multiple_of=3, generator=torch.Generator().manual_seed(0))
    assert int(padded.sum()) == 6 and padded[mask].all()


def test_grpo_loss_matches_released(loss_fx):
    f = loss_fx
    loss, stats = grpo_loss(f["log_prob"], f["old_log_prob"], f["advantages_global_std"], f["prev_sample_mean"],
                            f["prev_sample_mean_ref"], f["std_dev_t"], clip_range=f["clip_range"], beta=f["beta"])
    assert max_err(loss, f["loss"]) < TOL
    for name in ("policy_loss", "kl_loss", "approx_kl", "clipfrac"):
        assert max_err(stats[name], f[name]) < TOL, name


def test_grpo_loss_needs_reference_for_kl(loss_fx):
    f = loss_fx
    with pytest.raises(ValueError, match="beta > 0"):
        grpo_loss(f["log_prob"], f["old_log_prob"], f["advantages_global_std"])
    loss, stats = grpo_loss(f["log_prob"], f["old_log_prob"], f["advantages_global_std"], beta=0.0)
    assert stats["kl_loss"] == 0 and loss == stats["policy_loss"]


def test_clip_stops_gradient_once_ratio_left_the_trust_region():
    # Positive advantage and a ratio already above 1 + clip: PPO takes the clipped, constant branch.
    log_prob = torch.tensor([0.01, 0.01], requires_grad=True)
    old = torch.zeros(2)
    loss, stats = grpo_loss(log_prob, old, torch.tensor([1.0, -1.0]), clip_range=1e-4, beta=0.0)
    loss.backward()
    assert log_prob.grad[0] == 0 and log_prob.grad[1] != 0  # the negative sample is still pushed down
    assert stats["clipfrac"] == 1.0


def test_released_defaults():
    cfg = GRPOConfig()
    assert (cfg.num_steps, cfg.noise_level, cfg.cfg_strength, cfg.group_size) == (10, 0.7, 4.5, 24)
    assert cfg.num_train_steps == 9
    assert (cfg.clip_range, cfg.beta, cfg.adv_clip_max, cfg.lr, cfg.betas) == (1e-4, 0.04, 5.0, 1e-4, (0.9, 0.999))


# ---------------------------------------------------------------- toy policy

def test_one_grpo_step_moves_log_probs_with_the_advantage():
    """A linear velocity model; two stored transitions with advantages +1 and -1; one SGD step.

    The two latents are orthogonal one-hot vectors, so each transition's log-prob depends on a different column
    of the weight: the gradient of one does not interfere with the other and the signs are guaranteed to first
    order. clip_range=1.0: the gradient is taken at ratio ~= 1 (same weights as the rollout), but the recomputed
    log-prob may differ from the stored one by float noise; with the released 1e-4 a ratio just outside the
    range on the advantage's side would select the clipped, constant branch and zero the gradient (see the
    test above). beta=0: the reference equals the policy here, so the KL term would add nothing anyway.
    """
    torch.manual_seed(0)
    C = 4
    policy = torch.nn.Linear(C, C, bias=False)
    x = torch.eye(C)[:2].unsqueeze(1)  # (2, 1, C): two orthogonal latents
    t, t_next = 0.8, 0.7

    def log_prob_of(next_x):
        return sde_step_with_logprob(x, policy(x), t, t_next, prev_sample=next_x)[1]

    with torch.no_grad():
        next_x, old_log_prob, _, _ = sde_step_with_logprob(x, policy(x), t, t_next,
                                                           generator=torch.Generator().manual_seed(1))
    advantages = torch.tensor([1.0, -1.0])
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    loss, _ = grpo_loss(log_prob_of(next_x), old_log_prob, advantages, clip_range=1.0, beta=0.0)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        new_log_prob = log_prob_of(next_x)
    assert new_log_prob[0] > old_log_prob[0]
    assert new_log_prob[1] < old_log_prob[1]


# ---------------------------------------------------------------- rollout and update with a toy velocity model

class ToyVelocity(torch.nn.Module):
    """model(latent (B, N, C), text_f (B, L, Dt), text_f_c (B, Dc), t (B,)) -> velocity, with empty conditions."""
    def __init__(self, C=4, Dt=3):
        super().__init__()
        self.latent = torch.nn.Linear(C, C)
        self.text = torch.nn.Linear(Dt, C)
        self.register_buffer("empty_f", torch.zeros(1, 5, Dt))
        self.register_buffer("empty_f_c", torch.zeros(1, Dt))

    def empty_conditions(self, B):
        return self.empty_f.expand(B, -1, -1), self.empty_f_c.expand(B, -1)

    def forward(self, latent, text_f, text_f_c, t):
        return self.latent(latent) + self.text(text_f_c)[:, None] * t[:, None, None]


def toy_rollout(model, B=4, steps=4):
    g = torch.Generator().manual_seed(0)
    text_f, text_f_c = torch.randn(B, 5, 3, generator=g), torch.randn(B, 3, generator=g)
    out = rollout(model, torch.randn(B, 6, 4, generator=g), text_f, text_f_c, num_steps=steps, generator=g)
    return {**out, "text_f": text_f, "text_f_c": text_f_c}


def test_rollout_keeps_steps_that_rescore_to_their_log_probs():
    torch.manual_seed(0)
    model = ToyVelocity()
    batch = toy_rollout(model)
    assert batch["latents"].shape == (4, 4, 6, 4) and batch["log_probs"].shape == (4, 4)
    assert batch["timesteps"].shape == (4, 5) and batch["timesteps"][0, 0] == 1 and batch["timesteps"][0, -1] == 0
    assert torch.equal(batch["latents"][:, 1:], batch["next_latents"][:, :-1])  # consecutive steps chain
    with torch.no_grad():
        for j in range(4):
            log_prob, _, _ = step_log_prob(model, batch, j)
            assert max_err(log_prob, batch["log_probs"][:, j]) < TOL


def test_train_step_updates_the_policy_and_reports_diagnostics():
    torch.manual_seed(0)
    model = ToyVelocity()
    ref = copy.deepcopy(model).requires_grad_(False)
    batch = {**toy_rollout(model), "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5])}
    cfg = GRPOConfig(num_steps=4, timestep_fraction=0.99, lr=1e-2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    before = copy.deepcopy(model.state_dict())
    stats = train_step(model, ref, optimizer, [batch], cfg)
    assert set(stats) >= {"loss", "policy_loss", "kl_loss", "approx_kl", "clipfrac", "grad_norm"}
    assert stats["kl_loss"] == 0 and stats["grad_norm"] > 0  # first update: policy == reference
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    stats = train_step(model, ref, optimizer, [batch], cfg)
    assert stats["kl_loss"] > 0 and stats["approx_kl"] > 0  # the policy has moved away from the rollout weights
