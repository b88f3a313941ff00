"""
Generate audio from text with Resonate.

$ python sample.py "rain on a tin roof"                        # the published GRPO weights: 10 s at 44.1 kHz
$ python sample.py "footsteps on gravel" --ckpt=out/ckpt.pt --duration=2 --out=steps.wav   # our own checkpoint
$ python sample.py --prompts-file=prompts.txt --batch-size=8 --out-dir=samples

Python: `generate(["rain on a tin roof"])` returns (B, samples) float audio in [-1, 1] and its sample rate.
"""
import argparse
import os
import re
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

PUBLISHED_REPO = 'AndreasXi/Resonate'  # the Hugging Face repository the released code downloads from
PUBLISHED = {  # name -> file in that repository
    'grpo': 'Resonate_GRPO.pth', 'pt': 'Resonate_PT.pth', 'vae': 'v1-44.pth',
    'vocoder_config': 'bigvgan_v2_44khz_128band_512x/config.json',
    'vocoder': 'bigvgan_v2_44khz_128band_512x/bigvgan_generator.pt'}
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def pick_device(name='auto'):
    """'auto' -> cuda if available, else mps, else cpu; anything else is passed to torch.device."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu')
    return torch.device(name)


@dataclass
class Pipeline:
    """Everything between a caption and a waveform: text encoder, transformer, VAE, vocoder and the mel settings.

    `vocoder(mel (B, n_mels, T)) -> waveform (B, 1, T * hop_length)`; `text_encoder` may be None when the caller
    supplies text features itself."""
    transformer: torch.nn.Module
    vae: torch.nn.Module
    vocoder: object
    text_encoder: object
    mel_cfg: dict

    @property
    def sample_rate(self):
        return self.mel_cfg['sample_rate']

    def latent_frames(self, duration):
        """Latent frames N for `duration` seconds: mel frames at sample_rate / hop_length, halved by the VAE."""
        return round(duration * self.sample_rate / self.mel_cfg['hop_length'] / 2)

    @torch.no_grad()
    def synthesize(self, text_f, text_f_c, noise, num_steps=25, cfg=4.5, negative_text_f=None,
                   negative_text_f_c=None, progress=False):
        """The released chain: Euler + CFG from noise -> un-normalise -> VAE decode -> vocoder.

        text_f (B, 77, Dt), text_f_c (B, Dc), noise (B, N, C) at t = 1. Returns latents (B, N, C) un-normalised,
        mel (B, n_mels, 2N) and waveform (B, 1, S) in [-1, 1] with S = 2N * hop_length."""
        from flow import euler_sample
        x = euler_sample(self.transformer, noise, text_f, text_f_c, num_steps=num_steps, cfg=cfg,
                         negative_text_f=negative_text_f, negative_text_f_c=negative_text_f_c, progress=progress)
        latents = self.transformer.unnormalize(x)
        mel = self.vae.decode(latents.transpose(1, 2).float())
        return latents, mel, self.vocoder(mel).clamp(-1, 1)


def griffin_lim_vocoder(mel_cfg):
    """A vocoder without weights: Griffin-Lim phase recovery, for small models trained here."""
    from vae import griffin_lim
    return lambda mel: griffin_lim(mel, mel_cfg).unsqueeze(1)


def load_pipeline(ckpt=None, weights_dir=None, device='auto', dtype='fp32', published='grpo'):
    """Build the pipeline from our train.py checkpoint, or from the published Resonate weights.

    ckpt: a train.py `ckpt.pt` (self-describing: model sizes, VAE, mel settings, text encoder), or a published
    transformer file (`Resonate_GRPO.pth` / `Resonate_PT.pth`), or None for the published `published` weights,
    taken from `weights_dir` if it holds them, else from the cache, else downloaded. dtype: 'fp32', 'bf16', 'fp16'.
    Raises FileNotFoundError for a missing checkpoint; data.DownloadError (with what to download and where to put
    it) when offline and the published files are not present."""
    device, dtype = pick_device(device), DTYPES[dtype]
    if ckpt is not None and not os.path.isfile(ckpt):
        raise FileNotFoundError(f'--ckpt {ckpt!r} does not exist; give a train.py ckpt.pt or a published .pth file')
    state = torch.load(ckpt, map_location='cpu', weights_only=True) if ckpt else None
    if state is not None and 'model_args' in state:
        pipe = load_ours(state)
    else:
        pipe = load_published(state, weights_dir, published)
    pipe.transformer.to(device, dtype).eval()
    pipe.vae.to(device).eval()
    if isinstance(pipe.vocoder, torch.nn.Module):
        pipe.vocoder.to(device).eval()
    return pipe


def load_ours(state):
    """A pipeline from a train.py checkpoint (EMA weights when it has them); vocoder: Griffin-Lim."""
    from transformer import Resonate, ResonateConfig, load_text_encoder
    from vae import MEL_CONFIGS, MelVAE
    net = Resonate(ResonateConfig(**state['model_args']))
    net.load_state_dict(state['ema'] or state['model'])
    vae_net = MelVAE(**state['vae_args'])
    vae_net.load_state_dict(state['vae'])
    mel_cfg = MEL_CONFIGS[state['mel']]
    return Pipeline(net, vae_net, griffin_lim_vocoder(mel_cfg), load_text_encoder(state['text_encoder']), mel_cfg)


def load_published(transformer_state, weights_dir, which):
    raise NotImplementedError('the published weights arrive with the vocoder and downloader')


def make_noise(batch, frames, channels, seed):
    """Initial noise (B, N, C), drawn on the CPU so a seed gives the same audio on every device."""
    return torch.randn(batch, frames, channels, generator=torch.Generator().manual_seed(seed))


def generate(prompts, pipeline=None, duration=10.0, steps=25, cfg=4.5, negative=None, seed=42, num_samples=1,
             batch_size=8, progress=True, **load_kwargs):
    """Text -> audio. prompts: list of captions. Returns (audio (len(prompts) * num_samples, S) float in [-1, 1],
    sample_rate); the samples of prompt i are rows i * num_samples ... (i + 1) * num_samples - 1.

    duration in seconds (1 to the model's longest, 47 s for the released model), steps = NFE of the Euler
    sampler (the conditional and unconditional branches share one batched forward), cfg = guidance scale,
    negative = a caption whose features replace the empty-string features of the unconditional branch.
    Batch b of the run uses seed + b, so results do not depend on what else is generated after it.
    Raises ValueError for a duration out of range or an empty prompt list."""
    pipe = pipeline or load_pipeline(**load_kwargs)
    check_duration(duration, pipe)
    if not prompts:
        raise ValueError('no prompts given')
    if pipe.text_encoder is None:
        raise ValueError('this pipeline has no text encoder; call Pipeline.synthesize with text features')
    jobs = [p for p in prompts for _ in range(num_samples)]
    frames = pipe.latent_frames(duration)
    model = pipe.transformer
    device, dtype = model.latent_mean.device, model.latent_mean.dtype
    out = []
    for b, start in enumerate(tqdm(range(0, len(jobs), batch_size), desc='batches', disable=not progress or len(jobs) <= batch_size)):
        batch = jobs[start:start + batch_size]
        text_f, text_f_c = (x.to(device, dtype) for x in pipe.text_encoder.encode(batch))
        neg_f = neg_f_c = None
        if negative:
            neg_f, neg_f_c = (x.to(device, dtype).expand(len(batch), *x.shape[1:])
                              for x in pipe.text_encoder.encode([negative]))
        noise = make_noise(len(batch), frames, model.latent_mean.shape[-1], seed + b).to(device, dtype)
        _, _, wave = pipe.synthesize(text_f, text_f_c, noise, steps, cfg, neg_f, neg_f_c, progress=progress)
        out.append(wave[:, 0].float().cpu())
    return torch.cat(out), pipe.sample_rate


def check_duration(duration, pipe):
    longest = pipe.transformer.max_latent_frames * 2 * pipe.mel_cfg['hop_length'] / pipe.sample_rate
    if not 1.0 <= duration <= longest:
        raise ValueError(f'--duration must be between 1 and {longest:.1f} s for this model, got {duration}')


# -----------------------------------------------------------------------------
# command line

def read_prompts(path):
    """[(id, prompt)] from a text file (one prompt a line) or a TTA-Bench JSON list of {id, prompt_text}."""
    import json
    with open(path) as f:
        text = f.read()
    if path.endswith('.json'):
        items = json.loads(text)
        return [(str(x['id']), x['prompt_text']) for x in items if x.get('prompt_text', '').strip()]
    return [(None, line.strip()) for line in text.splitlines() if line.strip()]


def safe_name(text, limit=80):
    """A file name from a prompt: letters, digits, '-' and '_' only, at most `limit` characters."""
    return re.sub(r'[^A-Za-z0-9]+', '_', text).strip('_')[:limit] or 'sample'


def unused_path(path, overwrite):
    """`path`, or path with -1, -2, ... before the extension if it exists (unless overwrite)."""
    if overwrite or not os.path.exists(path):
        return path
    root, ext = os.path.splitext(path)
    i = 1
    while os.path.exists(f'{root}-{i}{ext}'):
        i += 1
    print(f'{path} exists; writing {root}-{i}{ext} instead (--overwrite replaces it)')
    return f'{root}-{i}{ext}'


def write_wav(path, audio, sample_rate):
    """Write (S,) float audio in [-1, 1] as a 16-bit PCM WAV."""
    import soundfile as sf
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(path, audio.clamp(-1, 1).numpy(), sample_rate, subtype='PCM_16')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('prompt', nargs='*', help='caption(s) to generate')
    p.add_argument('--prompts-file', help='one prompt a line, or a TTA-Bench JSON (files named by prompt id)')
    p.add_argument('--ckpt', help='train.py ckpt.pt or a published .pth (default: the published GRPO weights)')
    p.add_argument('--weights-dir', help='folder holding the published files (otherwise cache or download)')
    p.add_argument('--out', help='output WAV (one prompt and one sample only)')
    p.add_argument('--out-dir', default='samples', help='folder for outputs named after the prompts')
    p.add_argument('--duration', type=float, default=10.0, help='seconds')
    p.add_argument('--steps', type=int, default=25, help='Euler steps')
    p.add_argument('--cfg', type=float, default=4.5, help='classifier-free guidance scale')
    p.add_argument('--negative', help='negative prompt for the unconditional branch')
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--num-samples', type=int, default=1, help='samples per prompt')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--device', default='auto', help='auto, cuda, mps or cpu')
    p.add_argument('--dtype', default='fp32', choices=sorted(DTYPES))
    p.add_argument('--overwrite', action='store_true', help='replace existing files')
    args = p.parse_args(argv)
    items = [(None, x) for x in args.prompt] + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not items:
        p.error('give a prompt, e.g. python sample.py "rain on a tin roof", or --prompts-file')
    if args.out and len(items) * args.num_samples != 1:
        p.error('--out names one file: use --out-dir for several prompts or samples')
    try:
        pipe = load_pipeline(args.ckpt, args.weights_dir, args.device, args.dtype)
        check_duration(args.duration, pipe)
        audio, sr = generate([x for _, x in items], pipe, args.duration, args.steps, args.cfg, args.negative,
                             args.seed, args.num_samples, args.batch_size)
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f'error: {e}')
    for i, wave in enumerate(audio):
        pid, prompt = items[i // args.num_samples]
        name = pid or safe_name(prompt)
        if args.num_samples > 1:
            name += f'_{i % args.num_samples}'
        path = unused_path(args.out or os.path.join(args.out_dir, name + '.wav'), args.overwrite)
        write_wav(path, wave, sr)
        print(f'wrote {path} ({wave.numel() / sr:.2f} s at {sr} Hz)')


if __name__ == '__main__':
    main()
