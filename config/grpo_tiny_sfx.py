# Flow-GRPO on a CPU: the tiny_sfx model (config/tiny_sfx.py) learns a signal-level reward in about five minutes.
# The reward, -|level - (-15 dBFS)|, asks for louder clips than the tutorial's model renders through Griffin-Lim
# (about -31 dBFS); if the epoch-0 held-out reward is already near 0, pick another target_db.
# Every held-out caption (the manifest's 'val' rows, never trained on) is scored every 20 epochs, two noise seeds.
# $ python train.py config/grpo_tiny_sfx.py --init_from=DIR/ckpt.pt --manifest=PATH --out_dir=DIR_GRPO
# $ python sample.py "footsteps on gravel" --ckpt=DIR_GRPO/grpo.pt --duration=2 --out=FILE.wav
# Measured figures: the README, Flow-GRPO section.
# Differences from the released recipe, for two CPU cores: groups of 4 clips and 4 captions per rollout batch,
# training on the first 3 of 10 SDE steps, one update per epoch and a 5x learning rate for the small model. With so
# few clips per update, two variance cuts matter: a group's clips share their starting noise (same_noise) and
# advantages are scaled by their group's std (per_prompt); the README has the runs with and without them.
stage = 'grpo'
device = 'cpu'
reward = {'loudness': {'target_db': -15.0}}
grpo_group_size = 4
grpo_sample_batch_size = 16  # 4 captions x 4 clips
grpo_num_batches_per_epoch = 1
grpo_grad_accum_steps = 1
grpo_timestep_fraction = 0.3
grpo_same_noise = True
grpo_advantage_std = 'per_prompt'
grpo_lr = 5e-4
grpo_checkpointing = False  # memory is plentiful here; checkpointing would cost one more forward per step
grpo_epochs = 80
grpo_eval_interval = 20
grpo_eval_seeds = 2
grpo_eval_steps = 10
