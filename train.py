"""
Train Resonate in stages: the mel VAE, flow-matching pretraining of the transformer, then Flow-GRPO.

$ python train.py config/tiny_sfx.py --stage=vae --manifest=PATH --out_dir=DIR
$ python train.py config/tiny_sfx.py --stage=pretrain --manifest=PATH --out_dir=DIR
$ torchrun --standalone --nproc_per_node=8 train.py --stage=pretrain --manifest=PATH  # DDP: NCCL on CUDA, gloo on CPU
Settings are the globals below, overridden by config/*.py files, then by --key=value.
"""
import glob
import hashlib
import math
import os
import sys
import time
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict, fields

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import grpo
from flow import flow_matching_loss, loss_by_t_bin
from grpo import GRPOConfig
from reward import build_reward
from sample import load_pipeline
from transformer import MODELS, Resonate, load_text_encoder
from vae import MEL_CONFIGS, VAES, MelSpectrogram, MelVAE, num_latent_frames

# -----------------------------------------------------------------------------
# defaults: the released recipe where it applies (arXiv 2603.11661 and its repository)
stage = 'pretrain'  # 'vae' | 'pretrain' | 'grpo'
out_dir = 'out'
manifest = ''  # JSONL manifest: audio_id, audio_path, caption, duration (+ optional split)
val_manifest = ''  # default: the manifest's rows with split == 'val'
resume = False  # continue from out_dir's checkpoint of this stage
overwrite = False  # replace out_dir's checkpoint of this stage; without it (or --resume) an existing one is an error
seed = 1337
# data
mel = '44k'  # mel front end, a key of vae.MEL_CONFIGS ('16k' or '44k')
clip_seconds = 10.0  # clips are randomly cropped or zero-padded to this length
# models
model = 'resonate_m_44k'  # a key of transformer.MODELS
vae = 'vae_44k'  # a key of vae.VAES (stage vae), otherwise read from vae_ckpt
vae_ckpt = ''  # pretrain/grpo: default out_dir/vae.pt
text_encoder = 'google/flan-t5-large'  # any Hugging Face encoder; 'minilm' = the bundled all-MiniLM-L6-v2
init_from = ''  # grpo: our ckpt.pt or the published Resonate_PT.pth
# optimisation
batch_size = 16  # per-process micro-batch
gradient_accumulation_steps = 1  # micro-steps per optimizer step (per process)
max_iters = 100_000
learning_rate = 1e-4
weight_decay = 1e-6
beta1, beta2 = 0.9, 0.95
warmup_iters = 1000
lr_decay_milestones = (0.8, 0.9)  # lr x0.1 at these fractions of max_iters (the released step schedule)
grad_clip = 1.0  # 0 disables
ema_decay = 0.0  # 0 disables; e.g. 0.999
cfg_dropout = 0.1  # probability of replacing the caption by the empty string (classifier-free guidance)
kl_weight = 1e-4  # stage vae
# logging, evaluation, checkpoints
log_interval = 10
eval_interval = 250
eval_batches = 4  # validation batches of batch_size, always the same clips, crops, t and noise
latent_stat_batches = 8  # pretrain: batches used to estimate the per-channel latent mean/std
# grpo: Flow-GRPO fine-tuning (--stage=grpo, from --init_from)
reward = 'qwen_omni'  # reward.build_reward spec: 'loudness:1.0,clap:0.5' or {'loudness': {'target_db': -14.0}}
prompt_file = ''  # training captions, one a line, or a JSONL manifest; default: --manifest's non-'val' captions
val_prompt_file = ''  # held-out captions (never trained on); default: the 'val' rows of --val_manifest/--manifest
grpo_epochs = 1000  # epochs; each = rollouts, rewards, then num_batches_per_epoch / grad_accum_steps updates
grpo_eval_interval = 100  # epochs between held-out reward evaluations and checkpoints (out_dir/grpo.pt)
grpo_eval_prompts = 64  # held-out captions scored per evaluation (0 = no evaluation)
grpo_eval_seeds = 1  # noise seeds per evaluation: the spread across seeds is the evaluation's own noise
grpo_eval_steps = 25  # Euler steps (NFE) of the held-out samples
grpo_micro_batch = 0  # clips per forward/backward in training (0 = whole minibatch); same gradient, less memory
grpo_checkpointing = True  # activation checkpointing of the transformer blocks in training (same gradient)
lora_rank = 0  # 0 = full fine-tuning with a frozen reference copy; r > 0 = LoRA (the base is the reference)
lora_alpha = 64.0
weights_dir = ''  # grpo from published weights: folder holding the VAE, vocoder (and flan-t5-large) files
# and --grpo_<field> for every field of grpo.GRPOConfig (e.g. --grpo_group_size=4), defaulting to the released run
globals().update({f'grpo_{f.name}': f.default for f in fields(GRPOConfig)})
# system
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:0' | 'mps'
dtype = 'fp32'  # 'fp32' | 'bf16' (autocast); fp16 would need loss scaling
compile = False  # torch.compile the model
# -----------------------------------------------------------------------------
config_keys = data.setting_names(globals())  # what --key=value may set, and what checkpoints record
CHECKPOINTS = {'vae': ('vae.pt',), 'pretrain': ('ckpt.pt',), 'grpo': ('grpo.pt', 'grpo_transformer.pth')}
MAX_BAD_STEPS = 10  # consecutive steps with a non-finite gradient that end a run: it diverged, not one bad batch
MASTER = int(os.environ.get('RANK', 0)) == 0  # rank 0, or the only process: it logs and writes
_last_checkpoint = ''  # the newest checkpoint this run wrote or resumed from, for the message on Ctrl-C


