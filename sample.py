"""
Generate audio from text with Resonate.

$ python sample.py "rain on a tin roof"                        # the published GRPO weights: 10 s at 44.1 kHz
$ python sample.py "rain on a tin roof" --weights-dir=weights  # offline, from a folder holding the published files
$ python sample.py "footsteps on gravel" --ckpt=out/ckpt.pt --duration=2 --out=steps.wav   # our own checkpoint
$ python sample.py --prompts-file=acc_prompt.json --batch-size=8 --out-dir=samples         # TTA-Bench, by id

Python: `generate(["rain on a tin roof"])` returns (B, samples) float audio in [-1, 1] and its sample rate.
"""
import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from data import DTYPES, DownloadError, cache_dir, hf_file, pick_device, read_prompts

PUBLISHED_REPO = 'AndreasXi/Resonate'  # the Hugging Face repository the released code downloads from
VOCODER_DIR = 'bigvgan_v2_44khz_128band_512x'
PUBLISHED = {  # name -> file in that repository (sizes of the released files, for the README)
    'grpo': 'Resonate_GRPO.pth',  # transformer after Flow-GRPO, 468 M parameters, ~1.9 GB
    'pt': 'Resonate_PT.pth',  # the pretrained transformer before GRPO, ~1.9 GB
    'vae': 'v1-44.pth',  # mel VAE, 305 M parameters, ~1.2 GB
    'vocoder_config': f'{VOCODER_DIR}/config.json',
    'vocoder': f'{VOCODER_DIR}/bigvgan_generator.pt'}  # BigVGAN v2, 122 M parameters, ~0.5 GB
PUBLISHED_TEXT_ENCODER = 'flan-t5-large'  # google/flan-t5-large, fetched by transformers (~3 GB) or a local folder
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
        """Latent frames N for `duration` seconds: mel frames at sample_rate / hop_length, halved by the VAE,
        rounded up as the released sampler does (10 s at 44.1 kHz -> 431; the audio is then trimmed)."""
        return math.ceil(duration * self.sample_rate / self.mel_cfg['hop_length'] / 2)

    def max_duration(self):
        """Longest clip in seconds: the transformer's RoPE range (2048 frames, 47.5 s for the released model)."""
        return self.transformer.cfg.max_latent_len * 2 * self.mel_cfg['hop_length'] / self.sample_rate

    @torch.no_grad()
    def synthesize(self, text_f, text_f_c, noise, num_steps=25, cfg=4.5, negative_text_f=None,
                   negative_text_f_c=None, progress=False):
        """The released chain: Euler + CFG from noise -> un-normalise -> VAE decode -> vocoder.

        text_f (B, 77, Dt), text_f_c (B, Dc), noise (B, N, C) at t = 1, all on the transformer's device.
        negative_*: features for the unconditional branch (default: the stored empty-string features).
        Returns latents (B, N, C) un-normalised, mel (B, n_mels, 2N) and waveform (B, 1, S) float32 in
        [-1, 1] with S = 2N * hop_length."""
        from flow import euler_sample
        x = euler_sample(self.transformer, noise, text_f, text_f_c, num_steps=num_steps, cfg=cfg,
                         negative_text_f=negative_text_f, negative_text_f_c=negative_text_f_c, progress=progress)
        latents = self.transformer.unnormalize(x)  # (B, N, C)
        mel = self.vae.decode(latents.transpose(1, 2).to(_dtype_of(self.vae)))  # (B, n_mels, 2N)
        wave = self.vocoder(mel.to(_dtype_of(self.vocoder, mel.dtype)))  # (B, 1, S)
        return latents, mel, wave.float().clamp(-1, 1)


def _dtype_of(module, default=torch.float32):
    params = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
    return params.dtype if params is not None else default


def griffin_lim_vocoder(mel_cfg):
    """A vocoder without weights: Griffin-Lim phase recovery, for small models trained here."""
    from vae import griffin_lim
    return lambda mel: griffin_lim(mel.float(), mel_cfg).unsqueeze(1)


