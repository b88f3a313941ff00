"""
Benchmarks of the generation pipeline. One function per mode, picked with --mode.

$ python bench.py --mode=eval                                     # TTA-Bench: the paper's table, resumable
$ torchrun --standalone --nproc_per_node=8 bench.py --mode=eval   # the same, prompts sharded over 8 GPUs
$ python bench.py --mode=eval --audio_dir=tangoflux --out_dir=out/tangoflux   # score another system's WAVs
$ python bench.py --mode=eval --ckpt=out/ckpt.pt --metrics=loudness,centroid --limit=20   # no download
$ python bench.py --mode=speed                                    # full size, 2 s clip, fp32, this machine
$ python bench.py --mode=speed --duration=10 --dtype=bf16 --threads=2

eval: the paper's evaluation on TTA-Bench's accuracy subset (arXiv 2603.11661). Writes out_dir/<id>.wav for
every prompt whose clip is not there yet (10 s, 25 Euler steps, CFG 4.5, seed 42, bf16 on CUDA), scores every
clip with each --metrics scorer of reward.REWARDS in turn (one model in memory at a time), and writes
out_dir/scores.jsonl (a row per id), out_dir/summary.json (means, counts, skipped ids) and prints our means
beside the paper's. A clip's noise is drawn from data.seeded_generator(seed, id), so it depends on its id alone,
not on batching or sharding (the released script draws one generator's noise per batch of 16). Under torchrun
the prompts are sharded over the processes.
speed: seconds of compute per generated second of audio, split into text encoding, transformer (all Euler
steps, CFG branches batched), VAE decoding and vocoder, with each part's FLOPs and achieved FLOP/s against a
matmul probe run on the same machine in the same dtype. Weights are random (built on the meta device, then
filled), so nothing is downloaded; the text encoder has FLAN-T5-large's shape unless `text_encoder` names a
real one.
Settings are the module globals below, overridden by --key=value (nanoGPT style); --mode=eval first sets the
released evaluation's values of MODE_DEFAULTS, which later --key=value override in turn.
"""
import ast
import gc
import inspect
import json
import os
import re
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

# -----------------------------------------------------------------------------
mode = 'speed'  # a key of MODES
size = 'resonate_m_44k'  # transformer size, a key of transformer.MODELS
vae = 'vae_44k'  # a key of vae.VAES; its latent channels set the transformer's
vocoder = 'bigvgan_v2_44khz_128band_512x'  # a key of vae.BIGVGAN_CONFIGS, or 'griffin-lim' (eval: else the model's own)
mel = '44k'  # a key of vae.MEL_CONFIGS (sample rate, hop length)
text_encoder = 'flan-t5-large-random'  # random weights of FLAN-T5-large's (or 't5-tiny-random') shape, or a name/folder to load
# (eval: a name/folder replaces the model's own text encoder; the random names keep it)
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
weights_dir = ''  # folder holding the published files; '' = the Hugging Face / nanoresonate cache, else download
metrics = 'aes,clap,aqa'  # reward.REWARDS names, comma-separated; loudness and centroid need no download
metric_kwargs = {}  # {metric: constructor kwargs}, e.g. {'loudness': {'target_db': -14.0}}; built models from Python
score_batch_size = 16  # clips per metric call
out_dir = 'out/tta_bench'  # generated <id>.wav, generation.json, scores.jsonl, summary.json
audio_dir = ''  # score this folder of <id>.wav (any system's) instead of generating
# -----------------------------------------------------------------------------
MODE_DEFAULTS = {'eval': dict(duration=10.0, batch_size=16, seed=42, dtype='auto')}  # as the released evaluation


def configure(argv):
    """Apply --key=value overrides to the globals above (values parsed as Python literals, else strings);
    --mode=X first applies MODE_DEFAULTS[X]."""
    pairs = [_setting(arg) for arg in argv]
    for key, value in pairs:
        if key == 'mode':
            globals().update(MODE_DEFAULTS.get(value, {}))
    for key, value in pairs:
        globals()[key] = value