def get_lr(it):
    """Linear warm-up, then the released step decay (x0.1 at each milestone fraction of max_iters)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    return learning_rate * 0.1 ** sum(it >= m * max_iters for m in lr_decay_milestones)


def refuse(problems, prefix=''):
    for bad, message in problems:
        if bad:
            raise ValueError(prefix + message)


def save_checkpoint(obj, path):
    """Write `obj` to `path` atomically: a crash while saving keeps the previous file. Raises FloatingPointError,
    writing nothing, when a tensor in `obj` holds NaN or inf, and OSError naming `path` when it cannot be written."""
    if bad := nonfinite(obj):
        raise FloatingPointError(f'not saving {path}: NaN or inf in {len(bad)} tensors ({", ".join(bad[:3])}'
                                 f'{", ..." * (len(bad) > 3)}); the previous checkpoint is kept')
    try:
        data.write_atomic(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as e:  # a full disk (torch.save raises RuntimeError), a folder removed
        raise OSError(f'could not write {path} ({e}); the previous checkpoint there, if any, is kept') from None


def nonfinite(obj, name=''):
    if torch.is_tensor(obj):
        return [name] if obj.is_floating_point() and not torch.isfinite(obj).all() else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [n for k, v in items for n in nonfinite(v, f'{name}.{k}' if name else str(k))]


def save_run(path, step, optimizer, extra, **weights):
    global _last_checkpoint
    save_checkpoint({**weights, 'optimizer': optimizer.state_dict(), 'step': step, 'rng_state': torch.get_rng_state(),
                     'config': {k: globals()[k] for k in config_keys}, **extra}, path)
    _last_checkpoint = f'{path} (step {step})'
    print(f'saved {_last_checkpoint}')


def load_checkpoint(path, what, keys):
    """A train.py checkpoint; raises FileNotFoundError or ValueError naming `path` (and `what` it should be)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'{what} {path!r} does not exist; train it first or give its path (see README)')
    ckpt = data.read_weights(path)
    missing = [k for k in keys if k not in ckpt]
    refuse([(missing, f'{path} is not a {what} written by train.py (it has no {", ".join(missing)})')])
    return ckpt


