# Flow-GRPO on a CPU: the tiny_sfx model (config/tiny_sfx.py) learns a signal-level reward in about ten minutes.
# The reward, -|level - (-25 dBFS)|, asks for louder clips than a briefly pretrained model renders through
# Griffin-Lim (about -43 dBFS); if the epoch-0 held-out reward is already near 0, pick another target_db.
# Held-out captions (the manifest's 'val' rows, never trained on) are scored before and after, two seeds each.
# Measured (2 shared cores, 200-step pretrained model): held-out reward -17.9 -> -0.9 (seed 1337) and
# -18.6 -> -4.1 (--seed=7); spread between the two evaluation seeds of one checkpoint 0.3 to 5.9; KL <= 0.032.
# $ python train.py config/grpo_tiny_sfx.py --init_from=DIR/ckpt.pt --manifest=PATH --out_dir=DIR_GRPO
# $ python sample.py "footsteps on gravel" --ckpt=DIR_GRPO/grpo.pt --duration=2 --out=FILE.wav
# Differences from the released recipe, for two shared CPU cores: groups of 8 and one caption per rollout batch,
# training on the first 3 of 10 SDE steps, one update per epoch and a 10x learning rate for the small model.
stage = 'grpo'
device = 'cpu'
reward = {'loudness': {'target_db': -25.0}}
grpo_group_size = 8
grpo_sample_batch_size = 8
grpo_num_batches_per_epoch = 1
grpo_grad_accum_steps = 1
grpo_timestep_fraction = 0.3
grpo_lr = 1e-3
grpo_checkpointing = False  # memory is plentiful here; checkpointing would cost one more forward per step
grpo_epochs = 15
grpo_eval_interval = 15
grpo_eval_prompts = 24
grpo_eval_seeds = 2
grpo_eval_steps = 10
