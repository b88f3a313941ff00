"""
Benchmarks of the generation pipeline. One function per mode, picked with --mode.

$ python bench.py --mode=speed                                   # full size, 2 s clip, fp32, this machine
$ python bench.py --mode=speed --duration=10 --dtype=bf16 --threads=2

speed: seconds of compute per generated second of audio, split into text encoding, transformer (all Euler
steps, CFG branches batched), VAE decoding and vocoder, with each part's FLOPs and achieved FLOP/s against a
matmul probe run on the same machine in the same dtype. Weights are random (built on the meta device, then
filled), so nothing is downloaded; the text encoder has FLAN-T5-large's shape unless `text_encoder` names a
real one.
Settings are the module globals below, overridden by --key=value (nanoGPT style).
"""
import ast
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# -----------------------------------------------------------------------------
mode = 'speed'  # a key of MODES
size = 'resonate_m_44k'  # transformer size, a key of transformer.MODELS
vae = 'vae_44k'  # a key of vae.VAES; its latent channels set the transformer's
vocoder = 'bigvgan_v2_44khz_128band_512x'  # a key of vae.BIGVGAN_CONFIGS, or 'griffin-lim'
mel = '44k'  # a key of vae.MEL_CONFIGS (sample rate, hop length)
text_encoder = 'flan-t5-large-random'  # random weights of FLAN-T5-large's (or 't5-tiny-random') shape, or a name/folder to load
duration = 2.0  # seconds of audio per clip
batch_size = 1  # clips generated together
steps = 25  # Euler steps (one batched CFG forward each)
cfg = 4.5  # guidance scale; 1 = no unconditional branch
device = 'auto'  # auto (cuda, mps, cpu), cuda, mps, cpu
dtype = 'fp32'  # fp32, bf16, fp16 for the transformer, VAE and vocoder
threads = 0  # CPU threads for torch; 0 keeps torch's default
repeats = 3  # timed runs of each part; the fastest is reported
parts = 'text,transformer,vae,vocoder'  # which parts to time, comma-separated
probe_size = 2048  # n of the n x n x n matmul probe
seed = 0
# -----------------------------------------------------------------------------


def configure(argv):
    """Apply --key=value overrides to the globals above (values parsed as Python literals, else strings)."""
    for arg in argv:
        if not arg.startswith('--') or '=' not in arg:
            sys.exit(f'error: settings are --key=value, got {arg!r}')
        key, value = arg[2:].split('=', 1)
        if key not in globals() or key.startswith('_') or callable(globals()[key]):
            sys.exit(f'error: unknown setting --{key}')
        try:
            value = ast.literal_eval(value)
        except (SyntaxError, ValueError):
            pass
        if type(value) is not type(globals()[key]) and not (isinstance(globals()[key], float) and isinstance(value, int)):
            sys.exit(f'error: --{key} must be a {type(globals()[key]).__name__}, got {value!r}')
        globals()[key] = type(globals()[key])(value)


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


def build_text_encoder():
    """(encode(list of str) -> (text_f, text_f_c), width, module). 'flan-t5-large-random' = a T5 encoder with
    FLAN-T5-large's configuration and random weights fed random token ids (77 per caption, as released);
    't5-tiny-random' the same with a 32-d, one-layer T5 (tests)."""
    shapes = {'flan-t5-large-random': dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
              't5-tiny-random': dict(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)}
    if text_encoder not in shapes:
        from transformer import load_text_encoder
        enc = load_text_encoder(text_encoder)
        return enc.encode, enc.dim, enc
    from transformers import T5Config, T5EncoderModel
    config = T5Config(vocab_size=32128, feed_forward_proj='gated-gelu', is_encoder_decoder=False, use_cache=False,
                      **shapes[text_encoder])
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
    dev, dt = pick_device(device), DTYPES[dtype]
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
        'transformer': (lambda: guided_velocity(net, x, t, text_f, text_f_c, neg_f, neg_f_c, cfg), steps),
        'vae': (lambda: vae_net.decode(z), 1),
        'vocoder': (lambda: voc(mel_in), 1)}
    unknown = set(parts.split(',')) - set(calls)
    if unknown:
        sys.exit(f'error: --parts takes {",".join(calls)}, got {sorted(unknown)}')
    probe = matmul_probe(dev, dt, probe_size, repeats)
    audio_seconds = B * duration
    print(f'{size} on {dev} ({torch.get_num_threads()} threads), {dtype}, {B} x {duration:g} s clip, '
          f'{N} latent frames, {steps} steps, CFG {cfg:g}; matmul probe {probe / 1e9:.0f} GFLOP/s')
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


MODES = {'speed': bench_speed}  # --mode=eval (TTA-Bench) is to come


def main(argv=None):
    configure(sys.argv[1:] if argv is None else argv)
    from data import DTYPES, pick_device
    from transformer import MODELS
    from vae import BIGVGAN_CONFIGS, MEL_CONFIGS, VAES
    for key, allowed in (('mode', MODES), ('dtype', DTYPES), ('size', MODELS), ('vae', VAES), ('mel', MEL_CONFIGS),
                         ('vocoder', [*BIGVGAN_CONFIGS, 'griffin-lim'])):
        if globals()[key] not in allowed:
            sys.exit(f'error: --{key} must be one of {sorted(allowed)}, got {globals()[key]!r}')
    try:
        pick_device(device)
    except ValueError as e:  # a device this machine lacks
        sys.exit(f'error: {e}')
    return MODES[mode]()


if __name__ == '__main__':
    main()