def fingerprint(state):
    """A short hash of a state dict's names, shapes and values: which weights a run was trained on."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f'{k}{tuple(v.shape)}{v.dtype}'.encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def open_resumed(path, extra, key, setting):
    """The checkpoint --resume continues; raises ValueError naming `path` and the fix when it was trained from other
    weights, VAE or text encoder than this run (`extra`), or its `key` ('ema', 'lora') disagrees with --`setting`."""
    global _last_checkpoint
    ckpt = load_checkpoint(path, '--resume checkpoint', ('model', 'optimizer', 'step', 'config', key))
    old, new = ckpt.get('init_fingerprint'), extra.get('init_fingerprint')
    vae_old, vae_new = (fingerprint(c['vae']) if 'vae' in ckpt and 'vae' in extra else '' for c in (ckpt, extra))
    vae_source = f'--init_from={init_from}' if stage == 'grpo' else vae_ckpt or os.path.join(out_dir, 'vae.pt')
    text_old, text_new = ckpt.get('text_encoder', extra.get('text_encoder')), extra.get('text_encoder')
    refuse([(old and old != new, f'was fine-tuned from other starting weights than --init_from='
             f'{init_from or "Resonate_PT.pth"!r} (fingerprints {old} and {new}); resume with its --init_from'),
            (vae_old != vae_new, f'was trained on another VAE (fingerprint {vae_old}) than the one in {vae_source} '
             f'({vae_new}); give the one it was trained on (--vae_ckpt), or start a new --out_dir'),
            (text_old != text_new, f'was trained with --text_encoder={text_old!r}, not {text_new!r}; resume with '
             'that, or start a new --out_dir'),
            (bool(globals()[setting]) != (ckpt[key] is not None), f'was written with --{setting}='
             f'{ckpt["config"][setting]!r}; resume with that (or use a new --out_dir)')], prefix=f'--resume: {path} ')
    _last_checkpoint = f'{path} (step {ckpt["step"]})'
    if MASTER:
        print(f'resumed from {_last_checkpoint}')
    return ckpt


def load_resumed(ckpt, path, optimizer, *weights):
    """Load --resume's (module, state) pairs, then the optimizer; raises ValueError naming the settings that differ."""
    try:
        for module, state in weights:
            if module is not None:
                module.load_state_dict(state)
    except RuntimeError as e:
        saved = ckpt['config']
        diff = [f'{k}={saved[k]!r} (now {globals()[k]!r})' for k in ('mel', 'vae', 'model', 'text_encoder', 'lora_rank')
                if k in saved and saved[k] != globals()[k]]  # the settings that shape the weights
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e)).rstrip('.')[:160]
        raise ValueError(f'--resume: the weights in {path} do not fit this model ({first}); it was written with '
                         f'{", ".join(diff) or "the same model settings"}. Resume with those or use a new --out_dir'
                         ) from None
    optimizer.load_state_dict(ckpt['optimizer'])  # after the weights: their errors name the settings


# -----------------------------------------------------------------------------
# the pieces each stage is built from

class Setup:
    """The process layout (DDP or not), device, autocast context and seeds, derived once from the globals."""

    def __init__(self):
        self.rank, self.world_size, self.device = data.init_distributed(device)
        self.ddp, self.master = data.is_distributed(), MASTER
        self.autocast = torch.autocast(self.device.type, dtype=data.DTYPES[dtype]) if dtype != 'fp32' else nullcontext()
        data.warn_if_slow_bf16(str(self.device), dtype)
        self.global_batch = batch_size * gradient_accumulation_steps * self.world_size
        torch.manual_seed(seed + self.rank)  # anything not drawn by draw_step differs per rank
        if self.master:
            batch = ('' if stage == 'grpo' else f'; micro-batch {batch_size} x {gradient_accumulation_steps} '
                     f'accumulation x {self.world_size} = global batch {self.global_batch}')
            print(f'{stage}: {self.world_size} process(es) on {self.device}, {dtype}{batch}')

    def my_slice(self, micro_step):
        start = (micro_step * self.world_size + self.rank) * batch_size
        return slice(start, start + batch_size)

    def mean_across_ranks(self, x):
        return data.all_gather(x[None]).mean(0)  # x itself in one process

    def union_across_ranks(self, items: set) -> set:
        return set().union(*data.all_gather_objects(items))


def draw_step(step, n_clips, n, latent_shape, salt=0):
    """Every random number of one step, {name: (n, ...)}, for the whole global batch from a generator seeded by (seed,
    step, salt): each rank takes its slice, so a resumed or re-split run takes the same steps. latent_shape: (E, N)."""
    g = data.seeded_generator(seed, 'step', step, salt)
    return {'index': torch.randint(n_clips, (n,), generator=g),
            'crop': torch.rand(n, generator=g),  # where in a long clip the window starts, as a fraction
            'posterior_eps': torch.randn(n, *latent_shape, generator=g),  # z = mean + std * eps
            't': torch.sigmoid(torch.randn(n, generator=g)),  # t ~ sigmoid(N(0, 1)), t = 1 is noise
            'noise': torch.randn(n, *latent_shape, generator=g),
            'drop_text': torch.rand(n, generator=g) < cfg_dropout}


def load_data(sample_rate):
    """Train and validation clips of --manifest (validation: --val_manifest, else its 'val' rows, else every 20th)."""
    rows = data.read_manifest(manifest)
    train_rows = rows if val_manifest else [r for r in rows if r.get('split') != 'val']
    val_rows = data.read_manifest(val_manifest) if val_manifest else \
        [r for r in rows if r.get('split') == 'val'] or train_rows[::20]
    refuse([(not train_rows, f'no training rows in manifest {manifest}: all {len(rows)} are marked "split": "val"; '
             'mark some "train" (or give the held-out clips as --val_manifest)')])
    return [data.AudioCaptionDataset(r, sample_rate, clip_seconds) for r in (train_rows, val_rows)]


