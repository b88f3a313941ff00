"""Benchmarks of the generation pipeline: --mode=eval scores TTA-Bench's accuracy subset (arXiv 2509.02398) as the
paper does (arXiv 2603.11661); --mode=speed times each part and counts its FLOPs, on random weights.

$ python bench.py --mode=eval                                     # TTA-Bench: the paper's table, resumable
$ torchrun --standalone --nproc_per_node=8 bench.py --mode=eval   # the same, prompts sharded over 8 GPUs
$ python bench.py --mode=eval --audio_dir=tangoflux --out_dir=out/tangoflux   # score another system's WAVs
$ python bench.py --mode=eval --ckpt=out/ckpt.pt --metrics=loudness,centroid --limit=20   # no download
$ python bench.py --mode=speed                                    # full size, 2 s clip, fp32, this machine
$ python bench.py --mode=speed --duration=10 --dtype=bf16 --threads=2
"""
import gc
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import soundfile
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm
from transformers import T5Config, T5EncoderModel

import data
import reward
from flow import guided_velocity
from sample import check_settings, generate, load_pipeline, write_wav
from transformer import MODELS, Resonate, load_text_encoder, text_encoder_dtype
from vae import BIGVGAN_CONFIGS, MEL_CONFIGS, VAES, BigVGAN, GriffinLim, num_latent_frames

# -----------------------------------------------------------------------------
mode = 'speed'  # a key of MODES
size = 'resonate_m_44k'  # transformer size, a key of transformer.MODELS
vae = 'vae_44k'  # a key of vae.VAES; its latent channels set the transformer's
vocoder = 'bigvgan_v2_44khz_128band_512x'  # a key of vae.BIGVGAN_CONFIGS, or 'griffin-lim' (eval: else the model's own)
mel = '44k'  # a key of vae.MEL_CONFIGS (sample rate, hop length); the vocoder must take its bins and hop
text_encoder = 'flan-t5-large-random'  # random weights of FLAN-T5-large's (or 't5-tiny-random') shape, or a name or
# folder to load (eval: a name or folder replaces the model's own text encoder; the random names keep it)
duration = 2.0  # seconds of audio per clip (eval: 10)
batch_size = 1  # clips generated together (eval: 16)
steps = 25  # Euler steps (one batched CFG forward each)
cfg_strength = 4.5  # guidance scale; 1 = no unconditional branch
device = 'auto'  # auto (cuda, mps, cpu), cuda, mps, cpu
dtype = 'fp32'  # fp32, bf16, fp16 for the transformer, VAE and vocoder; auto = bf16 on CUDA, else fp32 (eval: auto)
threads = 0  # CPU threads for torch; 0 keeps torch's default
repeats = 3  # timed runs of each part; the fastest is reported
parts = 'text,transformer,vae,vocoder'  # which parts to time, comma-separated
probe_size = 2048  # n of the n x n x n matmul probe
seed = 0  # (eval: 42, as released)
# eval
prompts = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', 'tta_bench_acc.json')  # TTA-Bench JSON
limit = 0  # only the first N prompts of the file; 0 = all
ckpt = ''  # a train.py ckpt.pt or a published transformer .pth; '' = the published --weights
weights = 'grpo'  # the published transformer: grpo (Resonate-GRPO) or pt (Resonate-PT)
weights_dir = ''  # folder holding the published files; '' = the Hugging Face cache, else download
metrics = 'aes,clap,aqa'  # reward.REWARDS names, comma-separated; loudness and centroid need no download
metric_kwargs = {}  # {metric: constructor kwargs}, e.g. {'aes': {'weights_dir': 'w/aes'}}: set in a config/*.py
# preset or from Python (built models too); a dict is no --key=value setting
score_batch_size = 16  # clips per metric call
out_dir = 'out/tta_bench'  # generated <id>.wav, generation.json, scores.jsonl, summary.json
audio_dir = ''  # score this folder of <id>.wav (any system's) instead of generating
# -----------------------------------------------------------------------------
MODE_DEFAULTS = {'eval': dict(duration=10.0, batch_size=16, seed=42, dtype='auto')}  # as the released evaluation
SPEED_PARTS = ('text', 'transformer', 'vae', 'vocoder')


def configure(argv):
    """data.configure on these settings after MODE_DEFAULTS[X] of a --mode=X in argv: the user's settings beat them."""
    for name in (arg[len('--mode='):] for arg in argv if arg.startswith('--mode=')):
        globals().update(MODE_DEFAULTS.get(name, {}))
    data.configure(globals(), argv)


