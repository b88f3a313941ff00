"""Generate audio from text with Resonate: python sample.py "rain on a tin roof" (published weights, 10 s, 44.1 kHz).
In Python, generate(["rain on a tin roof"]) returns (B, S) float32 audio in [-1, 1] and its sample rate."""
import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import soundfile as sf
from tqdm import tqdm

from data import (DTYPES, WeightsMissing, check_writable, hub_files, pick_device, read_prompts, read_weights,
                  warn_if_slow_bf16, write_atomic)
from flow import euler_sample
from reward import build_reward
from transformer import Resonate, ResonateConfig, load_text_encoder, text_encoder_dtype
from vae import BigVGAN, GriffinLim, MelVAE, get_mel_config, num_latent_frames

PUBLISHED_REPO = 'AndreasXi/Resonate'  # the Hugging Face repository of the released weights
VOCODER_DIR = 'bigvgan_v2_44khz_128band_512x'
PUBLISHED = {  # name -> file in that repository (sizes for the README)
    'grpo': 'Resonate_GRPO.pth',  # transformer after Flow-GRPO, 468 M parameters, ~1.9 GB
    'pt': 'Resonate_PT.pth',  # the pretrained transformer before GRPO, ~1.9 GB
    'vae': 'v1-44.pth',  # mel VAE, 305 M parameters, ~1.2 GB
    'vocoder_config': f'{VOCODER_DIR}/config.json',
    'vocoder': f'{VOCODER_DIR}/bigvgan_generator.pt'}  # BigVGAN v2, 122 M parameters, ~0.5 GB
TEXT_ENCODER = 'flan-t5-large'  # google/flan-t5-large (~3 GB, transformers' cache), or weights_dir/flan-t5-large


@dataclass
class Pipeline:
    """Caption -> waveform; text_encoder may be None for callers that bring text features."""
    transformer: Resonate
    vae: MelVAE
    vocoder: torch.nn.Module  # mel (B, n_mels, T) -> (B, 1, T * hop)
    text_encoder: object
    mel_cfg: dict

    @property
    def sample_rate(self):
        return self.mel_cfg['sample_rate']

    def max_duration(self):
        """Longest clip in seconds: the RoPE range (2048 latent frames, 47.5 s for the released model)."""
        return self.transformer.cfg.max_latent_len * 2 * self.mel_cfg['hop_length'] / self.sample_rate

    @torch.no_grad()
    def synthesize(self, text_f, text_f_c, noise, num_steps=25, cfg_strength=4.5, negative_text_f=None,
                   negative_text_f_c=None, progress=False):
        """Euler + CFG from noise (B, N, C) at t = 1 on text_f (B, 77, Dt), text_f_c (B, Dc), then `decode`; negative_*:
        the unconditional branch's features (default: the stored empty caption's)."""
        x = euler_sample(self.transformer, noise, text_f, text_f_c, num_steps=num_steps, cfg_strength=cfg_strength,
                         negative_text_f=negative_text_f, negative_text_f_c=negative_text_f_c, progress=progress)
        return self.decode(x)

    @torch.no_grad()
    def decode(self, x):
        """Latents (B, N, C) -> (un-normalised latents, mel (B, n_mels, 2N), waveform (B, 1, 2N * hop) in [-1, 1])."""
        latents = self.transformer.unnormalize(x.to(self.transformer.latent_mean.dtype))  # (B, N, C)
        mel = self.vae.decode(latents.transpose(1, 2).to(_dtype_of(self.vae)))  # (B, n_mels, 2N)
        wave = self.vocoder(mel.to(_dtype_of(self.vocoder, mel.dtype)))  # (B, 1, S)
        return latents, mel, wave.float().clamp(-1, 1)


def _dtype_of(module, default=torch.float32):
    return next((p.dtype for p in module.parameters()), default)


# -----------------------------------------------------------------------------
# loading: our train.py checkpoints and the published files