class Trainer:
    """What the stages share: optimizer, LR schedule, EMA, DDP, gradient accumulation, evaluation, checkpoints.
    `loss_fn(model, draws, dataset) -> (loss, logs)` takes this rank's slice of a step's draws; logs: a dict, or a
    function returning one (called on log steps only), whose tensors are averaged over ranks; its float values must
    already be means over the ranks."""

    def __init__(self, s, model, ckpt_name, extra_state, latent_shape, train_set, val_set):
        self.s, self.ckpt_path, self.extra_state = s, os.path.join(out_dir, ckpt_name), extra_state
        self.latent_shape, self.dataset, self.n_clips = latent_shape, train_set, len(train_set)
        self.val_set, self.val_draws = val_set, self.fixed_val_draws(len(val_set))
        self.raw = model.to(s.device)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
             {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],  # no decay on gains and biases
            lr=learning_rate, betas=(beta1, beta2))
        self.model = torch.compile(model) if compile else model
        if s.ddp:  # wrapping broadcasts rank 0's weights to every rank
            self.model = DDP(self.model, device_ids=[s.device.index] if s.device.type == 'cuda' else None)
        self.ema = deepcopy(model).requires_grad_(False) if ema_decay > 0 else None
        self.step, self.bad_steps = 0, 0
        if resume:
            self.restore()
        if s.master:
            print(f'{type(model).__name__}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters; '
                  f'{max_iters} steps, warm-up {warmup_iters}, lr {learning_rate:g}, EMA {ema_decay or "off"}')

    def restore(self):
        ckpt = open_resumed(self.ckpt_path, self.extra_state, 'ema', 'ema_decay')
        load_resumed(ckpt, self.ckpt_path, self.optimizer, (self.raw, ckpt['model']), (self.ema, ckpt['ema']))
        self.step = ckpt['step']
        torch.set_rng_state(ckpt['rng_state'])

    def save(self):
        if self.s.master:
            save_run(self.ckpt_path, self.step, self.optimizer, self.extra_state, model=self.raw.state_dict(),
                     ema=self.ema.state_dict() if self.ema is not None else None)

    def train(self, loss_fn):
        s, t0 = self.s, time.time()
        while self.step < max_iters:
            if self.step % eval_interval == 0:
                self.evaluate(loss_fn)
            draws = draw_step(self.step, self.n_clips, s.global_batch, self.latent_shape)
            loss, logs, norm = self.take_step(loss_fn, draws)
            self.step += 1
            if self.step * s.global_batch // self.n_clips > (self.step - 1) * s.global_batch // self.n_clips:
                self.end_epoch()
            if self.step % log_interval == 0:  # the last micro-step's loss and logs, over all ranks
                logs = {'loss': loss.detach(), **(logs() if callable(logs) else logs)}
                logs = {k: s.mean_across_ranks(v.float()).item() if torch.is_tensor(v) else v for k, v in logs.items()}
                dt, t0 = time.time() - t0, time.time()
                if s.master:
                    print(f'step {self.step}: ' + ' '.join(f'{k} {v:.4f}' for k, v in logs.items()) +
                          f' grad-norm {norm:.3f} lr {self.lr:.2e} {dt / log_interval * 1000:.0f} ms/step')
        self.evaluate(loss_fn)

    def take_step(self, loss_fn, draws):
        """One optimizer step on this rank's micro-batches of `draws`: the last one's loss and logs, the grad norm."""
        s, self.lr = self.s, get_lr(self.step)
        for group in self.optimizer.param_groups:
            group['lr'] = self.lr
        for micro in range(gradient_accumulation_steps):
            mine = {k: v[s.my_slice(micro)] for k, v in draws.items()}
            last = micro == gradient_accumulation_steps - 1
            with (self.model.no_sync() if s.ddp and not last else nullcontext()), s.autocast:
                loss, logs = loss_fn(self.model, mine, self.dataset)
            (loss / gradient_accumulation_steps).backward()  # DDP averages over ranks on the last one
        norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), grad_clip or math.inf)
        if torch.isfinite(norm):  # one sync a step; the same verdict on every rank, the gradients being all-reduced
            self.optimizer.step()
            self.update_ema()
            self.bad_steps = 0
        else:
            self.skip_step(draws['index'], norm)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, logs, norm

    def skip_step(self, index, norm):
        """A NaN or inf gradient changes no weight: name the clips; MAX_BAD_STEPS in a row raise FloatingPointError."""
        self.bad_steps += 1
        names = sorted({os.path.basename(p) for p in self.dataset.paths(index.tolist())})
        if self.s.master:  # numbered like the log line after it: the step that would have been taken
            print(f'step {self.step + 1}: skipped, gradient norm {norm.item()}; the {len(names)} audio file(s) it '
                  f'read: {", ".join(names[:10])}{" ..." * (len(names) > 10)}')
        if self.bad_steps >= MAX_BAD_STEPS:
            raise FloatingPointError(f'{self.bad_steps} steps in a row had a NaN or inf gradient: the run diverged. '
                                     f'Resume from {_last_checkpoint or "the start"} with a lower --learning_rate')

    def end_epoch(self):
        report = self.dataset.end_epoch_report(merge=self.s.union_across_ranks)
        if self.s.master and not report.startswith('skipped 0 '):
            print(f'step {self.step}: epoch {self.step * self.s.global_batch // self.n_clips} {report}')

    @torch.no_grad()
    def update_ema(self):
        if self.ema is not None:
            for e, p in zip(self.ema.parameters(), self.raw.parameters()):
                e.lerp_(p, 1 - ema_decay)

    def evaluate(self, loss_fn):
        """Validation loss on the same clips and random numbers every time (so values compare), then save."""
        model = self.ema if self.ema is not None else self.raw
        model.eval()
        with torch.no_grad(), self.s.autocast:
            val = torch.stack([loss_fn(model, d, self.val_set)[0] for d in self.val_draws]).mean()
            val = self.s.mean_across_ranks(val.float()).item()
        model.train()
        if self.s.master:
            print(f'step {self.step}: val loss {val:.4f}')
        if self.step > 0:
            self.save()

    def fixed_val_draws(self, n_clips):
        n = self.s.global_batch * eval_batches
        draws = draw_step(0, n_clips, n, self.latent_shape, salt=1)  # salt 1: never a training step's numbers
        draws['index'] = torch.arange(n) % n_clips  # every validation clip, in order
        return [{k: v[b * self.s.global_batch:][self.s.my_slice(0)] for k, v in draws.items()}
                for b in range(eval_batches)]