def check():
    """Raise ValueError naming the first setting that cannot work, and its fix, before anything is loaded."""
    for key, allowed in (('mode', MODES), ('dtype', [*data.DTYPES, 'auto']), ('size', MODELS), ('vae', VAES),
                         ('mel', MEL_CONFIGS), ('vocoder', [*BIGVGAN_CONFIGS, 'griffin-lim'])):
        if globals()[key] not in allowed:
            raise ValueError(f'--{key} must be one of {sorted(allowed)}, got {globals()[key]!r}')
    data.pick_device(device)
    check_settings(['-'], duration, steps, cfg_strength, seed, 1, batch_size,
                   extra=(('repeats', repeats), ('probe_size', probe_size), ('score_batch_size', score_batch_size)))
    problems = [(threads < 0, f'--threads must be 0 (torch\'s default) or a number of threads, got {threads}')]
    for bad, message in problems + (speed_problems() if mode == 'speed' else eval_problems()):
        if bad:
            raise ValueError(message)


def speed_problems():
    m = MEL_CONFIGS[mel]  # a vocoder fits when it takes its mel bins and upsamples by its hop
    fits = [v for v, c in BIGVGAN_CONFIGS.items()
            if (c['num_mels'], math.prod(c['upsample_rates'])) == (m['n_mels'], m['hop_length'])] + ['griffin-lim']
    longest = MODELS[size]().max_latent_len * 2 * m['hop_length'] / m['sample_rate']  # RoPE's range, in seconds
    return [(duration > longest, f'--duration must be at most {math.floor(longest * 10) / 10} s for --size={size}, '
                                 f'got {duration}'),
            (set(parts.split(',')) - set(SPEED_PARTS), f'--parts takes {",".join(SPEED_PARTS)}, got {parts!r}'),
            (vocoder not in fits, f'--vocoder={vocoder} does not take the {m["n_mels"]} mel bins at hop '
                                  f'{m["hop_length"]} of --mel={mel}; use --vocoder={" or ".join(fits)}')]


def dtype_name(dev):
    return ('bf16' if dev.type == 'cuda' else 'fp32') if dtype == 'auto' else dtype  # auto: as the released evaluation


# -----------------------------------------------------------------------------
# speed: seconds per generated second, FLOPs and FLOP/s of each part

def timed(fn, dev, n):
    """Fastest of n runs of fn() in seconds, after one warm-up run."""
    seconds = []
    for _ in range(n + 1):
        t0 = time.perf_counter()
        fn()
        if dev.type != 'cpu':  # kernels run asynchronously: wait for them before reading the clock
            torch.accelerator.synchronize(dev)
        seconds.append(time.perf_counter() - t0)
    return min(seconds[1:])


def random_weights(build):
    """build() on the meta device, then filled on the CPU with N(0, 0.02) weights (allocates once, no init cost)."""
    with torch.device('meta'):
        module = build()
    module.to_empty(device='cpu')
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
        for name, b in module.named_buffers():
            if b.is_floating_point():  # statistics: mean 0, std 1
                b.fill_(1.0 if name.endswith('std') else 0.0)
    return module


RANDOM_TEXT_ENCODERS = {  # speed's random stand-ins (T5Config fields); under eval these names mean the model's own
    'flan-t5-large-random': dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
    't5-tiny-random': dict(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)}


def build_text_encoder(dev, dt):
    """(encode(B captions) -> (text_f (B, 77, D), text_f_c (B, D)), D) on dev: the named encoder, or a T5 of
    RANDOM_TEXT_ENCODERS' shape with random weights, fed random token ids (77 per caption, as released)."""
    dt = text_encoder_dtype(dt)
    if text_encoder not in RANDOM_TEXT_ENCODERS:
        enc = load_text_encoder(text_encoder).to(dev, dt)
        return enc.encode, enc.dim
    config = T5Config(vocab_size=32128, feed_forward_proj='gated-gelu', is_encoder_decoder=False, use_cache=False,
                      **RANDOM_TEXT_ENCODERS[text_encoder])
    model = random_weights(lambda: T5EncoderModel(config)).eval().to(dev, dt)

    def encode(prompts):
        ids = torch.randint(0, config.vocab_size, (len(prompts), 77), device=dev)
        text_f = model(input_ids=ids).last_hidden_state.float()
        return text_f, text_f.mean(1)  # pooled over all 77 positions, as released
    return encode, config.d_model