def _setting(arg):
    """'--key=value' -> (key, value of the global's type); exits with one line for anything else."""
    if not arg.startswith('--') or '=' not in arg:
        sys.exit(f'error: settings are --key=value, got {arg!r}')
    key, value = arg[2:].split('=', 1)
    if key not in globals() or key.startswith('_') or callable(globals()[key]) or key.isupper():
        sys.exit(f'error: unknown setting --{key}')
    try:
        value = ast.literal_eval(value)
    except (SyntaxError, ValueError):
        pass
    if type(value) is not type(globals()[key]) and not (isinstance(globals()[key], float) and isinstance(value, int)):
        sys.exit(f'error: --{key} must be a {type(globals()[key]).__name__}, got {value!r}')
    return key, type(globals()[key])(value)


def dtype_name(dev):
    """The --dtype name for dev: 'auto' is bf16 on CUDA (the released evaluation), fp32 elsewhere."""
    return ('bf16' if dev.type == 'cuda' else 'fp32') if dtype == 'auto' else dtype


def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize()
    elif dev.type == 'mps':
        torch.mps.synchronize()


def timed(fn, dev, n):
    """Fastest of n runs of fn() in seconds (after one warm-up run), and fn's result."""
    out = fn()
    best = float('inf')
    for _ in range(n):
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best, out


def count_flops(fn):
    """FLOPs of one call of fn() (matmuls, convolutions and attention, as torch's FlopCounterMode counts)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_probe(dev, dt, n, reps):
    """FLOP/s of an n x n x n matmul in dtype dt: what this machine's GEMM reaches."""
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    seconds, _ = timed(lambda: a @ b, dev, reps)
    return 2 * n ** 3 / seconds


def random_weights(module, std=0.02):
    """Fill a module built on the meta device with N(0, std) weights on the CPU (allocates once, no init cost)."""
    module.to_empty(device='cpu')
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
        for name, b in module.named_buffers():
            if b.is_floating_point():  # statistics: mean 0, std 1; BigVGAN's filters are restored by _refilter
                b.fill_(1.0 if name.endswith('std') else 0.0)
    return module


RANDOM_TEXT_ENCODERS = {  # speed's random stand-ins (T5Config fields); under eval these names mean the model's own
    'flan-t5-large-random': dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
    't5-tiny-random': dict(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)}


def build_text_encoder():
    """(encode(list of str) -> (text_f, text_f_c), width, module). 'flan-t5-large-random' = a T5 encoder with
    FLAN-T5-large's configuration and random weights fed random token ids (77 per caption, as released);
    't5-tiny-random' the same with a 32-d, one-layer T5 (tests)."""
    if text_encoder not in RANDOM_TEXT_ENCODERS:
        from transformer import load_text_encoder
        enc = load_text_encoder(text_encoder)
        return enc.encode, enc.dim, enc
    from transformers import T5Config, T5EncoderModel
    config = T5Config(vocab_size=32128, feed_forward_proj='gated-gelu', is_encoder_decoder=False, use_cache=False,
                      **RANDOM_TEXT_ENCODERS[text_encoder])
    with torch.device('meta'):
        model = T5EncoderModel(config)
    model = random_weights(model).eval()

    def encode(prompts):
        ids = torch.randint(0, 32128, (len(prompts), 77), device=model.device)
        text_f = model(input_ids=ids).last_hidden_state.float()  # (B, 77, 1024)
        return text_f, text_f.mean(1)  # pooled over all 77 positions, as released
    return encode, config.d_model, model


