"""Flow-GRPO pieces against the released implementation's numbers (tests/fixtures) and on a toy policy."""

import copy
import math
from pathlib import Path

import pytest
import torch

from flow import sde_step_with_logprob
from grpo import (GRPOConfig, LoRA, adapters_disabled, apply_lora, compute_advantages, draw_noise, draw_prompt_ids,
                  rollout_noise,
                  grpo_loss, informative_mask, memory_estimate, merged_state_dict, rollout, saved_bytes_per_token,
                  step_log_prob, train_step, zero_std_fraction)
from transformer import MODELS, Resonate

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
    with pytest.raises(ValueError, match="advantage_std must be 'global' or 'per_prompt', got 'batch'"):
        GRPOConfig(advantage_std="batch").check()  # --grpo_advantage_std, refused before any work


def test_zero_std_groups_are_counted_and_masked():
    rewards = torch.tensor([1.0, 1.0, 0.2, 0.7, 0.3, 0.3, 0.9, 0.1])
    prompts = ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert zero_std_fraction(rewards, prompts) == 0.5
    advantages = compute_advantages(rewards, prompts)
    mask = informative_mask(advantages)
    assert mask.tolist() == [False, False, True, True, False, False, True, True]
    padded = informative_mask(advantages, multiple_of=3, generator=torch.Generator().manual_seed(0))
    assert int(padded.sum()) == 6 and padded[mask].all()
    # no signal anywhere: still multiple_of samples, so every DDP process takes the same number of steps
    assert int(informative_mask(torch.zeros(8), multiple_of=4).sum()) == 4


def test_grpo_loss_matches_released(loss_fx):
    f = loss_fx
    loss, stats = grpo_loss(f["log_prob"], f["old_log_prob"], f["advantages_global_std"], f["prev_sample_mean"],
                            f["prev_sample_mean_ref"], f["std_dev_t"], clip_range=f["clip_range"], beta=f["beta"])
    assert max_err(loss, f["loss"]) < TOL
    for name in ("policy_loss", "kl_loss", "approx_kl", "clipfrac"):
        assert max_err(stats[name], f[name]) < TOL, name


def test_grpo_loss_without_kl_is_the_policy_loss(loss_fx):
    f = loss_fx
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
    assert batch["latents"].shape == (4, 5, 6, 4) and batch["log_probs"].shape == (4, 4)  # the chain x_0 .. x_4
    assert batch["timesteps"].shape == (4, 5) and batch["timesteps"][0, 0] == 1 and batch["timesteps"][0, -1] == 0
    assert torch.equal(batch["latents"][:, -1], batch["sample"])
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