# -----------------------------------------------------------------------------
# stages

def load_mels(dataset, mel_fn, draws, s):
    """The slice's clips as log-mels (B, n_mels, T), T cropped to even (the VAE halves time), and captions."""
    audio, captions = dataset.get_batch(draws['index'].tolist(), draws['crop'])  # (B, S)
    mel = mel_fn(audio.to(s.device))
    return mel[..., :mel.shape[-1] // 2 * 2], captions


def stat_draws(n_clips, latent_shape, s):
    return draw_step(0, n_clips, s.global_batch * latent_stat_batches, latent_shape, salt=2)


def train_vae(s):
    mel_cfg = MEL_CONFIGS[mel]
    train_set, val_set = load_data(mel_cfg['sample_rate'])
    mel_fn = MelSpectrogram(mel_cfg).to(s.device)
    model = VAES[vae]()
    refuse([(model.data_dim != mel_cfg['n_mels'],
             f'--vae={vae} takes {model.data_dim} mel bins but --mel={mel} makes {mel_cfg["n_mels"]}')])
    latent_shape = (model.embed_dim, num_latent_frames(clip_seconds, mel_cfg))
    if not resume:  # the VAE's input is normalised per mel bin with the training data's statistics
        mels = load_mels(train_set, mel_fn, stat_draws(len(train_set), latent_shape, s), s)[0]
        model.set_mel_stats(mels.mean(dim=(0, 2)), mels.std(dim=(0, 2)).clamp(min=1e-3))  # silent bins

    def loss_fn(model, draws, dataset):
        mels = load_mels(dataset, mel_fn, draws, s)[0]
        return model(mels, kl_weight=kl_weight, eps=draws['posterior_eps'].to(s.device))  # MelVAE.forward: the loss

    Trainer(s, model, 'vae.pt', {'vae_args': model.args, 'mel': mel}, latent_shape, train_set, val_set).train(loss_fn)


def load_vae(s):
    """The frozen VAE of --vae_ckpt (default out_dir/vae.pt) and its mel settings."""
    path = vae_ckpt or os.path.join(out_dir, 'vae.pt')
    ckpt = load_checkpoint(path, 'VAE checkpoint (--vae_ckpt)', ('vae_args', 'mel', 'model', 'ema'))
    model = MelVAE(**ckpt['vae_args'])
    try:
        model.load_state_dict(ckpt['ema'] or ckpt['model'])
    except RuntimeError:
        raise ValueError(f"{path} does not hold the weights of a VAE; --vae_ckpt must be a vae.pt of train.py's "
                         'vae stage') from None
    model.to(s.device).eval().requires_grad_(False)
    return model, ckpt, MEL_CONFIGS[ckpt['mel']], MelSpectrogram(MEL_CONFIGS[ckpt['mel']]).to(s.device)


class TextFeatures:
    """Caches the text encoder's (77, D) features and (D,) pooled vector per caption: captions repeat."""

    def __init__(self, encoder):
        self.encoder, self.cache = encoder, {}

    def __call__(self, captions, device):
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            text_f, text_f_c = self.encoder.encode(new)
            self.cache.update({c: (f.cpu(), fc.cpu()) for c, f, fc in zip(new, text_f, text_f_c)})
        text_f, text_f_c = zip(*(self.cache[c] for c in captions))
        return torch.stack(text_f).to(device), torch.stack(text_f_c).to(device)


def train_pretrain(s):
    vae_model, vae_file, mel_cfg, mel_fn = load_vae(s)
    train_set, val_set = load_data(mel_cfg['sample_rate'])
    encoder = load_text_encoder(text_encoder)
    text = TextFeatures(encoder)
    E, N = vae_model.embed_dim, num_latent_frames(clip_seconds, mel_cfg)
    cfg = MODELS[model](latent_dim=E, text_dim=encoder.dim, text_c_dim=encoder.dim, latent_seq_len=N)
    net = Resonate(cfg)

    def latents(draws, dataset):
        """The slice's clips as VAE posterior samples (B, N, E), un-normalised, and their captions."""
        mels, captions = load_mels(dataset, mel_fn, draws, s)
        with torch.no_grad():
            mean, logvar = vae_model.encode(mels)  # (B, E, N)
        z = mean + (0.5 * logvar).exp() * draws['posterior_eps'].to(s.device)
        return z.transpose(1, 2), captions

    if not resume:  # per-channel latent statistics and the empty-string features are stored in the model
        z = latents(stat_draws(len(train_set), (E, N), s), train_set)[0]
        net.set_latent_stats(z.mean(dim=(0, 1)), z.std(dim=(0, 1)))
        net.set_empty_string(*encoder.encode(['']))
    extra = {'model_args': asdict(cfg), 'text_encoder': text_encoder, 'mel': vae_file['mel'],
             'vae_args': vae_file['vae_args'], 'vae': vae_model.state_dict()}

    def loss_fn(model, draws, dataset):
        z, captions = latents(draws, dataset)
        text_f, text_f_c = text(captions, s.device)
        loss, per_sample, t = flow_matching_loss(
            model, net.normalize(z), text_f, text_f_c, t=draws['t'].to(s.device),
            noise=draws['noise'].transpose(1, 2).to(s.device), drop_text=draws['drop_text'].to(s.device),
            empty=net.empty_conditions(len(captions)))
        # computed only on log steps (it syncs the device), over every rank's samples
        return loss, lambda: loss_by_t_bin(data.all_gather(per_sample.detach()), data.all_gather(t))

    Trainer(s, net, 'ckpt.pt', extra, (E, N), train_set, val_set).train(loss_fn)


def captions(path, split):
    return list(dict.fromkeys(p for _, p in data.read_prompts(path, split)))


def grpo_prompts():
    val_src = val_prompt_file or val_manifest or manifest
    val = captions(val_src, None if val_prompt_file or val_manifest else 'val')[:grpo_eval_prompts] if val_src else []
    train = [p for p in captions(prompt_file or manifest, None if prompt_file else 'train') if p not in set(val)]
    refuse([(not train, f'no training prompts in {prompt_file or manifest!r} (held-out captions excluded)')])
    return train, val


class GRPOTrainer:
    """Flow-GRPO from --init_from (our ckpt.pt, or the published Resonate_PT.pth when empty) against --reward.
    Prompts and noise are drawn per (seed, epoch); grpo.pt's 'model' holds the merged weights, 'lora' the adapters."""

    def __init__(self, s):
        self.s, self.cfg = s, GRPOConfig(**{f.name: globals()[f'grpo_{f.name}'] for f in fields(GRPOConfig)})
        self.cfg.check(s.world_size)
        self.prompts, self.val_prompts = grpo_prompts()  # before the model loads: a bad prompts file fails fast
        self.pipe = load_pipeline(init_from or None, weights_dir or None, device=str(s.device), weights='pt')
        self.policy = self.pipe.transformer.requires_grad_(True)
        self.policy.grad_checkpointing = grpo_checkpointing
        # grpo.pt also stores what sample.py rebuilds the pipeline from, and the starting weights' fingerprint
        init = data.read_weights(init_from) if init_from else {}
        if 'model_args' in init:  # our ckpt.pt
            self.extra = {k: init[k] for k in ('model_args', 'text_encoder', 'mel', 'vae_args', 'vae')}
        else:  # a published transformer file
            self.extra = {'model_args': asdict(self.policy.cfg), 'published_base': init_from or 'Resonate_PT.pth'}
        self.extra['init_fingerprint'] = fingerprint(self.policy.state_dict())
        self.text, self.reward_fn = TextFeatures(self.pipe.text_encoder), build_reward(reward, device=s.device)
        if lora_rank:  # the frozen base with adapters off is the KL penalty's reference model: no second copy
            self.params, self.ref = grpo.apply_lora(self.policy, lora_rank, lora_alpha), self.policy
            self.policy.to(s.device)
        else:
            self.params, self.ref = list(self.policy.parameters()), deepcopy(self.policy).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, betas=self.cfg.betas, eps=self.cfg.adam_eps,
                                           weight_decay=self.cfg.weight_decay)
        self.ckpt_path, self.epoch = os.path.join(out_dir, 'grpo.pt'), 0
        if resume:
            self.restore()
        self.model = DDP(self.policy, device_ids=[s.device.index] if s.device.type == 'cuda' else None) \
            if s.ddp else self.policy
        if s.master:
            self.describe()

    def restore(self):
        ckpt = open_resumed(self.ckpt_path, self.extra, 'lora', 'lora_rank')
        # LoRA: the frozen base comes from --init_from, the adapters from the checkpoint
        state = {**self.policy.state_dict(), **ckpt['lora']} if lora_rank else ckpt['model']
        load_resumed(ckpt, self.ckpt_path, self.optimizer, (self.policy, state))
        self.epoch = ckpt['step']

    def describe(self):
        c, G = self.cfg, self.s.world_size * self.cfg.sample_batch_size
        mem = grpo.memory_estimate(self.policy.cfg, c, lora_rank=lora_rank, checkpointing=grpo_checkpointing,
                                   micro_batch=grpo_micro_batch, frozen={})['total']
        print(f'grpo: {len(self.prompts)} training / {len(self.val_prompts)} held-out captions; rollout batches of '
              f'{G // c.group_size} captions x {c.group_size} clips, {c.num_batches_per_epoch} minibatches and '
              f'{c.num_batches_per_epoch // c.grad_accum_steps} updates an epoch; {c.num_train_steps} of '
              f'{c.num_steps} SDE steps trained; {sum(p.numel() for p in self.params) / 1e6:.2f}M trainable '
              f'({f"LoRA r={lora_rank}" if lora_rank else "full"}; transformer ~{mem:.2f} GiB); reward {reward}')

    def evaluate(self):
        s = self.s
        self.policy.eval()
        vals = [grpo.evaluate_reward(self.policy, self.pipe, self.reward_fn, self.text, self.val_prompts, seed + k,
                                     grpo_eval_steps, self.cfg.cfg_strength, rank=s.rank, world_size=s.world_size,
                                     autocast=s.autocast) for k in range(grpo_eval_seeds)]
        self.policy.train()
        if s.master:
            print(f'epoch {self.epoch}: held-out reward {sum(vals) / len(vals):.4f} (per seed: '
                  f'{", ".join(f"{v:.4f}" for v in vals)})')

    def save(self):
        if self.s.master:
            model = grpo.merged_state_dict(self.policy)
            save_run(self.ckpt_path, self.epoch, self.optimizer, self.extra, model=model, ema=None,
                     lora=grpo.lora_state_dict(self.policy) if lora_rank else None)
            if 'published_base' in self.extra:  # sample.py --ckpt reads this like Resonate_GRPO.pth
                save_checkpoint(model, os.path.join(out_dir, 'grpo_transformer.pth'))

    def train_epoch(self):
        s, t0, p = self.s, time.time(), self.policy.cfg
        samples = grpo.sample_epoch(self.policy, self.pipe, self.reward_fn, self.text, self.prompts, self.cfg,
                                    self.epoch, seed, (p.latent_seq_len, p.latent_dim), s.rank, s.world_size, s.autocast)
        samples['advantages'], logs = grpo.gather_advantages(samples['rewards'], samples['prompt_ids'], self.cfg,
                                                             s.rank)
        if logs['zero_std_share'] < 1:  # otherwise no sample carries signal: nothing to learn from
            g = data.seeded_generator(seed, 'grpo_train', self.epoch)  # mask padding and shuffles, as on resume
            steps = grpo.train_epoch(self.model, self.ref, self.optimizer, samples, self.text, self.prompts,
                                     self.cfg, g, grpo_micro_batch, s.autocast)
            for k in steps[0]:  # the mean over the epoch's updates, then over ranks
                mean = sum(x[k] for x in steps) / len(steps)
                logs[k] = s.mean_across_ranks(torch.tensor(mean, device=s.device)).item()
        self.epoch += 1
        if s.master:
            print(f'epoch {self.epoch}: ' + ' '.join(f'{k} {v:.4g}' for k, v in logs.items()) +
                  f' {time.time() - t0:.1f} s')

    def train(self):
        start = self.epoch
        while self.epoch < grpo_epochs:
            if self.epoch % grpo_eval_interval == 0 and self.val_prompts:
                self.evaluate()
            if self.epoch % grpo_eval_interval == 0 and self.epoch > start:  # not the checkpoint just resumed from
                self.save()
            self.train_epoch()
        if self.val_prompts:
            self.evaluate()
        self.save()