def build_parts(dev, dt):
    """Random-weight transformer, VAE and vocoder of the configured sizes on dev in dt, and the text encoder."""
    from transformer import MODELS, Resonate
    from vae import BIGVGAN_CONFIGS, MEL_CONFIGS, VAES, BigVGAN, griffin_lim
    encode, text_dim, text_model = build_text_encoder()
    with torch.device('meta'):
        vae_net = VAES[vae]()
    vae_net = random_weights(vae_net).fold_weight_norm().eval()
    cfg_t = MODELS[size](latent_dim=vae_net.embed_dim, text_dim=text_dim, text_c_dim=text_dim)
    net = random_weights(Resonate.from_config(cfg_t, device='meta')).eval()
    mel_cfg = MEL_CONFIGS[mel]
    if vocoder == 'griffin-lim':
        voc = lambda m: griffin_lim(m.float(), mel_cfg).unsqueeze(1)
    else:
        with torch.device('meta'):
            voc = BigVGAN.from_config(BIGVGAN_CONFIGS[vocoder])
        voc = _refilter(random_weights(voc)).eval()
    for m in (net, vae_net, voc, text_model):
        if isinstance(m, torch.nn.Module):
            m.to(dev, torch.float32 if m is text_model and dt == torch.float16 else dt)
    return encode, net, vae_net, voc, mel_cfg


def _refilter(voc):
    """Restore the fixed Kaiser-sinc filters of a BigVGAN whose buffers random_weights overwrote (a narrow copy
    of the same architecture has the same filters)."""
    from vae import BIGVGAN_CONFIGS, BigVGAN
    fresh = BigVGAN(**{**BIGVGAN_CONFIGS[vocoder], 'upsample_initial_channel': 64})
    filters = {k: v for k, v in fresh.named_buffers() if k.endswith('filter')}
    for name, b in voc.named_buffers():
        if name.endswith('filter'):
            b.copy_(filters[name])
    return voc