def speed_calls(dev, dt):
    """{part: (one call, calls per clip batch)} of random-weight parts on random inputs, and the latent frames."""
    encode, text_dim = build_text_encoder(dev, dt)
    vae_net = random_weights(VAES[vae]).fold_weight_norm()
    cfg_t = MODELS[size](latent_dim=vae_net.embed_dim, text_dim=text_dim, text_c_dim=text_dim)
    net = random_weights(lambda: Resonate(cfg_t))
    mel_cfg = MEL_CONFIGS[mel]
    # BigVGAN keeps its own init: its fixed Kaiser-sinc filters are buffers that random_weights would erase
    voc = GriffinLim(mel_cfg) if vocoder == 'griffin-lim' else BigVGAN.from_config(BIGVGAN_CONFIGS[vocoder])
    net, vae_net, voc = (m.eval().to(dev, dt) for m in (net, vae_net, voc))
    N, B, C = num_latent_frames(duration, mel_cfg, cover=True), batch_size, net.cfg.latent_dim
    captions = ['rain on a tin roof'] * B
    text_f, text_f_c = (c.to(dev, dt) for c in encode(captions))
    neg_f, neg_f_c = (c.to(dev, dt) for c in net.empty_conditions(B))
    x, z = torch.randn(B, N, C, device=dev, dtype=dt), torch.randn(B, C, N, device=dev, dtype=dt)  # noisy, VAE latents
    t = torch.full((B,), 0.5, device=dev, dtype=dt)
    mel_in = torch.randn(B, mel_cfg['n_mels'], 2 * N, device=dev, dtype=dt)
    calls = {'text': (lambda: encode(captions), 1),
             'transformer': (lambda: guided_velocity(net, x, t, text_f, text_f_c, neg_f, neg_f_c, cfg_strength), steps),
             'vae': (lambda: vae_net.decode(z), 1), 'vocoder': (lambda: voc(mel_in), 1)}
    return {name: calls[name] for name in SPEED_PARTS if name in parts.split(',')}, N


@torch.no_grad()
def bench_speed():
    """Seconds per generated second, FLOPs and FLOP/s of each part of the pipeline on this machine."""
    dev = data.pick_device(device)
    dt = data.DTYPES[dtype_name(dev)]
    data.warn_if_slow_bf16(str(dev), dtype_name(dev))  # the probe shows it too, but only after the work
    torch.manual_seed(seed)
    calls, N = speed_calls(dev, dt)
    a, b = torch.randn(2, probe_size, probe_size, device=dev, dtype=dt)
    probe = 2 * probe_size ** 3 / timed(lambda: a @ b, dev, repeats)  # FLOP/s: what this machine's GEMM reaches
    print(f'{size} on {dev} ({torch.get_num_threads()} threads), {dtype_name(dev)}, {batch_size} x {duration:g} s '
          f'clip, {N} latent frames, {steps} steps, CFG {cfg_strength:g}; matmul probe {probe / 1e9:.0f} GFLOP/s')
    print(f'{"part":<14}{"ms/call":>10}{"calls":>7}{"s per gen s":>13}{"GFLOP/call":>12}{"GFLOP/s":>9}{"of probe":>10}')
    results = {}
    for name, (fn, n_calls) in calls.items():
        with FlopCounterMode(display=False) as counter:  # matmuls, convolutions and attention
            fn()
        flops, seconds = counter.get_total_flops(), timed(fn, dev, repeats)
        per_second = seconds * n_calls / (batch_size * duration)
        results[name] = dict(seconds=seconds, calls=n_calls, per_generated_second=per_second, flops=flops)
        print(f'{name:<14}{seconds * 1e3:>10.1f}{n_calls:>7}{per_second:>13.3f}{flops / 1e9:>12.1f}'
              f'{flops / seconds / 1e9:>9.0f}{flops / seconds / probe:>10.0%}')
    total = sum(r['per_generated_second'] for r in results.values())
    print(f'{"total":<14}{"":>17}{total:>13.3f}   (real-time factor {1 / total:.2f}x)')
    return dict(probe_flops_per_s=probe, parts=results, seconds_per_generated_second=total)