def _read_checkpoint(ckpt):
    """A train.py checkpoint or a published-format transformer state dict; ValueError naming `ckpt` otherwise."""
    state = read_weights(ckpt)
    if 'model_args' not in state and 'latent_mean' not in state:
        kind = 'a train.py VAE checkpoint (vae.pt)' if 'vae_args' in state else 'not a Resonate transformer checkpoint'
        raise ValueError(f'{ckpt} is {kind}; give the ckpt.pt (or grpo.pt) beside it, or a Resonate_*.pth')
    lacks = [k for k in ('model', 'ema', 'mel', 'vae', 'text_encoder') if 'model_args' in state and k not in state]
    if lacks:
        raise ValueError(f'{ckpt} is not a complete train.py checkpoint: it has no {", ".join(lacks)}')
    return state


def load_pipeline(ckpt=None, weights_dir=None, device='auto', dtype='fp32', weights='grpo', text_encoder=None,
                  vocoder='auto'):
    """The pipeline of a train.py checkpoint, a published transformer file (.pth / .safetensors) or, with ckpt=None,
    the published `weights` ('grpo' or 'pt') from weights_dir, the Hugging Face cache or a download. Raises
    FileNotFoundError / ValueError for a bad checkpoint or option, WeightsMissing, OSError for the text encoder."""
    if dtype not in DTYPES or vocoder not in ('auto', 'bigvgan', 'griffin-lim') or weights not in ('grpo', 'pt'):
        raise ValueError(f'dtype must be one of {sorted(DTYPES)}, vocoder auto|bigvgan|griffin-lim, weights '
                         f'grpo|pt; got {dtype!r}, {vocoder!r}, {weights!r}')
    device, dtype = pick_device(device), DTYPES[dtype]
    state = _read_checkpoint(ckpt) if ckpt is not None else None
    ours = state is not None and 'model_args' in state
    # 'auto': the published files come with their BigVGAN; our models use it at 128 mel bins (44.1 kHz)
    at_128 = not ours or get_mel_config(state['mel'])['n_mels'] == 128
    if vocoder == 'bigvgan' and not at_128:
        raise ValueError(f'--vocoder=bigvgan takes 128-bin 44.1 kHz mels; {ckpt} makes {state["mel"]} mels: use '
                         '--vocoder=griffin-lim or auto')
    bigvgan = vocoder == 'bigvgan' or (vocoder == 'auto' and at_128)
    names = ([PUBLISHED[weights]] if state is None else []) + ([] if ours else [PUBLISHED['vae']])
    names += [PUBLISHED['vocoder_config'], PUBLISHED['vocoder']] if bigvgan else []
    local_t5 = Path(weights_dir or '', TEXT_ENCODER)
    default_t5 = str(local_t5) if weights_dir and local_t5.is_dir() else TEXT_ENCODER
    encoder = text_encoder or (state['text_encoder'] if ours else default_t5)
    try:  # one call: offline, one message lists every file
        paths = hub_files(PUBLISHED_REPO, names, weights_dir)
    except WeightsMissing as e:
        t5 = f'\nand the text encoder: hf download google/{TEXT_ENCODER} --local-dir WEIGHTS_DIR/{TEXT_ENCODER}'
        raise WeightsMissing(str(e) + (t5 if encoder == TEXT_ENCODER else '')) from None
    if ours:  # EMA weights when the checkpoint has them
        try:
            net = Resonate(ResonateConfig(**state['model_args']))
            net.load_state_dict(state['ema'] or state['model'])
        except (TypeError, ValueError, RuntimeError) as e:
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), '')[:160]
            raise ValueError(f'{ckpt}: its weights do not fit its own model_args ({first}): a damaged checkpoint, or '
                             'one written by another version of train.py') from None
    else:
        net = Resonate.from_pretrained(state if state is not None else read_weights(paths[PUBLISHED[weights]]))
    vae_net = MelVAE.from_pretrained(state['vae'] if ours else read_weights(paths[PUBLISHED['vae']]))
    mel_cfg = get_mel_config(state['mel']) if ours else vae_net.mel_config
    voc = GriffinLim(mel_cfg) if not bigvgan else BigVGAN.from_pretrained(
        json.loads(paths[PUBLISHED['vocoder_config']].read_text()), read_weights(paths[PUBLISHED['vocoder']]))
    for module in (net, vae_net, voc):
        module.to(device, dtype).eval()
    text = load_text_encoder(encoder).to(device, text_encoder_dtype(dtype))
    return check_pipeline(Pipeline(net, vae_net, voc, text, mel_cfg))