@torch.no_grad()
def bench_speed():
    """Seconds per generated second, FLOPs and FLOP/s of each part of the pipeline on this machine."""
    from flow import guided_velocity
    from data import DTYPES, pick_device
    dev = pick_device(device)
    dt = DTYPES[dtype_name(dev)]
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    encode, net, vae_net, voc, mel_cfg = build_parts(dev, dt)
    N = -(-int(duration * mel_cfg['sample_rate']) // (2 * mel_cfg['hop_length']))  # latent frames, rounded up
    B, C = batch_size, net.cfg.latent_dim
    prompts = ['rain on a tin roof'] * B
    text_f, text_f_c = (x.to(dev, dt) for x in encode(prompts))
    neg_f, neg_f_c = (x.to(dev, dt) for x in net.empty_conditions(B))
    x = torch.randn(B, N, C, device=dev, dtype=dt)
    t = torch.full((B,), 0.5, device=dev, dtype=dt)
    z = torch.randn(B, C, N, device=dev, dtype=dt)
    mel_in = torch.randn(B, mel_cfg['n_mels'], 2 * N, device=dev, dtype=dt)
    calls = {  # name -> (one call, how many calls per clip batch)
        'text': (lambda: encode(prompts), 1),
        'transformer': (lambda: guided_velocity(net, x, t, text_f, text_f_c, neg_f, neg_f_c, cfg_strength),
                        steps),
        'vae': (lambda: vae_net.decode(z), 1),
        'vocoder': (lambda: voc(mel_in), 1)}
    unknown = set(parts.split(',')) - set(calls)
    if unknown:
        sys.exit(f'error: --parts takes {",".join(calls)}, got {sorted(unknown)}')
    probe = matmul_probe(dev, dt, probe_size, repeats)
    audio_seconds = B * duration
    print(f'{size} on {dev} ({torch.get_num_threads()} threads), {dtype_name(dev)}, {B} x {duration:g} s clip, '
          f'{N} latent frames, {steps} steps, CFG {cfg_strength:g}; matmul probe {probe / 1e9:.0f} GFLOP/s')
    print(f'{"part":<14}{"ms/call":>10}{"calls":>7}{"s per gen s":>13}{"GFLOP/call":>12}{"GFLOP/s":>9}{"of probe":>10}')
    total = 0.0
    results = {}
    for name, (fn, n_calls) in calls.items():
        if name not in parts.split(','):
            continue
        flops = count_flops(fn)
        seconds, _ = timed(fn, dev, repeats)
        per_gen = seconds * n_calls / audio_seconds
        total += per_gen
        results[name] = dict(seconds=seconds, calls=n_calls, per_generated_second=per_gen, flops=flops)
        print(f'{name:<14}{seconds * 1e3:>10.1f}{n_calls:>7}{per_gen:>13.3f}{flops / 1e9:>12.1f}'
              f'{flops / seconds / 1e9:>9.0f}{flops / seconds / probe:>10.0%}')
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


def bench_eval():
    """Generate the missing clips, score every clip, write scores.jsonl and summary.json, print the table.
    Returns the summary on rank 0, None on the other ranks."""
    items = checked_eval_inputs()  # every setting checked before anything is loaded or written
    rank, world, dev = init_distributed()
    if threads:
        torch.set_num_threads(threads)
    usable = [(pid, text) for pid, text in items if text is not None]
    skipped = {pid: 'empty or non-text prompt_text' for pid, text in items if text is None}
    if rank == 0:
        print(f'eval: {len(items)} prompts of {prompts} ({len(skipped)} skipped), {world} process(es) on {dev}, '
              f'metrics {metrics}')
    if not audio_dir:
        generate_missing(usable, rank, world, dev)
    rows, unreadable = score_clips(usable, audio_dir or out_dir, rank, world, dev)
    rows = [row for part in gathered(rows, world) for row in part]
    summary = None
    if rank == 0:
        order = {pid: i for i, (pid, _) in enumerate(items)}
        summary = write_results(sorted(rows, key=lambda r: order[r['id']]), {**skipped, **unreadable}, dev)
        system = audio_dir or ckpt or f'published {weights}'
        print(results_table(summary['means'], f'this run: {system}, {len(rows)} clips'))
    if world > 1:
        dist.destroy_process_group()
    return summary


def checked_eval_inputs():
    """The (id, caption or None) pairs to evaluate; exits with one line naming the setting and the fix when a
    setting cannot work, before any model is loaded or clip generated."""
    from data import pick_device
    from reward import REWARDS
    names = metric_names()
    problems = [
        (not names or set(names) - set(REWARDS),
         f'--metrics takes names of reward.REWARDS ({", ".join(sorted(REWARDS))}), comma-separated; got {metrics!r}'),
        (len(set(names)) < len(names), f'--metrics names a metric twice: {metrics!r}'),
        (set(metric_kwargs) - set(names), f'--metric_kwargs names metrics missing from --metrics={metrics}: '
                                          f'{sorted(set(metric_kwargs) - set(names))}'),
        (not os.path.isfile(prompts), f'--prompts {prompts!r} does not exist; give a TTA-Bench JSON file such as '
                                      f'config/tta_bench_acc.json'),
        (limit < 0, f'--limit must be 0 (every prompt) or a number of prompts, got {limit}'),
        (score_batch_size < 1, f'--score_batch_size must be at least 1, got {score_batch_size}'),
        (audio_dir and not os.path.isdir(audio_dir), f'--audio_dir {audio_dir!r} is not a folder of <id>.wav files'),
        (not audio_dir and duration < 1, f'--duration must be at least 1 second to generate, got {duration}'),
        (not audio_dir and ckpt and not os.path.isfile(ckpt), f'--ckpt {ckpt!r} does not exist; give a train.py '
                                                              f'ckpt.pt or a published .pth, or leave it empty'),
        (weights not in ('grpo', 'pt'), f"--weights must be 'grpo' or 'pt', got {weights!r}")]
    for bad, message in problems:
        if bad:
            sys.exit(f'error: {message}')
    try:
        items = read_bench(prompts)[:limit or None]
    except ValueError as e:
        sys.exit(f'error: --prompts {e}')
    check_out_dir()
    if not audio_dir:
        check_generation_record(generation_settings(pick_device(device)))
    return items


def metric_names():
    return [m.strip() for m in metrics.split(',') if m.strip()]


def read_bench(path):
    """[(id, caption or None)] of a TTA-Bench JSON list of {"id", "prompt_text", ...}, in file order. None marks
    an empty, null or non-string prompt_text (TTA-Bench's fairness set has an empty one), which is skipped and
    recorded. Raises ValueError for another shape, a duplicate id or an id that cannot name a file."""
    try:
        with open(path, encoding='utf-8') as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not JSON ({e.msg}, line {e.lineno})') from None
    if not isinstance(entries, list) or not all(isinstance(x, dict) and 'id' in x for x in entries):
        raise ValueError(f'{path}: expected a JSON list of {{"id": ..., "prompt_text": ...}} as in TTA-Bench')
    ids = [str(x['id']) for x in entries]
    bad = [i for i in ids if not re.fullmatch(r'[A-Za-z0-9_][A-Za-z0-9_.-]*', i)]
    if bad or len(set(ids)) < len(ids):
        raise ValueError(f'{path}: ids must be unique file names (letters, digits, _ . -); '
                         f'{bad[:3] or "some ids repeat"}')
    texts = [x.get('prompt_text') for x in entries]
    return [(i, t.strip() if isinstance(t, str) and t.strip() else None) for i, t in zip(ids, texts)]


def check_out_dir():
    """Exit with one line unless out_dir can be created and written into."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        sys.exit(f'error: --out_dir {out_dir!r} is not writable ({e.strerror or e}); choose another folder')


def generation_settings(dev):
    """What a generated clip depends on (not batch_size, not the number of processes)."""
    return dict(ckpt=os.path.abspath(ckpt) if ckpt else None, weights=None if ckpt else weights,
                duration=duration, steps=steps, cfg_strength=cfg_strength, seed=seed, dtype=dtype_name(dev), vocoder=eval_vocoder(),
                text_encoder=eval_text_encoder())


def eval_vocoder():
    return 'griffin-lim' if vocoder == 'griffin-lim' else 'auto'


def eval_text_encoder():
    return None if text_encoder in RANDOM_TEXT_ENCODERS else text_encoder


def check_generation_record(settings):
    """Exit with one line when out_dir holds clips generated with other settings: resuming must not mix them."""
    path = os.path.join(out_dir, 'generation.json')
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    changed = [f'{k}={old.get(k)!r} (now {v!r})' for k, v in settings.items() if old.get(k) != v]
    if changed:
        sys.exit(f'error: --out_dir {out_dir} holds clips generated with {", ".join(changed)}; resume with those '
                 f'settings or choose another --out_dir')


def init_distributed():
    """(rank, world size, device): torchrun's process group (nccl on CUDA, gloo on CPU), else (0, 1, device)."""
    from data import pick_device
    dev = pick_device(device)
    if 'RANK' not in os.environ:
        return 0, 1, dev
    if dev.type == 'cuda':
        dev = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(dev)
    dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    return dist.get_rank(), dist.get_world_size(), dev


def gathered(obj, world):
    """Every rank's obj, in rank order."""
    if world == 1:
        return [obj]
    parts = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def wav_path(folder, pid):
    return os.path.join(folder, f'{pid}.wav')


def generate_missing(items, rank, world, dev):
    """Write out_dir/<id>.wav for each (id, caption) without a complete clip; this rank takes every world-th.
    The noise of a clip comes from data.seeded_generator(seed, id): it does not depend on batching or sharding."""
    from data import seeded_generator
    from sample import generate
    todo = [(pid, text) for pid, text in items if not complete_wav(wav_path(out_dir, pid))]
    gathered(None, world)  # every rank lists the same clips before any is written
    if rank == 0:
        write_atomic(os.path.join(out_dir, 'generation.json'), json.dumps(generation_settings(dev), indent=1))
        print(f'{len(items) - len(todo)} of {len(items)} clips are in {out_dir}; generating {len(todo)}')
    mine = todo[rank::world]
    if mine:
        pipe = load_eval_pipeline(dev)
        with tqdm(total=len(mine), unit='clip', desc='generate', disable=rank != 0) as bar:
            for start in range(0, len(mine), batch_size):
                batch = mine[start:start + batch_size]
                audio, sr = generate([text for _, text in batch], pipe, duration, steps, cfg_strength, seed=[
                    seeded_generator(seed, pid) for pid, _ in batch], batch_size=len(batch), progress=False)
                for (pid, _), wave in zip(batch, audio):  # (S,) each
                    write_atomic(wav_path(out_dir, pid), wave, sr)
                bar.update(len(batch))
        del pipe
        release()
    gathered(None, world)  # every clip is written before any rank scores


def wav_info(path):
    """soundfile's info of an audio file, or None when it is missing or unreadable."""
    import soundfile
    try:
        return soundfile.info(path)
    except (soundfile.SoundFileError, RuntimeError, OSError):
        return None


def complete_wav(path):
    """True for a readable audio file of round(duration * its rate) samples: what a finished write leaves."""
    info = wav_info(path)
    return info is not None and info.frames == round(duration * info.samplerate)


def load_eval_pipeline(dev):
    """sample.load_pipeline from the eval settings; exits with the loader's message when it cannot load."""
    from sample import check_settings, load_pipeline
    try:
        pipe = load_pipeline(ckpt or None, weights_dir or None, dev, dtype_name(dev), weights, eval_text_encoder(),
                             eval_vocoder())
        check_settings(['-'], duration, steps, cfg_strength, seed, 1, batch_size, pipe.max_duration())
    except (ValueError, OSError) as e:
        sys.exit(f'error: {e}')
    return pipe


def write_atomic(path, content, sample_rate=None):
    """Write text, or (S,) audio as sample.write_wav does, through a temporary file and os.replace: the file is
    complete or absent, and no temporary file outlives a failed write."""
    from sample import write_wav
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f'.{os.getpid()}.tmp.{name}')  # keeps the extension, which sets the format
    try:
        if sample_rate is None:
            with open(tmp, 'w', encoding='utf-8') as f:
                f.write(content)
        else:
            write_wav(tmp, content, sample_rate)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def release():
    """Return freed model memory to the device, so that the next model's peak is its own, not a sum."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_clips(items, folder, rank, world, dev):
    """Score this rank's share of the (id, caption) items whose folder/<id>.wav is readable, by each --metrics
    scorer in turn. Returns [{'id', 'prompt', column: value}], and {id: reason} for the clips that are missing
    or unreadable."""
    unreadable = {pid: f'no readable {pid}.wav in {folder}' for pid, _ in items if not wav_info(wav_path(folder, pid))}
    mine = [(pid, text) for pid, text in items if pid not in unreadable][rank::world]
    rows = [{'id': pid, 'prompt': text} for pid, text in mine]
    for name in metric_names() if mine else []:
        for column, values in run_metric(name, mine, folder, rank, world, dev).items():
            assert column not in rows[0] and len(values) == len(rows), f'{name}: column {column!r} twice or short'
            for row, value in zip(rows, values):
                row[column] = value
    return rows, unreadable


@torch.no_grad()
def run_metric(name, items, folder, rank, world, dev):
    """{column: [value per item]} of metric `name` on folder/<id>.wav of the (id, caption) items, in batches of
    score_batch_size. The scorer is built here and freed before returning, so only one is ever in memory.
    Columns are score_all's keys, or `name` for its single default "score"."""
    torch.manual_seed(seed)  # scorers that crop at random (CLAPScore's 7 s window) repeat run to run
    scorer = build_metric(name, dev)
    columns = {}
    with tqdm(total=len(items), unit='clip', desc=name, disable=rank != 0) as bar:
        for captions, audio, sr in clip_batches(items, folder):
            for key, values in scorer.score_all(audio, sr, captions).items():  # (B,) each
                columns.setdefault(name if key == 'score' else key, []).extend(values.float().cpu().tolist())
            bar.update(len(captions))
    del scorer
    release()
    return columns