# -----------------------------------------------------------------------------
# eval: TTA-Bench, generated and scored in one resumable, sharded command

PAPER = {  # TTA-Bench accuracy subset, 1,500 prompts (arXiv 2603.11661): PQ, CU, CLAPScore, AQAScore
    'Resonate-GRPO': (6.064, 5.328, 0.476, 0.737),
    'Resonate-PT': (5.923, 5.238, 0.458, 0.651),
    'MeanAudio-L': (5.743, 5.151, 0.469, 0.729),
    'TangoFlux': (5.782, 5.074, 0.472, 0.677)}
PAPER_COLUMNS = {'PQ': 'PQ', 'CU': 'CU', 'CLAPScore': 'clap', 'AQAScore': 'aqa'}  # the paper's header -> our column


def eval_problems():
    names = metric_names()
    return [
        (not names or set(names) - set(reward.REWARDS),
         f'--metrics takes names of reward.REWARDS ({", ".join(sorted(reward.REWARDS))}), got {metrics!r}'),
        (len(set(names)) < len(names), f'--metrics names a metric twice: {metrics!r}'),
        (set(metric_kwargs) - set(names), f'--metric_kwargs names {sorted(metric_kwargs)}; not all are --metrics'),
        (not (os.path.isfile(prompts) and prompts.endswith('.json')),
         f'--prompts {prompts!r} is no TTA-Bench JSON file; give one such as config/tta_bench_acc.json'),
        (limit < 0, f'--limit must be 0 (every prompt) or a number of prompts, got {limit}'),
        (audio_dir and not os.path.isdir(audio_dir), f'--audio_dir {audio_dir!r} is not a folder of <id>.wav files'),
        (not audio_dir and ckpt and not os.path.isfile(ckpt), f'--ckpt {ckpt!r} is no file; give a ckpt.pt or .pth'),
        (weights not in ('grpo', 'pt'), f"--weights must be 'grpo' or 'pt', got {weights!r}")]


def metric_names():
    return [m.strip() for m in metrics.split(',') if m.strip()]


def eval_inputs():
    """The (id, caption) pairs of the first --limit prompts and {id: reason} of the skipped ones. Raises ValueError
    for prompts or an out_dir that cannot serve, and for an out_dir of clips generated with other settings."""
    entries = data.read_prompts(prompts, keep_unusable=True)
    ids = [i for i, _ in entries]
    bad = [i for i in ids if not re.fullmatch(r'[A-Za-z0-9_][A-Za-z0-9_.-]*', i)]
    if bad or len(set(ids)) < len(ids):
        raise ValueError(f'--prompts {prompts}: ids must be unique file names (letters, digits, _ . -); '
                         f'{bad[:3] or "some ids repeat"}')
    data.check_writable(out_dir, '--out_dir')
    record = os.path.join(out_dir, 'generation.json')
    clips = any(os.path.isfile(wav_path(out_dir, i)) for i in ids)  # a failed first run leaves only the record
    if not audio_dir and clips and os.path.isfile(record):  # resuming must not mix clips of other settings
        old = json.loads(Path(record).read_text())
        now = generation_settings(data.pick_device(device))
        changed = [f'{k}={old.get(k)!r} (now {v!r})' for k, v in now.items() if old.get(k) != v]
        if changed:
            raise ValueError(f'--out_dir {out_dir} holds clips generated with {", ".join(changed)}; resume with '
                             f'those settings or choose another --out_dir')
    entries = entries[:limit or None]
    return [(i, c) for i, c in entries if c], {i: 'empty, null or non-text prompt_text' for i, c in entries if not c}


def generation_settings(dev):
    """What a generated clip depends on (not batch_size, not the number of processes)."""
    return dict(ckpt=os.path.abspath(ckpt) if ckpt else None, weights=None if ckpt else weights,
                duration=duration, steps=steps, cfg_strength=cfg_strength, seed=seed, dtype=dtype_name(dev),
                vocoder='griffin-lim' if vocoder == 'griffin-lim' else 'auto',  # else the model's own
                text_encoder=None if text_encoder in RANDOM_TEXT_ENCODERS else text_encoder)