# -----------------------------------------------------------------------------
# loading: our train.py checkpoints and the published files

def load_pipeline(ckpt=None, weights_dir=None, device='auto', dtype='fp32', published='grpo', text_encoder=None,
                  vocoder='auto'):
    """Build the pipeline from our train.py checkpoint, or from the published Resonate weights.

    ckpt: a train.py `ckpt.pt` (self-describing: model sizes, VAE, mel settings, text encoder), or a published
    transformer file (`Resonate_GRPO.pth` / `Resonate_PT.pth`, .pth or .safetensors), or None for the
    published `published` ('grpo' or 'pt') weights. The published VAE and vocoder are taken from `weights_dir`
    if it holds them, else from the cache (`data.cache_dir()`), else downloaded.
    dtype: 'fp32', 'bf16', 'fp16' for the transformer, VAE and vocoder. text_encoder: overrides the encoder
    name or folder (default: the checkpoint's; FLAN-T5-large for the published weights, or
    `weights_dir`/flan-t5-large when that folder exists). vocoder: 'auto' (BigVGAN for 44.1 kHz models,
    Griffin-Lim otherwise), 'bigvgan' or 'griffin-lim'.
    Raises FileNotFoundError for a missing checkpoint, ValueError for a bad option or mismatched files,
    WeightsMissing (a data.DownloadError) naming the files and the folder to put them in when the published
    files are neither present nor downloadable, OSError when the text encoder cannot be loaded."""
    if dtype not in DTYPES:
        raise ValueError(f'--dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
    if vocoder not in ('auto', 'bigvgan', 'griffin-lim'):
        raise ValueError(f"--vocoder must be 'auto', 'bigvgan' or 'griffin-lim', got {vocoder!r}")
    device, dtype = pick_device(device), DTYPES[dtype]
    state = read_weights(ckpt) if ckpt is not None else None
    if state is not None:
        check_generator_state(state, ckpt)
    if state is not None and 'model_args' in state:
        pipe = load_ours(state, weights_dir, text_encoder, vocoder)
    else:
        pipe = load_published(state, weights_dir, published, text_encoder, vocoder)
    for module in (pipe.transformer, pipe.vae, pipe.vocoder):
        if isinstance(module, torch.nn.Module):
            module.to(device, dtype).eval()
    if pipe.text_encoder is not None:  # T5 overflows in fp16, so it stays fp32 there
        pipe.text_encoder.to(device, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    return pipe


def read_weights(path):
    """A checkpoint or state dict from `path`: .safetensors, or a torch file read with weights_only=True (no
    code runs from the file). Raises FileNotFoundError naming the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--ckpt {path!r} does not exist; give a train.py ckpt.pt or a published .pth file')
    try:
        if str(path).endswith('.safetensors'):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle, zip and safetensors errors alike: the file is not a weights file
        raise ValueError(f'--ckpt {path!r} is not a readable checkpoint ({type(e).__name__}); give a train.py '
                         f'ckpt.pt / grpo.pt or a published Resonate_*.pth') from None
    if not isinstance(state, dict):
        raise ValueError(f'{path!r} holds a {type(state).__name__}, not a checkpoint or state dict')
    return state


def check_generator_state(state, path):
    """Refuse, naming the file, a --ckpt that is not a transformer: e.g. the VAE's vae.pt beside ckpt.pt."""
    if not ('model_args' in state or 'latent_mean' in state):
        kind = 'a train.py VAE checkpoint (vae.pt)' if 'vae_args' in state else 'not a Resonate transformer checkpoint'
        raise ValueError(f'--ckpt {str(path)!r} is {kind}; give the ckpt.pt (or grpo.pt) beside it, or a '
                         f'published Resonate_*.pth')


def load_ours(state, weights_dir=None, text_encoder=None, vocoder='auto'):
    """A pipeline from a train.py checkpoint (EMA weights when it has them)."""
    from transformer import Resonate, ResonateConfig, load_text_encoder
    from vae import MEL_CONFIGS, MelVAE
    net = Resonate(ResonateConfig(**state['model_args']))
    net.load_state_dict(state['ema'] or state['model'])
    vae_net = MelVAE(**state['vae_args'])
    vae_net.load_state_dict(state['vae'])
    mel_cfg = MEL_CONFIGS[state['mel']] if isinstance(state['mel'], str) else state['mel']
    use_bigvgan = vocoder == 'bigvgan' or (vocoder == 'auto' and mel_cfg['n_mels'] == 128)
    voc = load_published_vocoder(weights_dir) if use_bigvgan else griffin_lim_vocoder(mel_cfg)
    encoder = load_text_encoder(text_encoder or state['text_encoder'])
    return check_pipeline(Pipeline(net, vae_net.fold_weight_norm(), voc, encoder, mel_cfg))


class WeightsMissing(DownloadError):
    """The published files are neither in the given folder nor in the cache, and could not be downloaded."""


def published_paths(names, weights_dir=None, repo=PUBLISHED_REPO, revision='main'):
    """{name: Path} of PUBLISHED files: from `weights_dir`, else the cache, else downloaded (with progress, resume
    and checksum; see data.download). After the first failed download the rest are only looked up, so an
    offline machine fails once, fast. Raises WeightsMissing listing every missing file and where to put it."""
    paths, missing, reason = {}, [], None
    for name in names:
        filename = PUBLISHED[name]
        if reason is None:
            try:
                paths[name] = hf_file(repo, filename, local_dir=weights_dir, revision=revision)
                continue
            except DownloadError as e:
                reason = str(e).split(': ', 1)[-1].split('. To place', 1)[0]
        local = [Path(weights_dir) / filename] if weights_dir else []
        found = [p for p in local + [published_cache(repo, revision) / filename] if p.is_file()]
        if found:
            paths[name] = found[0]
        else:
            missing.append(filename)
    if missing:
        raise WeightsMissing(missing_message(missing, reason, weights_dir, repo, revision))
    return paths


def published_cache(repo=PUBLISHED_REPO, revision='main'):
    """Where data.hf_file caches `repo`'s files: cache_dir()/<owner>--<name>/<revision>/."""
    return cache_dir() / repo.replace('/', '--') / revision


def missing_message(missing, reason, weights_dir, repo, revision):
    files = '\n'.join(f'    {f}' for f in missing)
    where = f'the folder {weights_dir} (--weights-dir)' if weights_dir else 'the --weights-dir folder'
    return (f'the published Resonate weights are not on this machine and could not be downloaded ({reason}).\n'
            f'Fetch these files from https://huggingface.co/{repo}/tree/{revision} on a machine with access:\n'
            f'{files}\n'
            f'and put them, keeping the sub-folder, in {where}, or in the cache folder\n'
            f'    {published_cache(repo, revision)}\n'
            f'(set NANORESONATE_CACHE to move the cache, HF_ENDPOINT for a mirror, HF_TOKEN for a gated copy).')


def load_published(transformer_state=None, weights_dir=None, which='grpo', text_encoder=None, vocoder='auto'):
    """The released system: transformer (`which` = 'grpo' or 'pt', unless `transformer_state` is given),
    VAE `v1-44.pth`, BigVGAN v2 and FLAN-T5-large. Sizes are read from the files (state-dict shapes and the
    vocoder's config.json), so any files of the published formats load. Raises WeightsMissing, ValueError."""
    from transformer import Resonate, load_released_state_dict, load_text_encoder
    if which not in ('grpo', 'pt'):
        raise ValueError(f"published weights are 'grpo' or 'pt', got {which!r}")
    names = ([] if transformer_state is not None else [which]) + ['vae']
    paths = published_paths(names + (['vocoder_config', 'vocoder'] if vocoder != 'griffin-lim' else []), weights_dir)
    state = transformer_state if transformer_state is not None else read_weights(paths[which])
    net = Resonate.from_config(transformer_config(state), device='meta')
    load_released_state_dict(net, state)
    vae_net, mel_cfg = load_published_vae(paths['vae'])
    voc = griffin_lim_vocoder(mel_cfg) if vocoder == 'griffin-lim' else load_bigvgan_files(
        paths['vocoder_config'], paths['vocoder'])
    local_t5 = Path(weights_dir, PUBLISHED_TEXT_ENCODER) if weights_dir else None
    encoder = text_encoder or (str(local_t5) if local_t5 and local_t5.is_dir() else PUBLISHED_TEXT_ENCODER)
    return check_pipeline(Pipeline(net, vae_net, voc, load_text_encoder(encoder), mel_cfg))


def transformer_config(state, **overrides):
    """ResonateConfig of a released-format transformer state dict, read from its tensor shapes (the released
    files hold no config): widths from the input projections, block counts from the keys, heads from the
    QK-norm width, the feed-forward ratio from the SwiGLU width. Raises ValueError if the shapes fit no config."""
    from transformer import ResonateConfig
    try:
        D, C, _ = state['audio_input_proj.0.weight'].shape
        joint = 1 + max(int(k.split('.')[1]) for k in state if k.startswith('joint_blocks.'))
        fused = 1 + max((int(k.split('.')[1]) for k in state if k.startswith('fused_blocks.')), default=-1)
        head_dim = state['joint_blocks.0.latent_block.attn.q_norm.weight'].shape[0]
        ffn = state['joint_blocks.0.latent_block.ffn.w1.weight'].shape[0]
        args = dict(latent_dim=C, text_dim=state['text_input_proj.0.weight'].shape[1],
                    text_c_dim=state['text_cond_proj.0.weight'].shape[1], hidden_dim=D, depth=joint + fused,
                    fused_depth=fused, num_heads=D // head_dim, text_seq_len=state['empty_string_feat'].shape[0])
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f'not a released Resonate transformer state dict ({e!r} missing or malformed)') from None
    # SwiGLU width = 256 * ceil(int(2/3 * D * ratio) / 256); the released ratio 4 first, then any half-step
    ratios = [r for r in [4.0] + [x / 2 for x in range(2, 17)] if 256 * math.ceil(int(2 * D * r / 3) / 256) == ffn]
    if not ratios:
        raise ValueError(f'feed-forward width {ffn} fits no mlp_ratio for hidden width {D}')
    return ResonateConfig(**{**args, 'mlp_ratio': ratios[0], **overrides})


def load_published_vae(path):
    """A training-format VAE file (`v1-44.pth`) -> (MelVAE with weights normalised once, its mel config). Sizes
    come from the shapes; the mel config from the number of bins (128 -> 44k, 80 -> 16k)."""
    from vae import MEL_CONFIGS, MelVAE
    state = read_weights(path)
    try:
        args = dict(data_dim=state['data_mean'].shape[1], embed_dim=state['decoder.conv_in.weight'].shape[1],
                    hidden_dim=state['decoder.conv_out.weight'].shape[1])
    except KeyError as e:
        raise ValueError(f'{path} is not a mel VAE state dict ({e} missing)') from None
    mel_cfg = {c['n_mels']: c for c in MEL_CONFIGS.values()}.get(args['data_dim'])
    if mel_cfg is None:
        raise ValueError(f'{path}: a VAE with {args["data_dim"]} mel bins matches no mel config (128 or 80)')
    vae_net = MelVAE(**args)
    vae_net.load_state_dict(state)
    return vae_net.fold_weight_norm(), mel_cfg


def load_bigvgan_files(config_path, weights_path):
    """BigVGAN from its config.json and `bigvgan_generator.pt` ({"generator": state dict}, weight_g/weight_v
    naming; weight norm is folded at load)."""
    from vae import BigVGAN
    model = BigVGAN.from_config(json.loads(Path(config_path).read_text()))
    model.config = json.loads(Path(config_path).read_text())
    state = read_weights(weights_path)
    model.load_state_dict(state['generator'] if 'generator' in state else state, strict=True)
    return model.eval()


def load_published_vocoder(weights_dir=None):
    paths = published_paths(['vocoder_config', 'vocoder'], weights_dir)
    return load_bigvgan_files(paths['vocoder_config'], paths['vocoder'])


def check_pipeline(pipe):
    """Raise ValueError when the parts do not fit together (latent channels, mel bins, hop length, rate)."""
    net, vae_net, voc, mel = pipe.transformer, pipe.vae, pipe.vocoder, pipe.mel_cfg
    if net.cfg.latent_dim != vae_net.embed_dim:
        raise ValueError(f'the transformer makes {net.cfg.latent_dim} latent channels but the VAE takes '
                         f'{vae_net.embed_dim}')
    if vae_net.data_dim != mel['n_mels']:
        raise ValueError(f'the VAE makes {vae_net.data_dim} mel bins but the mel config has {mel["n_mels"]}')
    if isinstance(voc, torch.nn.Module):
        cfg = getattr(voc, 'config', {})
        if voc.num_mels != mel['n_mels'] or voc.upsample_factor != mel['hop_length'] or \
                cfg.get('sampling_rate', mel['sample_rate']) != mel['sample_rate']:
            raise ValueError(f'the vocoder ({voc.num_mels} mels, hop {voc.upsample_factor}, '
                             f'{cfg.get("sampling_rate", "?")} Hz) does not fit the VAE\'s mel config '
                             f'({mel["n_mels"]} mels, hop {mel["hop_length"]}, {mel["sample_rate"]} Hz)')
    return pipe


# -----------------------------------------------------------------------------
# generation

def make_noise(seeds, frames, channels):
    """Initial noise (B, N, C), item i drawn on the CPU from its own seed or its own torch.Generator (which
    advances): the same seed gives the same audio on every device and whatever else shares the batch."""
    return torch.stack([torch.randn(frames, channels, generator=_stream(s)) for s in seeds])


def _stream(seed):
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def generate(prompts, pipeline=None, duration=10.0, steps=25, cfg=4.5, negative=None, seed=42, num_samples=1,
             batch_size=8, progress=True, **load_kwargs):
    """Text -> audio. prompts: list of captions. Returns (audio (len(prompts) * num_samples, S) float32 CPU
    tensor in [-1, 1] with S = round(duration * sample_rate), sample_rate in Hz); the samples of prompt i are rows i * num_samples ... (i + 1) *
    num_samples - 1. Without `pipeline`, `load_pipeline(**load_kwargs)` builds one (the published GRPO weights).

    duration in seconds (1 to the model's longest, 47.5 s for the released model), steps = NFE of the Euler
    sampler (the conditional and unconditional branches share one batched forward), cfg = guidance scale,
    negative = a caption whose features replace the empty-string features of the unconditional branch.
    Sample k of every prompt starts from noise seeded with seed + k, so a prompt's audio depends on the seed
    alone, not on the other prompts or on batch_size. `seed` may instead be a list of one seed or
    torch.Generator per prompt (e.g. data.seeded_generator(42, prompt_id)): sample k is its k-th draw.
    Raises ValueError for a duration out of range, an empty prompt list, a seed list of another length or a
    pipeline without text encoder."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError('no prompts given')
    pipe = pipeline or load_pipeline(**load_kwargs)
    check_duration(duration, pipe)
    if pipe.text_encoder is None:
        raise ValueError('this pipeline has no text encoder; call Pipeline.synthesize with text features')
    jobs = [p for p in prompts for _ in range(num_samples)]
    if isinstance(seed, (list, tuple)):  # one stream per prompt, drawn in turn by its samples
        if len(seed) != len(prompts):
            raise ValueError(f'seed: a list needs one seed per prompt, got {len(seed)} for {len(prompts)} prompts')
        streams = [_stream(s) for s in seed]
        seeds = [streams[j // num_samples] for j in range(len(jobs))]
    else:
        seeds = [seed + j % num_samples for j in range(len(jobs))]  # sample k of a prompt: seed + k
    frames = pipe.latent_frames(duration)
    model = pipe.transformer
    device, dtype = model.latent_mean.device, model.latent_mean.dtype
    neg = [x.to(device, dtype) for x in pipe.text_encoder.encode([negative])] if negative else None
    out = []
    batches = range(0, len(jobs), batch_size)
    for start in tqdm(batches, desc='batches', disable=not progress or len(batches) == 1):
        batch = jobs[start:start + batch_size]
        text_f, text_f_c = (x.to(device, dtype) for x in pipe.text_encoder.encode(batch))  # (B, 77, Dt), (B, Dc)
        noise = make_noise(seeds[start:start + batch_size], frames, model.cfg.latent_dim)
        noise = noise.to(device, dtype)
        _, _, wave = pipe.synthesize(text_f, text_f_c, noise, steps, cfg, *(neg or (None, None)),
                                     progress=progress)
        out.append(wave[:, 0, :round(duration * pipe.sample_rate)].cpu())  # (B, S) exactly `duration` long
    return torch.cat(out), pipe.sample_rate


def check_duration(duration, pipe):
    """Raise ValueError unless 1 s <= duration <= the model's longest clip."""
    longest = pipe.max_duration()
    if not 1.0 <= duration <= longest:
        raise ValueError(f'--duration must be between 1 and {longest:.1f} seconds for this model, got {duration}')


# -----------------------------------------------------------------------------
# command line

def safe_name(text, limit=80):
    """A file name from a prompt: ASCII letters, digits, '-' and '_' only, at most `limit` characters."""
    return re.sub(r'[^A-Za-z0-9-]+', '_', text).strip('_-')[:limit].rstrip('_-') or 'sample'


def unused_path(path, overwrite, taken=()):
    """`path`, or path with -1, -2, ... before the extension if it exists or is in `taken` (unless overwrite)."""
    if overwrite or not (os.path.exists(path) or path in taken):
        return path
    root, ext = os.path.splitext(path)
    i = 1
    while os.path.exists(f'{root}-{i}{ext}') or f'{root}-{i}{ext}' in taken:
        i += 1
    print(f'{path} exists; writing {root}-{i}{ext} instead (--overwrite replaces it)')
    return f'{root}-{i}{ext}'


def write_wav(path, audio, sample_rate):
    """Write (S,) float audio in [-1, 1] as a 16-bit PCM WAV."""
    import soundfile as sf
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(path, audio.clamp(-1, 1).numpy(), sample_rate, subtype='PCM_16')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('prompt', nargs='*', help='caption(s) to generate')
    p.add_argument('--prompts-file', '--prompt-file',
                   help='one prompt a line, or a TTA-Bench JSON (files named by prompt id)')
    p.add_argument('--ckpt', help='train.py ckpt.pt or a published transformer .pth (default: published weights)')
    p.add_argument('--weights', default='grpo', choices=['grpo', 'pt'], help='which published transformer')
    p.add_argument('--weights-dir', help='folder holding the published files (otherwise cache or download)')
    p.add_argument('--text-encoder', help='text encoder name or folder (default: the checkpoint\'s / FLAN-T5-large)')
    p.add_argument('--vocoder', default='auto', choices=['auto', 'bigvgan', 'griffin-lim'])
    p.add_argument('--out', help='output WAV (one prompt and one sample only)')
    p.add_argument('--out-dir', default='samples', help='folder for outputs named after the prompts')
    p.add_argument('--duration', type=float, default=10.0, help='seconds, 1 to 47')
    p.add_argument('--steps', type=int, default=25, help='Euler steps')
    p.add_argument('--cfg', type=float, default=4.5, help='classifier-free guidance scale')
    p.add_argument('--negative', help='negative prompt for the unconditional branch (default: the stored '
                                      'empty-string features)')
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--num-samples', type=int, default=1, help='samples per prompt')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--device', default='auto', help='auto (cuda, then mps, then cpu), cuda, mps or cpu')
    p.add_argument('--dtype', default='fp32', choices=sorted(DTYPES))
    p.add_argument('--overwrite', action='store_true', help='replace existing files')
    p.add_argument('--best-of', type=int, default=1, help='generate N candidates per sample, keep the one --reward '
                                                         'scores highest')
    p.add_argument('--reward', default='clap', help='reward.build_reward spec for --best-of, e.g. clap, '
                                                   'qwen_omni, loudness:1.0')
    # train.py's spelling works too: --weights_dir=... is --weights-dir=...
    argv = [re.sub(r'^--(\w+)', lambda m: '--' + m.group(1).replace('_', '-'), a) if a.startswith('--') else a
            for a in (sys.argv[1:] if argv is None else argv)]
    args = p.parse_args(argv)
    for name in ('steps', 'num_samples', 'batch_size', 'best_of'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be at least 1')
    if not 1.0 <= args.duration <= 47.5:  # the model may allow less; checked again once it is loaded
        p.error(f'--duration must be between 1 and 47.5 seconds, got {args.duration}')
    return p, args


def best_of(audio, sample_rate, prompts, n, reward):
    """Keep the highest-scoring of each run of n candidates.

    audio: (P * n, S) with the candidates of output i in rows i * n ... i * n + n - 1 (as `generate` orders
    num_samples); prompts: P captions; reward: an object with reward.py's score(audio, sample_rate, prompts).
    Returns audio (P, S) and scores (P, n). Raises ValueError if the rows are not P * n."""
    if audio.shape[0] != len(prompts) * n:
        raise ValueError(f'best_of: {audio.shape[0]} clips for {len(prompts)} prompts x {n} candidates')
    scores = reward.score(audio, sample_rate, [p for p in prompts for _ in range(n)]).float().cpu().view(-1, n)
    best = scores.argmax(1)  # (P,)
    return audio.view(len(prompts), n, -1)[torch.arange(len(prompts)), best], scores


def main(argv=None):
    p, args = parse_args(argv)
    try:
        items = [(None, x) for x in args.prompt] + (read_prompts(args.prompts_file) if args.prompts_file else [])
    except (ValueError, OSError) as e:
        p.error(str(e))
    if any(not x.strip() for x in args.prompt):
        p.error('a prompt is empty: give a caption such as "rain on a tin roof"')
    if args.prompts_file and len(items) == len(args.prompt):
        p.error(f'--prompts-file {args.prompts_file} holds no prompts')
    if not items:
        p.error('give a prompt, e.g. python sample.py "rain on a tin roof", or --prompts-file')
    if args.out and len(items) * args.num_samples != 1:
        p.error('--out names one file: use --out-dir for several prompts or samples')
    if args.out and not args.out.lower().endswith('.wav'):
        p.error(f'--out {args.out!r} must name a .wav file')
    try:
        pipe = load_pipeline(args.ckpt, args.weights_dir, args.device, args.dtype, args.weights, args.text_encoder,
                             args.vocoder)
        check_duration(args.duration, pipe)
        audio, sr = generate([x for _, x in items], pipe, args.duration, args.steps, args.cfg, args.negative,
                             args.seed, args.num_samples * args.best_of, args.batch_size)
        if args.best_of > 1:
            from reward import build_reward
            prompts = [x for _, x in items for _ in range(args.num_samples)]
            audio, scores = best_of(audio, sr, prompts, args.best_of, build_reward(args.reward, device=args.device
                                                                                   if args.device != 'auto' else None))
            print(f'best of {args.best_of} by {args.reward}: mean score {scores.max(1).values.mean():.4f} '
                  f'(all candidates {scores.mean():.4f})')
    except (ValueError, OSError, DownloadError) as e:
        sys.exit(f'error: {e}')
    written = set()
    for i, wave in enumerate(audio):
        pid, prompt = items[i // args.num_samples]
        name = safe_name(pid) if pid else safe_name(prompt)
        if args.num_samples > 1:
            name += f'_{i % args.num_samples}'
        path = unused_path(args.out or os.path.join(args.out_dir, name + '.wav'), args.overwrite, written)
        write_wav(path, wave, sr)
        written.add(path)
        print(f'wrote {path} ({wave.numel() / sr:.2f} s at {sr} Hz)')


if __name__ == '__main__':
    main()