def build_metric(name, dev):
    """reward.REWARDS[name](**metric_kwargs[name]), given dev when it takes a device; exits with one line when
    it cannot be built (a model that is not on this machine, kwargs that do not fit)."""
    from reward import REWARDS
    ctor, kwargs = REWARDS[name], dict(metric_kwargs.get(name, {}))
    if 'device' in inspect.signature(ctor).parameters:
        kwargs.setdefault('device', dev)
    try:
        return ctor(**kwargs)
    except (ValueError, TypeError, OSError) as e:
        sys.exit(f'error: metric {name!r} could not be built: {e}')


def clip_batches(items, folder):
    """(captions, audio (B, S) float32, sample_rate) of up to score_batch_size consecutive clips of one rate and
    length, read from folder/<id>.wav at the file's own rate and downmixed to the channel mean; the scorer
    resamples (reward.prepare_audio). Silent clips are scored too (data.load_audio refuses them, for training)."""
    import soundfile
    batch, key = [], None
    for pid, text in items:
        data, sr = soundfile.read(wav_path(folder, pid), dtype='float32', always_2d=True)  # (S, channels)
        wave = torch.from_numpy(data.mean(1))  # (S,)
        if batch and (len(batch) == score_batch_size or (sr, len(wave)) != key):
            yield [t for t, _ in batch], torch.stack([w for _, w in batch]), key[0]
            batch = []
        batch.append((text, wave))
        key = (sr, len(wave))
    if batch:
        yield [t for t, _ in batch], torch.stack([w for _, w in batch]), key[0]


