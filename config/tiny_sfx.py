# A CPU recipe: a small VAE and a small transformer at 16 kHz, trained on a few hundred captioned sound effects
# (e.g. the sfx manifest), about 30 minutes in all on 2 cores. Text: the bundled all-MiniLM-L6-v2 encoder.
# $ python train.py config/tiny_sfx.py --stage=vae --manifest=PATH --out_dir=DIR
# $ python train.py config/tiny_sfx.py --stage=pretrain --manifest=PATH --out_dir=DIR
# $ python sample.py "footsteps on gravel" --ckpt=DIR/ckpt.pt --out=FILE.wav --duration=2
mel = '16k'
vae = 'small'
model = 'small'
text_encoder = 'minilm'
device = 'cpu'
batch_size = 16
log_interval = 25
eval_batches = 3
ema_decay = 0.0
if stage == 'vae':
    clip_seconds = 1.0  # the VAE is convolutional: short crops train it as well, at half the cost
    max_iters = 1500
    learning_rate = 1e-2  # magnitude-preserving (EDM2) layers want a large Adam step
    warmup_iters = 50
    eval_interval = 300
else:
    clip_seconds = 2.0  # most clips are under a second; shorter ones are zero-padded
    max_iters = 3000
    learning_rate = 5e-4
    warmup_iters = 100
    eval_interval = 500