def bench_eval(items, skipped):
    """Generate the missing clips, score every clip, write the results; returns the summary on rank 0, else None."""
    rank, world, dev = data.init_distributed(device)
    if rank == 0:
        print(f'eval: {len(items) + len(skipped)} prompts of {prompts} ({len(skipped)} skipped), {world} '
              f'process(es) on {dev}, metrics {metrics}')
    if not audio_dir:
        generate_missing(items, rank, world, dev)
    rows, unreadable = score_clips(items, audio_dir or out_dir, rank, world, dev)
    parts = data.all_gather_objects((rows, unreadable))
    rows = [row for part, _ in parts for row in part]
    unreadable = {pid: why for _, part in parts for pid, why in part.items()}
    summary = write_results(items, rows, {**skipped, **unreadable}, dev) if rank == 0 else None
    if data.is_distributed():
        dist.destroy_process_group()
    return summary


def wav_path(folder, pid):
    return os.path.join(folder, f'{pid}.wav')


def generate_missing(items, rank, world, dev):
    """Write out_dir/<id>.wav for each (id, caption) without a complete clip; this rank takes every world-th."""
    todo = [(pid, text) for pid, text in items if not complete_wav(wav_path(out_dir, pid))]
    data.all_gather_objects(None)  # a barrier: every rank lists the same clips before any is written
    if rank == 0:
        write_text(os.path.join(out_dir, 'generation.json'), json.dumps(generation_settings(dev), indent=1))
        print(f'{len(items) - len(todo)} of {len(items)} clips are in {out_dir}; generating {len(todo)}')
    mine = todo[rank::world]
    if mine:
        pipe = load_eval_pipeline(dev)
        with tqdm(total=len(mine), unit='clip', desc='generate', disable=rank != 0) as bar:
            for start in range(0, len(mine), batch_size):
                batch = mine[start:start + batch_size]  # each clip's noise depends on its id alone
                audio, sr = generate([text for _, text in batch], pipe, duration, steps, cfg_strength, seed=[
                    data.seeded_generator(seed, pid) for pid, _ in batch], batch_size=len(batch), progress=False)
                for (pid, _), wave in zip(batch, audio):  # (S,) each
                    write_wav(wav_path(out_dir, pid), wave, sr)  # atomic: a clip is complete or absent
                bar.update(len(batch))
        del pipe
        release()
    data.all_gather_objects(None)  # a barrier: every clip is written before any rank scores


def clip_problem(path):
    """Why a clip cannot be scored (missing or unreadable, empty, NaN or inf samples), or None."""
    try:
        samples = torch.from_numpy(soundfile.read(path, dtype='float32')[0])
    except (soundfile.SoundFileError, RuntimeError, OSError):
        return 'missing or unreadable'
    return 'empty' if not samples.numel() else None if samples.isfinite().all() else 'NaN or inf samples'


def complete_wav(path):
    try:
        info = soundfile.info(path)
    except (soundfile.SoundFileError, RuntimeError, OSError):  # missing or unreadable
        return False
    return info.frames == round(duration * info.samplerate)


def load_eval_pipeline(dev):
    s = generation_settings(dev)
    try:
        pipe = load_pipeline(ckpt or None, weights_dir or None, dev, s['dtype'], weights, s['text_encoder'],
                             s['vocoder'])
        check_settings(['-'], duration, steps, cfg_strength, seed, 1, batch_size, pipe.max_duration())
    except (ValueError, OSError) as e:
        sys.exit(f'error: {e}')
    return pipe


def write_text(path, text):
    data.write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))


def release():
    """Return freed model memory to the device, so that the next model's peak is its own, not a sum."""
    gc.collect()
    torch.cuda.empty_cache()  # a no-op where CUDA is not in use


@torch.no_grad()
def score_clips(items, folder, rank, world, dev):
    """This rank's rows {'id', 'prompt', column: value}, one scorer at a time, and {id: reason} of unreadable clips."""
    problems = {pid: clip_problem(wav_path(folder, pid)) for pid, _ in items[rank::world]}  # each file read by one rank
    unreadable = {pid: f'{pid}.wav in {folder}: {problem}' for pid, problem in problems.items() if problem}
    mine = [(pid, text) for pid, text in items[rank::world] if pid not in unreadable]
    columns = {'id': [pid for pid, _ in mine], 'prompt': [text for _, text in mine]}
    for name in metric_names() if mine else []:
        torch.manual_seed(seed)  # scorers that draw random numbers repeat run to run
        scorer = build_metric(name, dev)
        with tqdm(total=len(mine), unit='clip', desc=name, disable=rank != 0) as bar:
            for ids, captions, audio, sr in clip_batches(mine, folder):
                for key, values in scorer.score_all(audio, sr, captions, ids).items():  # (B,) each
                    columns.setdefault(name if key == 'score' else key, []).extend(values.float().cpu().tolist())
                bar.update(len(captions))
        del scorer  # before the next one is built
        release()
    assert all(len(v) == len(mine) for v in columns.values()), f'a column of {metrics} is short or named twice'
    return [dict(zip(columns, row)) for row in zip(*columns.values())], unreadable