def check_settings():
    """Refuse settings that cannot work, naming each with what is allowed. Raises ValueError."""
    g = globals()
    choices = {'stage': STAGES, 'dtype': ('fp32', 'bf16'), 'mel': MEL_CONFIGS, 'model': MODELS, 'vae': VAES}
    rules = [(k, g[k] >= 1, 'at least 1') for k in ('batch_size', 'gradient_accumulation_steps', 'max_iters',
             'eval_interval', 'log_interval', 'eval_batches', 'latent_stat_batches', 'grpo_eval_interval',
             'grpo_eval_seeds', 'grpo_eval_steps')]
    rules += [('clip_seconds', clip_seconds > 0, 'above 0'), ('learning_rate', learning_rate > 0, 'above 0'),
              ('cfg_dropout', 0 <= cfg_dropout <= 1, 'in [0, 1]'), ('ema_decay', 0 <= ema_decay < 1, 'in [0, 1)'),
              ('grad_clip', grad_clip >= 0, '0 (off) or more'), ('warmup_iters', warmup_iters >= 0, '0 or more'),
              ('lora_rank', lora_rank >= 0, '0 (full fine-tuning) or more')]
    refuse([(g[k] not in allowed, f'--{k}={g[k]!r} is not one of: {", ".join(allowed)}') for k, allowed in
            choices.items()] + [(not ok, f'--{k} must be {rule}, got {g[k]}') for k, ok, rule in rules] +
           [(stage != 'grpo' and not manifest, 'no --manifest given: pass a JSONL manifest (audio_id, audio_path, '
             'caption, duration), e.g. --manifest=data/sfx/manifest.jsonl'),
            (stage == 'grpo' and not (prompt_file or manifest), 'no training captions: give --prompt_file (one '
             'caption a line, or a manifest) or --manifest'),
            (resume and overwrite, '--resume=True continues the checkpoint and --overwrite=True replaces it: give one')])