def check_pipeline(pipe):
    """Raise ValueError when the parts do not fit together (latent channels, mel bins, hop length, rate)."""
    net, vae_net, voc, mel = pipe.transformer, pipe.vae, pipe.vocoder, pipe.mel_cfg
    if net.cfg.latent_dim != vae_net.embed_dim or vae_net.data_dim != mel['n_mels']:
        raise ValueError(f'the transformer makes {net.cfg.latent_dim} latent channels, the VAE takes '
                         f'{vae_net.embed_dim} and makes {vae_net.data_dim} mel bins for a {mel["n_mels"]}-bin mel '
                         'config: the files do not belong together')
    rate = getattr(voc, 'sampling_rate', None) or mel['sample_rate']
    if (voc.num_mels, voc.upsample_factor, rate) != (mel['n_mels'], mel['hop_length'], mel['sample_rate']):
        raise ValueError(f'the vocoder ({voc.num_mels} mels, hop {voc.upsample_factor}, {rate} Hz) does not fit the '
                         f'mel config ({mel["n_mels"]} mels, hop {mel["hop_length"]}, {mel["sample_rate"]} Hz)')
    return pipe


# -----------------------------------------------------------------------------
# generation

def check_settings(prompts, duration=10.0, steps=25, cfg_strength=4.5, seed=42, num_samples=1, batch_size=8,
                   longest=math.inf, extra=()):
    """Raise ValueError naming the setting and its range for anything `generate` cannot honour."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f'prompts must be a non-empty list of non-empty captions, got {prompts!r:.80}')
    for name, value in (('steps', steps), ('num_samples', num_samples), ('batch_size', batch_size), *extra):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'--{name} must be a whole number of at least 1, got {value!r}')
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    if len(seeds) != len(prompts) or not all(isinstance(s, torch.Generator) or 0 <= s < 2 ** 63 for s in seeds):
        raise ValueError(f'--seed must be between 0 and 2**63 - 1 (or one seed per prompt), got {seed!r:.80}')
    if not math.isfinite(cfg_strength):
        raise ValueError(f'--cfg_strength must be a finite number (4.5 as released), got {cfg_strength}')
    if not 1.0 <= duration <= longest:
        limit = 'at least 1 second' if longest == math.inf else \
            f'between 1 and {math.floor(longest * 10) / 10} seconds for this model'
        raise ValueError(f'--duration must be {limit}, got {duration}')


def generate(prompts, pipeline=None, duration=10.0, steps=25, cfg_strength=4.5, negative=None, seed=42,
             num_samples=1, batch_size=8, progress=True, **load_kwargs):
    """Text -> (audio (P * num_samples, S) float32 CPU in [-1, 1], S = round(duration * rate), rate in Hz), prompt
    i's samples at rows i * num_samples ...; without `pipeline`, load_pipeline(**load_kwargs). Sample k of a prompt
    starts from seed + k, or from the k-th draw of its own seed or Generator when `seed` is a list of one per prompt.
    Raises ValueError for a setting out of range and for non-finite audio."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if pipeline is None:  # fail before the slow load
        check_settings(prompts, duration, steps, cfg_strength, seed, num_samples, batch_size)
    pipe = pipeline or load_pipeline(**load_kwargs)
    check_settings(prompts, duration, steps, cfg_strength, seed, num_samples, batch_size, pipe.max_duration())
    assert pipe.text_encoder is not None, 'a pipeline without text encoder: call Pipeline.synthesize'
    jobs = [p for p in prompts for _ in range(num_samples)]
    if isinstance(seed, (list, tuple)):  # one stream per prompt, drawn in turn by its samples
        streams = [s if isinstance(s, torch.Generator) else torch.Generator().manual_seed(int(s)) for s in seed]
        streams = [streams[j // num_samples] for j in range(len(jobs))]
    else:  # sample k of a prompt: seed + k
        streams = [torch.Generator().manual_seed(seed + j % num_samples) for j in range(len(jobs))]
    N, C = num_latent_frames(duration, pipe.mel_cfg, cover=True), pipe.transformer.cfg.latent_dim
    device, dtype = pipe.transformer.latent_mean.device, pipe.transformer.latent_mean.dtype
    neg = [x.to(device, dtype) for x in pipe.text_encoder.encode([negative])] if negative else (None, None)
    out = []
    batches = range(0, len(jobs), batch_size)
    for start in tqdm(batches, desc='batches', disable=not progress or len(batches) == 1):
        batch = jobs[start:start + batch_size]
        text_f, text_f_c = (x.to(device, dtype) for x in pipe.text_encoder.encode(batch))  # (B, 77, Dt), (B, Dc)
        noise = torch.stack([torch.randn(N, C, generator=g) for g in streams[start:start + batch_size]])  # (B, N, C)
        noise = noise.to(device, dtype)  # drawn on the CPU: the same on every device
        _, _, wave = pipe.synthesize(text_f, text_f_c, noise, steps, cfg_strength, *neg, progress=progress)
        out.append(wave[:, 0, :round(duration * pipe.sample_rate)].cpu())  # (B, S) exactly `duration` long
    audio = torch.cat(out)
    if not torch.isfinite(audio).all():
        raise ValueError('the model produced non-finite audio: its weights hold NaN or inf (check the checkpoint)')
    return audio, pipe.sample_rate


# -----------------------------------------------------------------------------
# command line

def safe_name(text, limit=80):
    """A file name from a prompt: ASCII letters, digits, '-' and '_' only, at most `limit` characters."""
    return re.sub(r'[^A-Za-z0-9-]+', '_', text).strip('_-')[:limit].rstrip('_-') or 'sample'


def unused_path(path, overwrite, taken=()):
    """`path`, or path-1, path-2, ... if it is in `taken` or (unless overwrite) exists."""
    def used(p):  # --overwrite replaces files on disk, never another output of this run
        return p in taken or (os.path.exists(p) and not overwrite)
    if not used(path):
        return path
    root, ext = os.path.splitext(path)
    i = 1
    while used(f'{root}-{i}{ext}'):
        i += 1
    why = 'is another output of this run' if path in taken else 'exists'
    print(f'{path} {why}; writing {root}-{i}{ext} instead' + ('' if path in taken else ' (--overwrite replaces it)'))
    return f'{root}-{i}{ext}'


def write_wav(path, audio, sample_rate):
    """Write (S,) float audio in [-1, 1] as a 16-bit PCM WAV, atomically. Raises OSError naming `path`."""
    try:
        write_atomic(path, lambda tmp: sf.write(tmp, audio.clamp(-1, 1).numpy(), sample_rate, subtype='PCM_16'))
    except (sf.SoundFileError, OSError) as e:  # a full disk, a folder removed during the run
        raise OSError(f'could not write {path} ({e})') from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('prompt', nargs='*', help='caption(s) to generate')
    p.add_argument('--prompts_file', help='one prompt a line, or a TTA-Bench JSON (files named by prompt id)')
    p.add_argument('--ckpt', help='train.py ckpt.pt or a published transformer .pth (default: published weights)')
    p.add_argument('--weights', default='grpo', choices=['grpo', 'pt'], help='which published transformer')
    p.add_argument('--weights_dir', help='folder holding the published files (otherwise cache or download)')
    p.add_argument('--text_encoder', help="text encoder name or folder (default: the checkpoint's / FLAN-T5-large)")
    p.add_argument('--vocoder', default='auto', choices=['auto', 'bigvgan', 'griffin-lim'])
    p.add_argument('--out', help='output WAV (one prompt and one sample only)')
    p.add_argument('--out_dir', default='samples', help='folder for outputs named after the prompts')
    p.add_argument('--duration', type=float, default=10.0, help='seconds, 1 to 47.5 for the released model')
    p.add_argument('--steps', type=int, default=25, help='Euler steps')
    p.add_argument('--cfg_strength', type=float, default=4.5, help='classifier-free guidance scale')
    p.add_argument('--negative', help='caption for the unconditional branch (default: the empty caption)')
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--num_samples', type=int, default=1, help='samples per prompt')
    p.add_argument('--batch_size', type=int, default=8)
    p.add_argument('--device', default='auto', help='auto (cuda, then mps, then cpu), cuda, mps or cpu')
    p.add_argument('--dtype', default='fp32', choices=sorted(DTYPES))
    p.add_argument('--overwrite', action='store_true', help='replace existing files')
    p.add_argument('--best_of', type=int, default=1, help='N candidates per sample; keeps the best by --reward')
    p.add_argument('--reward', default='clap', help='ranker for --best_of, e.g. clap, qwen_omni, loudness:1.0')
    return p.parse_args(argv)


def best_of(audio, sample_rate, prompts, n, reward):
    """Audio (P * n, S) as `generate` orders it, P prompts, a scorer -> (best of each n (P, S), scores (P, n))."""
    assert audio.shape[0] == len(prompts) * n, 'best_of: rows must be prompts x candidates'
    scores = reward.score(audio, sample_rate, [p for p in prompts for _ in range(n)]).float().cpu().view(-1, n)
    return audio.view(len(prompts), n, -1)[torch.arange(len(prompts)), scores.argmax(1)], scores


def output_paths(args, items):
    """The WAV path of every output, checked before any work: --out must be one .wav file, the folder writable."""
    if args.out and os.path.isdir(args.out):
        raise ValueError(f'--out {args.out} is a folder; name a .wav file, or use --out_dir={args.out}')
    if args.out and (len(items) * args.num_samples != 1 or not args.out.lower().endswith('.wav')):
        raise ValueError('--out names one .wav file, for one prompt and one sample: use --out_dir otherwise')
    check_writable(os.path.dirname(os.path.abspath(args.out)) if args.out else args.out_dir,
                   '--out' if args.out else '--out_dir')
    paths = []
    for pid, prompt in items:
        for k in range(args.num_samples):
            name = safe_name(pid or prompt) + (f'_{k}' if args.num_samples > 1 else '')
            paths.append(unused_path(args.out or os.path.join(args.out_dir, name + '.wav'), args.overwrite, paths))
    return paths


def main(argv=None):
    args, written = parse_args(argv), 0
    try:
        items = [(None, x) for x in args.prompt] + (read_prompts(args.prompts_file) if args.prompts_file else [])
        if not items:
            raise ValueError('give a prompt, e.g. python sample.py "rain on a tin roof", or --prompts_file')
        prompts = [x for _, x in items]
        check_settings(prompts, args.duration, args.steps, args.cfg_strength, args.seed, args.num_samples,
                       args.batch_size, extra=[('best_of', args.best_of)])
        paths = output_paths(args, items)
        reward = build_reward(args.reward, device=None if args.device == 'auto' else args.device) \
            if args.best_of > 1 else None  # loaded first: a missing reward model fails before the work
        warn_if_slow_bf16(args.device, args.dtype)
        pipe = load_pipeline(args.ckpt, args.weights_dir, args.device, args.dtype, args.weights, args.text_encoder,
                             args.vocoder)
        chunk = max(1, args.batch_size // (args.num_samples * args.best_of))  # prompts a call; each written at once
        for start in range(0, len(prompts), chunk):
            part = prompts[start:start + chunk]
            audio, sr = generate(part, pipe, args.duration, args.steps, args.cfg_strength, args.negative, args.seed,
                                 args.num_samples * args.best_of, args.batch_size)
            if reward is not None:
                audio, scores = best_of(audio, sr, [x for x in part for _ in range(args.num_samples)], args.best_of,
                                        reward)
                print(f'best of {args.best_of} by {args.reward}: mean score {scores.max(1).values.mean():.4f} '
                      f'(all candidates {scores.mean():.4f})')
            for path, wave in zip(paths[start * args.num_samples:], audio):
                write_wav(path, wave, sr)
                written += 1
                print(f'wrote {path} ({wave.numel() / sr:.2f} s at {sr} Hz)')
    except (ValueError, OSError) as e:  # WeightsMissing is an OSError
        sys.exit(f'error: {e}')
    except KeyboardInterrupt:
        sys.exit(f'interrupted: {written} of {len(paths)} files written')


if __name__ == '__main__':
    main()