def build_metric(name, dev):
    try:
        return reward.build_reward({name: dict(metric_kwargs.get(name, {}))}, dev).terms[name][0]
    except (ValueError, TypeError, OSError) as e:  # a model not on this machine, kwargs that do not fit
        hint = ''
        if isinstance(e, data.WeightsMissing):
            hint = (f"\n(bench.py's --weights_dir is the generator's: give a metric's folder in a config/*.py preset "
                    f"as metric_kwargs = {{{name!r}: {{'weights_dir': FOLDER}}}})")
        sys.exit(f'error: metric {name!r} could not be built: {e}{hint}')


def clip_batches(items, folder):
    """(ids, captions, audio (B, S) float32 mono, sr) of runs of up to score_batch_size clips of one rate and length."""
    def stacked(batch):
        ids, captions, waves = zip(*batch)
        return list(ids), list(captions), torch.stack(waves), key[0]

    batch, key = [], None
    for pid, text in items:
        samples, sr = soundfile.read(wav_path(folder, pid), dtype='float32', always_2d=True)  # (S, channels)
        wave = torch.from_numpy(samples.mean(1))  # (S,)
        if batch and (len(batch) == score_batch_size or (sr, len(wave)) != key):
            yield stacked(batch)
            batch = []
        batch.append((pid, text, wave))
        key = (sr, len(wave))
    if batch:
        yield stacked(batch)


def write_results(items, rows, skipped, dev):
    order = {pid: i for i, (pid, _) in enumerate(items)}
    rows = sorted(rows, key=lambda r: order[r['id']])
    columns = [c for c in (rows[0] if rows else {}) if c not in ('id', 'prompt')]
    summary = dict(prompts=prompts, limit=limit, metrics=metric_names(), audio_dir=audio_dir or out_dir,
                   generation=None if audio_dir else generation_settings(dev), scored=len(rows),
                   skipped_count=len(skipped), means={c: sum(r[c] for r in rows) / len(rows) for c in columns},
                   skipped=skipped)
    write_text(os.path.join(out_dir, 'scores.jsonl'), ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows))
    write_text(os.path.join(out_dir, 'summary.json'), json.dumps(summary, indent=1, ensure_ascii=False) + '\n')
    print(f'wrote {out_dir}/scores.jsonl ({len(rows)} rows) and {out_dir}/summary.json ({len(skipped)} skipped)')
    system = audio_dir or ckpt or f'published {weights}'
    print(results_table(summary['means'], f'this run: {system}, {len(rows)} clips'))
    return summary


def results_table(means, label):
    """A markdown table: our means (label), then the paper's rows; our columns outside the paper's come last."""
    extra = [c for c in means if c not in PAPER_COLUMNS.values()]
    ours = [f'{means[c]:.3f}' if c in means else '-' for c in [*PAPER_COLUMNS.values(), *extra]]
    rows = [['system', *PAPER_COLUMNS, *extra], ['---'] * (1 + len(PAPER_COLUMNS) + len(extra)), [label, *ours]]
    rows += [[f'{name} (paper)', *(f'{v:.3f}' for v in values), *[''] * len(extra)] for name, values in PAPER.items()]
    return '\n'.join('| ' + ' | '.join(row) + ' |' for row in rows)


MODES = {'speed': bench_speed, 'eval': bench_eval}


def main(argv=None):
    try:
        configure(sys.argv[1:] if argv is None else argv)
        check()
        inputs = eval_inputs() if mode == 'eval' else ()
    except (ValueError, OSError) as e:  # a setting, preset, prompts file or folder that cannot serve
        sys.exit(f'error: {e}')
    if threads:
        torch.set_num_threads(threads)
    try:
        return MODES[mode](*inputs)
    except KeyboardInterrupt:
        sys.exit('interrupted; the clips written so far are kept: the same command goes on from them' if mode == 'eval'
                 else 'interrupted')


if __name__ == '__main__':
    main()