def check_out_dir():
    """Before any work: refuse a checkpoint neither resumed nor overwritten, or an out_dir rank 0 cannot write."""
    path = os.path.join(out_dir, CHECKPOINTS[stage][0])
    if resume and not os.path.isfile(path):
        raise FileNotFoundError(f'--resume=True but {path} does not exist; leave out --resume to start this stage')
    refuse([(not resume and not overwrite and os.path.exists(path), f'{path} already holds a {stage} checkpoint; '
             'continue it with --resume=True, replace it with --overwrite=True, or choose another --out_dir')])
    if MASTER:
        data.check_writable(out_dir, '--out_dir')
        for root, ext in map(os.path.splitext, CHECKPOINTS[stage]):  # data.write_atomic's name, from a killed save
            for f in sorted(glob.glob(os.path.join(glob.escape(out_dir), f'{root}.tmp*{ext}'))):
                os.remove(f)
                print(f'removed what an interrupted save left: {os.path.basename(f)}')


STAGES = {'vae': train_vae, 'pretrain': train_pretrain, 'grpo': lambda s: GRPOTrainer(s).train()}


def main(argv):
    data.configure(globals(), argv)
    check_settings()
    check_out_dir()
    s = Setup()
    try:
        STAGES[stage](s)
        if s.ddp:
            torch.distributed.barrier()  # no rank tears down while rank 0 still writes the checkpoint
    finally:
        if s.ddp:
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        if MASTER and _last_checkpoint:  # one line: what is on disk, and how to go on
            print(f'interrupted; the last checkpoint is {_last_checkpoint}: continue with the same command and '
                  '--resume=True', file=sys.stderr)
        elif MASTER:
            print(f'interrupted before the first checkpoint of this run; nothing was saved to {out_dir}',
                  file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, FloatingPointError) as e:  # say what to fix, no traceback
        sys.exit(f'error: {e}')