def test_a_nonfinite_gradient_changes_no_weight():
    torch.manual_seed(0)
    model = ToyVelocity()
    batch = {**toy_rollout(model), "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]) * float("nan")}
    cfg = GRPOConfig(num_steps=4, lr=1e-2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    before = copy.deepcopy(model.state_dict())
    stats = train_step(model, copy.deepcopy(model).requires_grad_(False), optimizer, [batch], cfg)
    assert math.isnan(stats["grad_norm"]) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("field, value", [("group_size", 0), ("group_size", 1), ("num_steps", 0),
                                          ("noise_level", -1.0),
                                          ("clip_range", 0.0), ("beta", -0.1), ("num_inner_epochs", 0)])
def test_grpo_settings_out_of_range_are_named(field, value):
    with pytest.raises(ValueError, match=f"out of range: {field}={value}"):
        GRPOConfig(**{field: value}).check()


def test_rollout_stores_only_the_trained_steps_and_replays_given_noise():
    torch.manual_seed(0)
    model = ToyVelocity()
    g = torch.Generator().manual_seed(1)
    noise, step_noise = torch.randn(3, 6, 4, generator=g), torch.randn(3, 4, 6, 4, generator=g)
    text_f, text_f_c = torch.randn(3, 5, 3, generator=g), torch.randn(3, 3, generator=g)
    full = rollout(model, noise, text_f, text_f_c, num_steps=4, step_noise=step_noise)
    part = rollout(model, noise, text_f, text_f_c, num_steps=4, step_noise=step_noise, keep_steps=2)
    assert part["latents"].shape == (3, 3, 6, 4) and part["log_probs"].shape == (3, 2)
    assert part["timesteps"].shape == (3, 3)
    assert torch.equal(part["latents"], full["latents"][:, :3]) and torch.equal(part["sample"], full["sample"])


def test_micro_batches_give_the_same_update():
    torch.manual_seed(0)
    model = ToyVelocity()
    batch = {**toy_rollout(model), "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5])}
    cfg = GRPOConfig(num_steps=4, clip_range=1.0)
    after = []
    for micro in (0, 1, 3):
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.latent.weight.add_(0.05)  # policy != reference, so the KL term has a gradient too
        stats = train_step(m, model, torch.optim.SGD(m.parameters(), lr=1.0), [batch, batch], cfg, micro_batch=micro)
        after.append((torch.cat([p.flatten() for p in m.parameters()]), stats))
    for params, stats in after[1:]:
        assert max_err(params, after[0][0]) < 1e-6
        assert stats["kl_loss"] == pytest.approx(after[0][1]["kl_loss"], rel=1e-5)


def test_prompt_groups_and_noise_do_not_depend_on_the_process_split():
    cfg = GRPOConfig(group_size=4, sample_batch_size=6)
    ids = draw_prompt_ids(seed=0, epoch=3, batch=1, n_prompts=20, cfg=cfg, world_size=2)  # 12 clips, 3 captions
    assert sorted(torch.bincount(ids).tolist())[-3:] == [4, 4, 4]
    assert torch.equal(ids, draw_prompt_ids(0, 3, 1, 20, cfg, 2))
    both = draw_noise(0, 3, torch.arange(8), num_steps=2, latent_shape=(5, 2))
    assert both.shape == (8, 3, 5, 2)
    assert torch.equal(both[4:], draw_noise(0, 3, torch.arange(4, 8), 2, (5, 2)))
    with pytest.raises(ValueError, match="distinct captions"):
        draw_prompt_ids(0, 0, 0, n_prompts=2, cfg=cfg, world_size=2)
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=5, sample_batch_size=6).check(world_size=2)


@pytest.mark.parametrize("same_noise", [False, True])
def test_same_noise_shares_only_the_starting_noise_of_a_group(same_noise):
    cfg = GRPOConfig(group_size=3, sample_batch_size=3, num_steps=2, same_noise=same_noise)
    ids = draw_prompt_ids(seed=1, epoch=2, batch=1, n_prompts=9, cfg=cfg, world_size=2)  # 6 clips, 2 captions
    noise = torch.cat([rollout_noise(1, 2, 1, ids[r * 3:(r + 1) * 3], cfg, (5, 2), rank=r, world_size=2)
                       for r in range(2)])
    assert noise.shape == (6, 3, 5, 2)
    for i in range(6):
        for j in range(i + 1, 6):
            assert not torch.equal(noise[i, 1:], noise[j, 1:])  # each clip's SDE steps have their own eps
            assert torch.equal(noise[i, 0], noise[j, 0]) == (same_noise and ids[i] == ids[j])
    # one process holding the whole batch draws the same noise
    one = rollout_noise(1, 2, 1, ids, GRPOConfig(group_size=3, sample_batch_size=6, num_steps=2,
                                                    same_noise=same_noise), (5, 2))
    assert torch.equal(one, noise)


# ---------------------------------------------------------------- LoRA and memory

def tiny_resonate():
    torch.manual_seed(0)
    net = Resonate(MODELS["tiny"]())
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    inputs = (torch.randn(2, 24, 8), torch.randn(2, 77, 16), torch.randn(2, 12), torch.rand(2))
    return net, inputs


def test_lora_starts_at_the_base_merges_exactly_and_switches_off_for_the_reference():
    net, inputs = tiny_resonate()
    base_out = net(*inputs).detach()
    params = apply_lora(net, rank=4, alpha=8.0)
    loras = [m for m in net.modules() if isinstance(m, LoRA)]
    # qkv + proj + 3 MLP projections on both streams of 2 joint blocks (the last text stream has qkv only) and
    # on each of 2 single blocks
    assert len(loras) == 5 * 2 + 5 + 1 + 5 * 2
    assert {p for p in net.parameters() if p.requires_grad} == set(params)
    assert torch.allclose(net(*inputs), base_out, atol=1e-6)  # up starts at zero
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    adapted = net(*inputs).detach()
    assert (adapted - base_out).abs().max() > 1e-3
    with adapters_disabled(net):
        assert torch.allclose(net(*inputs), base_out, atol=1e-6)
    plain = Resonate(MODELS["tiny"]())
    plain.load_state_dict(merged_state_dict(net))  # strict: plain keys only
    assert max_err(plain(*inputs), adapted) < 1e-5


def test_memory_estimate_matches_measured_activations_and_ranks_the_options():
    """The activation arithmetic against saved-tensor bytes of a real forward (tiny model, fp32, one clip)."""
    net, (x, text_f, text_f_c, t) = tiny_resonate()
    cfg = GRPOConfig(sample_batch_size=1, cfg_strength=1.0)
    est = memory_estimate(net.cfg, cfg, latent_frames=24, dtype=torch.float32, frozen={})
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(x[:1], text_f[:1], text_f_c[:1], t[:1])
    measured = sum(seen.values()) / 2**30
    assert 0.7 < est["activations"] / measured < 1.3
    assert est["activation bytes per token per block"] == pytest.approx(saved_bytes_per_token(64, 2, 4.0,
                                                                                              torch.float32))
    full = memory_estimate(net.cfg, GRPOConfig(), frozen={})
    ckpt = memory_estimate(net.cfg, GRPOConfig(), checkpointing=True, frozen={})
    lora = memory_estimate(net.cfg, GRPOConfig(), checkpointing=True, lora_rank=4, frozen={})
    assert ckpt["activations"] < full["activations"] and ckpt["weights (fp32)"] == full["weights (fp32)"]
    assert lora["reference copy"] == 0 < full["reference copy"] and lora["AdamW states"] < full["AdamW states"]