def write_results(rows, skipped, dev):
    """out_dir/scores.jsonl (a row per id, every metric column) and out_dir/summary.json (means over the rows,
    counts, skipped ids with the reason); returns the summary."""
    columns = [c for c in (rows[0] if rows else {}) if c not in ('id', 'prompt')]
    summary = dict(prompts=prompts, limit=limit, metrics=metric_names(), audio_dir=audio_dir or out_dir,
                   generation=None if audio_dir else generation_settings(dev), scored=len(rows),
                   skipped_count=len(skipped), means={c: sum(r[c] for r in rows) / len(rows) for c in columns},
                   skipped=skipped)
    lines = ''.join(json.dumps(row, ensure_ascii=False) + '\n' for row in rows)
    write_atomic(os.path.join(out_dir, 'scores.jsonl'), lines)
    write_atomic(os.path.join(out_dir, 'summary.json'), json.dumps(summary, indent=1, ensure_ascii=False) + '\n')
    print(f'wrote {out_dir}/scores.jsonl ({len(rows)} rows) and {out_dir}/summary.json ({len(skipped)} skipped)')
    return summary


def results_table(means, label):
    """A markdown table: our means (label) beside the paper's rows; our other columns follow the paper's."""
    extra = [c for c in means if c not in PAPER_COLUMNS.values()]
    ours = [f'{means[c]:.3f}' if c in means else '-' for c in [*PAPER_COLUMNS.values(), *extra]]
    rows = [['system', *PAPER_COLUMNS, *extra], ['---'] * (1 + len(PAPER_COLUMNS) + len(extra)), [label, *ours]]
    rows += [[f'{name} (paper)', *(f'{v:.3f}' for v in values), *[''] * len(extra)] for name, values in PAPER.items()]
    return '\n'.join('| ' + ' | '.join(row) + ' |' for row in rows)


MODES = {'speed': bench_speed, 'eval': bench_eval}


def main(argv=None):
    configure(sys.argv[1:] if argv is None else argv)
    from data import DTYPES, pick_device
    from transformer import MODELS
    from vae import BIGVGAN_CONFIGS, MEL_CONFIGS, VAES
    for key, allowed in (('mode', MODES), ('dtype', [*DTYPES, 'auto']), ('size', MODELS), ('vae', VAES),
                         ('mel', MEL_CONFIGS), ('vocoder', [*BIGVGAN_CONFIGS, 'griffin-lim'])):
        if globals()[key] not in allowed:
            sys.exit(f'error: --{key} must be one of {sorted(allowed)}, got {globals()[key]!r}')
    if duration <= 0:
        sys.exit(f'error: --duration must be a positive number of seconds, got {duration}')
    if batch_size < 1:
        sys.exit(f'error: --batch_size must be at least 1, got {batch_size}')
    try:
        pick_device(device)
    except ValueError as e:  # a device this machine lacks
        sys.exit(f'error: {e}')
    return MODES[mode]()


if __name__ == '__main__':
    main()
