"""
The audio side of Resonate: waveform <-> log-mel <-> VAE latent.

Read top to bottom:
  1. the log-mel front end (`MelSpectrogram`, `MEL_CONFIGS`) and its rough inverse (`griffin_lim`),
  2. the mel VAE (`MelVAE`, `VAES`, `vae_loss`): MMAudio's 1-D conv VAE built from EDM2
     magnitude-preserving layers (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
     Diffusion Models", arXiv 2312.02696),
  3. the BigVGAN v2 vocoder (`BigVGAN`, `BIGVGAN_CONFIGS`): mel -> waveform (Lee et al. 2023, "BigVGAN: A
     Universal Neural Vocoder with Large-Scale Training", arXiv 2206.04658).

Generation runs latent (B, E, N) -> MelVAE.decode -> mel (B, n_mels, 2N) -> BigVGAN -> waveform (B, 1, S).
State-dict key names follow the released checkpoints (`v1-44.pth`, `bigvgan_generator.pt`), so those files
load strictly.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Log-mel front end


# The two settings the released VAEs were trained on (plain dicts, so checkpoints and configs can hold them).
# sample_rate in Hz; n_fft, hop_length, win_length in samples (a Hann window, zero-padded to n_fft when
# shorter); f_min, f_max in Hz; log_base 10 for the 16 kHz setting and e for the 44.1 kHz one.
MEL_CONFIGS = {
    "16k": dict(sample_rate=16_000, n_mels=80, n_fft=1024, hop_length=256, win_length=1024,
                f_min=0.0, f_max=8_000.0, log_base=10.0),
    "44k": dict(sample_rate=44_100, n_mels=128, n_fft=2048, hop_length=512, win_length=2048,
                f_min=0.0, f_max=22_050.0, log_base=math.e),
}


def get_mel_config(config) -> dict:
    """A key of MEL_CONFIGS ("16k", "44k") or a dict with the same keys -> that dict. Raises ValueError for an
    unknown name or a dict that lacks keys."""
    if isinstance(config, dict):
        missing = set(MEL_CONFIGS["16k"]) - set(config)
        if missing:
            raise ValueError(f"mel config lacks {sorted(missing)}; see vae.MEL_CONFIGS for the fields")
        return config
    if config not in MEL_CONFIGS:
        raise ValueError(f"unknown mel config {config!r}; use one of {sorted(MEL_CONFIGS)} or a dict like them")
    return MEL_CONFIGS[config]


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale (Auditory Toolbox): linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    log_part = min_log_mel + torch.log(f.clamp(min=min_log_hz) / min_log_hz) / logstep
    return torch.where(f >= min_log_hz, log_part, f / f_sp)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    """Inverse of `hz_to_mel`."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    log_part = min_log_hz * torch.exp(logstep * (m - min_log_mel))
    return torch.where(m >= min_log_mel, log_part, f_sp * m)


def mel_filterbank(cfg: dict) -> torch.Tensor:
    """Triangular Slaney-scale filters with Slaney area normalisation, as librosa.filters.mel(htk=False,
    norm='slaney') builds them. Computed in float64. Returns (n_mels, n_fft // 2 + 1)."""
    fft_freqs = torch.linspace(0, cfg["sample_rate"] / 2, cfg["n_fft"] // 2 + 1, dtype=torch.float64)
    mel_edges = torch.linspace(hz_to_mel(torch.tensor(cfg["f_min"], dtype=torch.float64)).item(),
                               hz_to_mel(torch.tensor(cfg["f_max"], dtype=torch.float64)).item(),
                               cfg["n_mels"] + 2, dtype=torch.float64)
    hz_edges = mel_to_hz(mel_edges)  # (n_mels + 2,) left edge, centre, right edge of each triangle
    widths = hz_edges.diff()  # (n_mels + 1,)
    ramps = hz_edges[:, None] - fft_freqs[None, :]  # (n_mels + 2, F)
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = torch.minimum(rising, falling).clamp(min=0)  # (n_mels, F)
    # Slaney normalisation: each triangle has unit area in Hz, so the energy per band is comparable
    return weights * (2.0 / (hz_edges[2:] - hz_edges[:-2]))[:, None]


def num_mel_frames(num_samples: int, config="44k") -> int:
    """Mel frames T for a waveform of S samples.

    The waveform is reflect-padded by p = (n_fft - hop) // 2 on both sides and framed with center=False, so
    T = floor((S + 2p - n_fft) / hop) + 1, which is floor(S / hop) for both released settings
    (e.g. 10 s at 44.1 kHz: 441000 samples -> 861 frames; at 16 kHz: 160000 -> 625).
    """
    cfg = get_mel_config(config)
    pad = (cfg["n_fft"] - cfg["hop_length"]) // 2
    return (num_samples + 2 * pad - cfg["n_fft"]) // cfg["hop_length"] + 1


def num_latent_frames(seconds: float, config="44k", cover=False) -> int:
    """Latent frames N for `seconds` of audio: the mel frames halved by the VAE. Training encodes a clip, so
    N = num_mel_frames // 2 (10 s at 44.1 kHz -> 430); sampling must cover the duration, so with cover=True N is
    rounded up as the released sampler does (431; the waveform is then trimmed)."""
    cfg = get_mel_config(config)
    if cover:
        return math.ceil(seconds * cfg["sample_rate"] / cfg["hop_length"] / 2)
    return num_mel_frames(round(seconds * cfg["sample_rate"]), cfg) // 2


def _hann_window(cfg: dict, device=None) -> torch.Tensor:
    """Periodic Hann window of win_length, zero-padded on both sides to n_fft (what torch.stft does)."""
    window = torch.hann_window(cfg["win_length"], device=device)
    left = (cfg["n_fft"] - cfg["win_length"]) // 2
    return F.pad(window, (left, cfg["n_fft"] - cfg["win_length"] - left))


def _stft(waveform: torch.Tensor, cfg: dict, window: torch.Tensor) -> torch.Tensor:
    """(B, S) -> complex (B, n_fft // 2 + 1, T) with the front end's framing (see `num_mel_frames`)."""
    pad = (cfg["n_fft"] - cfg["hop_length"]) // 2
    if waveform.shape[-1] <= pad:
        raise ValueError(f"waveform has {waveform.shape[-1]} samples; reflect padding needs more than {pad} "
                         f"(at least n_fft = {cfg['n_fft']} to get one frame)")
    padded = F.pad(waveform.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    return torch.stft(padded, cfg["n_fft"], hop_length=cfg["hop_length"], window=window, center=False,
                      normalized=False, onesided=True, return_complex=True)


def _istft(spec: torch.Tensor, cfg: dict, window: torch.Tensor) -> torch.Tensor:
    """Least-squares inverse of `_stft` (Griffin & Lim 1984, eq. 6): windowed overlap-add divided by the summed
    squared window. complex (B, F, T) -> (B, T * hop). torch.istft refuses center=False framing because the
    window sum vanishes at the very ends, so the overlap-add is written out."""
    B, _, T = spec.shape
    frames = torch.fft.irfft(spec, n=cfg["n_fft"], dim=1) * window[:, None]  # (B, n_fft, T)
    length = cfg["n_fft"] + (T - 1) * cfg["hop_length"]
    fold = dict(output_size=(1, length), kernel_size=(1, cfg["n_fft"]), stride=(1, cfg["hop_length"]))
    signal = F.fold(frames, **fold).view(B, length)
    window_sq = window.square()[None, :, None].expand(1, -1, T)
    norm = F.fold(window_sq, **fold).view(1, length)
    signal = torch.where(norm > 1e-6, signal / norm.clamp(min=1e-6), torch.zeros_like(signal))
    pad = (cfg["n_fft"] - cfg["hop_length"]) // 2
    return signal[:, pad:pad + T * cfg["hop_length"]]  # drop the reflect padding again


def _log(x: torch.Tensor, base: float) -> torch.Tensor:
    if base == 10.0:
        return torch.log10(x)
    if base == math.e:
        return torch.log(x)
    return torch.log(x) / math.log(base)


def _exp(x: torch.Tensor, base: float) -> torch.Tensor:
    return torch.exp(x) if base == math.e else torch.pow(base, x)


class MelSpectrogram(nn.Module):
    """Log-mel front end of the released VAEs.

    forward(waveform (B, S) float in [-1, 1]) -> log-mel (B, n_mels, T), T = `num_mel_frames(S)`.
    The waveform is clamped to [-1, 1] first (as released); magnitude is sqrt(re^2 + im^2 + 1e-9), and the
    log is log_base(max(mel, 1e-5)), so silence sits at -5 (16k, log10) or about -11.5 (44k, ln).
    config: a key of MEL_CONFIGS or a dict like its values. Raises ValueError for an unknown config, a
    waveform that is not 2-D, or one shorter than the reflect padding.
    """

    def __init__(self, config="44k"):
        super().__init__()
        self.cfg = get_mel_config(config)
        # derived from the config, so not saved in checkpoints
        self.register_buffer("mel_basis", mel_filterbank(self.cfg).float(), persistent=False)
        self.register_buffer("window", _hann_window(self.cfg), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.ndim != 2:
            raise ValueError(f"waveform must be (B, S), got shape {tuple(waveform.shape)}; "
                             f"use waveform.unsqueeze(0) for one clip or squeeze a channel axis")
        waveform = waveform.float().clamp(-1.0, 1.0)
        spec = _stft(waveform, self.cfg, self.window)  # (B, F, T) complex
        magnitude = torch.sqrt(spec.real.square() + spec.imag.square() + 1e-9)
        mel = self.mel_basis @ magnitude  # (B, n_mels, T)
        return _log(mel.clamp(min=1e-5), self.cfg["log_base"])


def griffin_lim(mel: torch.Tensor, mel_config="44k", n_iter: int = 32, momentum: float = 0.99,
                generator: torch.Generator = None) -> torch.Tensor:
    """Waveform from a log-mel without a trained vocoder: undo the log, map mel -> linear magnitude with the
    filterbank's pseudo-inverse (clamped at 0), then recover a phase with fast Griffin-Lim (Perraudin et al.
    2013, "A fast Griffin-Lim algorithm"; Griffin & Lim 1984) using the front end's own framing.

    mel: (B, n_mels, T) log-mel as produced by `MelSpectrogram(mel_config)`.
    Returns (B, T * hop) float waveform (not clamped). The initial phase is random, drawn from `generator`
    (a fixed seed 0 when None, so the result is reproducible). Raises ValueError on a wrong number of bins.
    """
    cfg = get_mel_config(mel_config)
    if mel.ndim != 3 or mel.shape[1] != cfg["n_mels"]:
        raise ValueError(f"mel must be (B, {cfg['n_mels']}, T) for mel config with {cfg['n_mels']} bins, "
                         f"got shape {tuple(mel.shape)}")
    device = mel.device
    inverse = torch.linalg.pinv(mel_filterbank(cfg)).float().to(device)  # (F, n_mels)
    magnitude = (inverse @ _exp(mel.float(), cfg["log_base"])).clamp(min=0)  # (B, F, T)
    window = _hann_window(cfg, device)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    phase = torch.rand(magnitude.shape, generator=generator, device=generator.device).to(device)
    angles = torch.polar(torch.ones_like(magnitude), 2 * math.pi * phase)
    previous = torch.zeros_like(angles)
    for _ in range(n_iter):
        rebuilt = _stft(_istft(magnitude * angles, cfg, window), cfg, window)
        angles = rebuilt - (momentum / (1 + momentum)) * previous  # the "fast" extrapolation step
        angles = angles / (angles.abs() + 1e-16)
        previous = rebuilt
    return _istft(magnitude * angles, cfg, window)


class GriffinLim(nn.Module):
    """A vocoder without weights, with BigVGAN's interface: mel (B, n_mels, T) -> waveform (B, 1, T * hop) by
    `griffin_lim`, for small models trained here without a neural vocoder."""

    def __init__(self, mel_config):
        super().__init__()
        self.cfg = get_mel_config(mel_config)
        self.num_mels, self.upsample_factor = self.cfg["n_mels"], self.cfg["hop_length"]
        self.sampling_rate = self.cfg["sample_rate"]

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return griffin_lim(mel.float(), self.cfg).unsqueeze(1)


# -----------------------------------------------------------------------------
# 2. Mel VAE (MMAudio's 1-D conv VAE) from EDM2 magnitude-preserving layers


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Scale x to unit RMS over `dim` (default: all but the first), EDM2 eq. 66 / pixel norm:
    x / (eps + ||x|| / sqrt(numel over dim)). Computed in float32."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (EDM2 eq. 81): 0.596 is SiLU's output RMS for unit-normal input."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving weighted sum (EDM2 eq. 88): lerp(a, b, t) rescaled to unit variance."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


class MPConv1d(nn.Module):
    """EDM2 magnitude-preserving 1-D conv (EDM2 eq. 47 + forced weight normalisation eq. 66), 'same' padding,
    no bias. x (B, C_in, T) -> (B, C_out, T).

    The stored `weight` (training format, what checkpoints hold) is raw; the conv uses
    w = normalize(weight) / sqrt(fan_in), i.e. every output channel has unit L2 norm.
    Two paths compute that same w:
      - unfolded (training and default): w is recomputed each call, so gradients flow through the
        normalisation; in train mode the stored weight is also renormalised in place each call (forced weight
        normalisation), which keeps its scale, and so Adam's effective step size, constant.
      - folded (inference, `fold_weight_norm`): w is computed once and stored in `weight`, as the released
        loader does at load time. The forward is then a plain conv.
    The folded path equals the unfolded one exactly (the same arithmetic, done once). A folded module still
    saves in training format: it writes back weight * sqrt(fan_in) = normalize(raw), which normalize() maps to
    itself up to a relative eps * |1 - 1 / rms(raw)| (~1e-8 once forced normalisation has run; at most ~1e-5
    for random-normal weights), so save -> load -> forward agrees with the original. Loading a state dict
    always leaves the module unfolded.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size))
        self.folded = False

    def fan_in(self) -> int:
        return self.weight[0].numel()

    def effective_weight(self) -> torch.Tensor:
        """The (C_out, C_in, k) weight the conv applies, unit norm per output channel."""
        if self.folded:
            return self.weight
        return normalize(self.weight) / math.sqrt(self.fan_in())

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        if self.training:
            if self.folded:
                raise RuntimeError("MPConv1d is folded for inference; reload the state dict (or build a fresh "
                                   "model) before training")
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight))
        w = self.effective_weight() * gain
        return F.conv1d(x, w, padding=w.shape[-1] // 2)

    @torch.no_grad()
    def fold_weight_norm(self) -> "MPConv1d":
        if not self.folded:
            self.weight.copy_(self.effective_weight())
            self.folded = True
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.folded:  # always export the training format (see class docstring)
            destination[prefix + "weight"] = self.weight.detach() * math.sqrt(self.fan_in())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.folded = False


class ResBlock(nn.Module):
    """Pixel norm -> (mp_silu -> conv) x 2, added to the (projected) input with mp_sum(t=0.3).
    (B, C_in, T) -> (B, C_out, T)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv1 = MPConv1d(in_dim, out_dim, kernel_size)
        self.conv2 = MPConv1d(out_dim, out_dim, kernel_size)
        if in_dim != out_dim:
            self.nin_shortcut = MPConv1d(in_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize(x, dim=1)  # the shortcut also sees the normalised input
        h = self.conv2(mp_silu(self.conv1(mp_silu(x))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return mp_sum(x, h, t=0.3)


class AttnBlock(nn.Module):
    """Single-head self-attention over time with cosine-normalised q, k, v (each unit RMS per position).
    (B, C, T) -> (B, C, T)."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = MPConv1d(dim, 3 * dim, 1)
        self.proj_out = MPConv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T = x.shape
        qkv = normalize(self.qkv(x).view(B, C, 3, T), dim=1)  # channels are interleaved as (C, 3)
        q, k, v = qkv.transpose(1, 3).unbind(2)  # each (B, T, C)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, T, C)
        return mp_sum(x, self.proj_out(h.transpose(1, 2)), t=0.3)


class Downsample(nn.Module):
    """1x1 conv, average-pool time by 2, 1x1 conv. (B, C, T) -> (B, C, T // 2); pooling floors odd T."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = MPConv1d(dim, dim, 1)
        self.conv2 = MPConv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.avg_pool1d(self.conv1(x), kernel_size=2, stride=2))


class Upsample(nn.Module):
    """Repeat each frame twice (nearest), then a conv. (B, C, T) -> (B, C, 2T)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = MPConv1d(dim, dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.repeat_interleave(2, dim=-1))


class Level(nn.Module):
    """One resolution of the encoder or decoder: a stack of ResBlocks, optionally followed by a resampler
    (stored as `downsample` / `upsample` to keep the released key names)."""

    def __init__(self, dims: list, resample: str = None):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(a, b) for a, b in zip(dims[:-1], dims[1:]))
        if resample == "down":
            self.downsample = Downsample(dims[-1])
        elif resample == "up":
            self.upsample = Upsample(dims[-1])


class Middle(nn.Module):
    """ResBlock -> attention -> ResBlock at the lowest resolution. (B, C, N) -> (B, C, N)."""

    def __init__(self, dim: int):
        super().__init__()
        self.block_1 = ResBlock(dim, dim)
        self.attn_1 = AttnBlock(dim)
        self.block_2 = ResBlock(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


CLIP_ACT = 256.0  # activations are clamped to +-CLIP_ACT between stages (keeps fp16/bf16 finite)
CH_MULT = (1, 2, 4)  # channel multipliers of the three resolutions; only the first one changes time


class Encoder(nn.Module):
    """Normalised mel (B, n_mels, T) -> moments (B, 2E, T // 2), mean then logvar along channels."""

    def __init__(self, data_dim: int, embed_dim: int, hidden_dim: int, num_blocks: int = 2):
        super().__init__()
        dims = [hidden_dim * m for m in CH_MULT]
        self.conv_in = MPConv1d(data_dim, hidden_dim, 3)
        ins = [hidden_dim] + dims[:-1]
        self.down = nn.ModuleList(Level([c_in] + [c] * num_blocks, "down" if i == 0 else None)
                                  for i, (c_in, c) in enumerate(zip(ins, dims)))
        self.mid = Middle(dims[-1])
        self.conv_out = MPConv1d(dims[-1], 2 * embed_dim, 3)
        self.learnable_gain = nn.Parameter(torch.zeros([]))  # output gain 1 + g, starts at 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C, T)
        for level in self.down:
            for block in level.block:
                h = block(h).clamp(-CLIP_ACT, CLIP_ACT)
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # (B, C, T // 2)
        h = self.mid(h).clamp(-CLIP_ACT, CLIP_ACT)
        return self.conv_out(mp_silu(h), gain=self.learnable_gain + 1)


class Decoder(nn.Module):
    """Latent (B, E, N) -> normalised mel (B, n_mels, 2N). `up[i]` mirrors the encoder's `down[i]` and runs
    from i = 2 down to 0; the upsampler sits after level 1, so the last level runs at full time resolution."""

    def __init__(self, data_dim: int, embed_dim: int, hidden_dim: int, num_blocks: int = 2):
        super().__init__()
        dims = [hidden_dim * m for m in CH_MULT]
        self.conv_in = MPConv1d(embed_dim, dims[-1], 3)
        self.mid = Middle(dims[-1])
        ins = dims[1:] + [dims[-1]]  # the input width of level i is the output width of level i + 1
        self.up = nn.ModuleList(Level([c_in] + [c] * (num_blocks + 1), "up" if i == 1 else None)
                                for i, (c_in, c) in enumerate(zip(ins, dims)))
        self.conv_out = MPConv1d(hidden_dim, data_dim, 3)
        self.learnable_gain = nn.Parameter(torch.zeros([]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z)).clamp(-CLIP_ACT, CLIP_ACT)  # (B, C, N)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h).clamp(-CLIP_ACT, CLIP_ACT)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # (B, C, 2N)
        return self.conv_out(mp_silu(h), gain=self.learnable_gain + 1)


class MelVAE(nn.Module):
    """MMAudio-style mel VAE (released checkpoints `v1-16.pth`, `v1-44.pth`): log-mel (B, n_mels, T) <->
    latent (B, E, T // 2).

    The mel is normalised per bin with the stored `data_mean` / `data_std` (buffers of shape (1, n_mels, 1),
    part of the state dict) before encoding and un-normalised after decoding. A fresh model has mean 0 and
    std 1; set statistics of your data with `set_mel_stats` before training from scratch. Loading a released
    or saved state dict (training format, strict) brings its statistics along.
    Time: the encoder halves T with floor (average pooling by 2), as released. For odd T the latent has
    T // 2 frames: the last mel frame still reaches them through the convolutions before the pooling, but
    has no latent frame of its own, and decode(encode(mel)) has T - 1 frames. 10 s at 44.1 kHz is 861 mel
    frames -> 430 latent frames, as in the released model. Crop or pad T to even for an exact round trip.
    Call `fold_weight_norm()` (and eval()) once for inference; see `MPConv1d` for why it changes nothing
    numerically.
    """

    def __init__(self, data_dim: int, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.data_dim, self.embed_dim, self.hidden_dim = data_dim, embed_dim, hidden_dim
        self.args = dict(data_dim=data_dim, embed_dim=embed_dim, hidden_dim=hidden_dim)  # for checkpoints
        self.register_buffer("data_mean", torch.zeros(1, data_dim, 1))
        self.register_buffer("data_std", torch.ones(1, data_dim, 1))
        self.encoder = Encoder(data_dim, embed_dim, hidden_dim)
        self.decoder = Decoder(data_dim, embed_dim, hidden_dim)

    @torch.no_grad()
    def set_mel_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-bin mel statistics of the training data, mean and std each (n_mels,), in log-mel units.
        Raises ValueError on a wrong shape or a non-positive std."""
        for name, t in (("mean", mean), ("std", std)):
            if t.shape != (self.data_dim,):
                raise ValueError(f"{name} must have shape ({self.data_dim},), got {tuple(t.shape)}")
        if not (std > 0).all():
            raise ValueError("std must be positive in every bin; add a floor such as std.clamp(min=1e-3)")
        self.data_mean.copy_(mean.view(1, -1, 1))
        self.data_std.copy_(std.view(1, -1, 1))

    def normalize(self, mel: torch.Tensor) -> torch.Tensor:
        return (mel - self.data_mean) / self.data_std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.data_std + self.data_mean

    def _check_mel(self, mel: torch.Tensor) -> None:
        if mel.ndim != 3 or mel.shape[1] != self.data_dim:
            raise ValueError(f"mel must be (B, {self.data_dim}, T), got shape {tuple(mel.shape)}")
        if mel.shape[2] < 2:
            raise ValueError(f"mel needs at least 2 frames (time is halved), got {mel.shape[2]}")

    def encode(self, mel: torch.Tensor) -> tuple:
        """log-mel (B, n_mels, T) -> (mean, logvar), each (B, E, T // 2); logvar clamped to [-30, 20]."""
        self._check_mel(mel)
        moments = self.encoder(self.normalize(mel))  # (B, 2E, T // 2)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """latent (B, E, N) -> log-mel (B, n_mels, 2N)."""
        if z.ndim != 3 or z.shape[1] != self.embed_dim:
            raise ValueError(f"latent must be (B, {self.embed_dim}, N), got shape {tuple(z.shape)}; "
                             f"a transformer output (B, N, E) needs .transpose(1, 2)")
        return self.unnormalize(self.decoder(z))

    def forward(self, mel: torch.Tensor, generator: torch.Generator = None, eps: torch.Tensor = None) -> tuple:
        """The training pass: log-mel (B, n_mels, T) -> (reconstruction of the NORMALISED mel (B, n_mels,
        2 * (T // 2)), mean, logvar) through one posterior sample (see `sample_posterior` for generator/eps)."""
        mean, logvar = self.encode(mel)
        return self.decoder(sample_posterior(mean, logvar, generator, eps)), mean, logvar

    def fold_weight_norm(self) -> "MelVAE":
        """Normalise every conv weight once for inference (what the released loader does). Returns self."""
        for m in self.modules():
            if isinstance(m, MPConv1d):
                m.fold_weight_norm()
        return self

    @classmethod
    def from_pretrained(cls, state: dict) -> "MelVAE":
        """From a training-format state dict (the released `v1-44.pth`), sizes read from the shapes; weights
        normalised once for inference, eval mode. Raises ValueError if it is not a mel VAE state dict."""
        try:
            args = dict(data_dim=state["data_mean"].shape[1], embed_dim=state["decoder.conv_in.weight"].shape[1],
                        hidden_dim=state["decoder.conv_out.weight"].shape[1])
        except (KeyError, AttributeError, IndexError) as e:
            raise ValueError(f"not a mel VAE state dict ({e!r} missing)") from None
        vae = cls(**args)
        vae.load_state_dict(state)
        return vae.fold_weight_norm().eval()

    @property
    def mel_config(self) -> dict:
        """The MEL_CONFIGS entry this VAE's bins belong to (128 -> 44k, 80 -> 16k)."""
        configs = {c["n_mels"]: c for c in MEL_CONFIGS.values()}
        assert self.data_dim in configs, f"no mel config has {self.data_dim} bins"
        return configs[self.data_dim]


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator = None,
                     eps: torch.Tensor = None) -> torch.Tensor:
    """Reparameterised draw z = mean + exp(logvar / 2) * eps (Kingma & Welling 2014). eps ~ N(0, I) is drawn
    from `generator` (on mean's device), or given (same shape as mean) by a trainer that pre-draws it.
    Raises ValueError if eps has the wrong shape."""
    if eps is None:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    elif eps.shape != mean.shape:
        raise ValueError(f"eps must have the latent's shape {tuple(mean.shape)}, got {tuple(eps.shape)}")
    return mean + torch.exp(0.5 * logvar) * eps


def _unwrap(model):
    return getattr(model, "module", model)  # a DistributedDataParallel wrapper keeps the model in .module


def vae_loss(vae: MelVAE, mel: torch.Tensor, generator: torch.Generator = None, kl_weight: float = 1e-3,
             eps: torch.Tensor = None):
    """Training loss of the mel VAE: L1 reconstruction of the normalised mel + kl_weight * KL.

    mel: (B, n_mels, T) log-mel. L1 (mean over elements) on the normalised mel weighs every bin alike and
    is robust to the -11.5 silence floor of the log; KL(q(z|mel) || N(0, I)) =
    0.5 * (mean^2 + var - 1 - logvar), averaged over latent elements (Kingma & Welling 2014). The small
    weight keeps the latent close to a plain autoencoder's while bounding its scale.
    The posterior sample uses `generator`, or the given standard-normal `eps` (B, E, T // 2), so a training
    run replays exactly. For odd T the last frame is not scored (the decoder returns T - 1 frames).
    Returns (loss, {"rec": rec, "kl": kl}) with the parts detached.
    """
    recon, mean, logvar = vae(mel, generator, eps)  # through forward, so a DDP wrapper syncs the gradients
    target = _unwrap(vae).normalize(mel[:, :, :recon.shape[2]])
    rec = (recon - target).abs().mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    return rec + kl_weight * kl, {"rec": rec.detach(), "kl": kl.detach()}


def vae_44k() -> MelVAE:  # v1-44.pth, pairs with MEL_CONFIGS["44k"]
    return MelVAE(data_dim=128, embed_dim=40, hidden_dim=512)


def vae_16k() -> MelVAE:  # v1-16.pth, pairs with MEL_CONFIGS["16k"]
    return MelVAE(data_dim=80, embed_dim=20, hidden_dim=384)


def vae_small() -> MelVAE:  # ~4.8 M parameters, trainable at 16 kHz on a couple of CPU cores
    return MelVAE(data_dim=80, embed_dim=20, hidden_dim=64)


def vae_tiny() -> MelVAE:  # tests: the config of fixtures/vae_a.pt
    return MelVAE(data_dim=80, embed_dim=4, hidden_dim=32)


# Model sizes: VAES[name]() builds one; vae.args rebuilds it as MelVAE(**vae.args).
VAES = {"vae_44k": vae_44k, "vae_16k": vae_16k, "small": vae_small, "tiny": vae_tiny}


# -----------------------------------------------------------------------------
# 3. BigVGAN v2 vocoder: log-mel (B, n_mels, T) -> waveform (B, 1, T * prod(upsample_rates))


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """Windowed-sinc low-pass filter, (1, 1, kernel_size), summing to 1 (so DC passes unchanged).

    cutoff and half_width are in cycles per sample (0.5 = Nyquist). The Kaiser window's beta comes from
    Kaiser's empirical formula for the attenuation A (dB) that a transition band of 2 * half_width allows
    (Oppenheim & Schafer, "Discrete-Time Signal Processing", eq. 7.62-7.63), as in StyleGAN3 / alias-free-torch.
    """
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, periodic=False, beta=beta)
    if kernel_size % 2 == 0:
        time = torch.arange(-half, half) + 0.5  # taps sit between samples for an even length
    else:
        time = torch.arange(kernel_size) - half
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    return (taps / taps.sum()).view(1, 1, kernel_size)


class LowPassFilter(nn.Module):
    """Depthwise low-pass filter with replicate padding, then decimation by `stride`.
    (B, C, T) -> (B, C, ceil(T / stride))."""

    def __init__(self, cutoff: float, half_width: float, stride: int, kernel_size: int = 12):
        super().__init__()
        self.stride = stride
        self.pad = (kernel_size // 2 - (kernel_size % 2 == 0), kernel_size // 2)  # (left, right)
        # saved in the state dict, as in the released checkpoints
        self.register_buffer("filter", kaiser_sinc_filter(cutoff, half_width, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        x = F.pad(x, self.pad, mode="replicate")
        return F.conv1d(x, self.filter.expand(C, -1, -1), stride=self.stride, groups=C)


class UpSample(nn.Module):
    """Zero-stuffing by `ratio` then the Kaiser-sinc low-pass (a transposed depthwise conv, gain `ratio`).
    (B, C, T) -> (B, C, ratio * T)."""

    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.ratio = ratio
        self.pad = kernel_size // ratio - 1  # input frames replicated on each side
        # trim the transposed conv's output back to ratio * T, centred
        self.trim = (self.pad * ratio + (kernel_size - ratio) // 2,
                     self.pad * ratio + (kernel_size - ratio + 1) // 2)
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        x = self.ratio * F.conv_transpose1d(x, self.filter.expand(C, -1, -1), stride=self.ratio, groups=C)
        return x[..., self.trim[0]:x.shape[-1] - self.trim[1]]


class DownSample(nn.Module):
    """Kaiser-sinc low-pass then keep every `ratio`-th sample. (B, C, ratio * T) -> (B, C, T)."""

    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.lowpass = LowPassFilter(0.5 / ratio, 0.6 / ratio, ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class SnakeBeta(nn.Module):
    """SnakeBeta(x) = x + 1 / beta * sin^2(alpha * x), per channel (Ziyin et al. 2020, "Neural Networks Fail to
    Learn Periodic Functions and How to Fix It"; BigVGAN adds the separate magnitude beta). With logscale the
    stored parameters are log(alpha), log(beta) (BigVGAN v2). (B, C, T) -> (B, C, T)."""

    def __init__(self, channels: int, logscale: bool = True):
        super().__init__()
        self.logscale = logscale
        init = torch.zeros(channels) if logscale else torch.ones(channels)
        self.alpha = nn.Parameter(init.clone())
        self.beta = nn.Parameter(init.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.alpha[None, :, None], self.beta[None, :, None]
        if self.logscale:
            alpha, beta = alpha.exp(), beta.exp()
        return x + 1.0 / (beta + 1e-9) * torch.sin(x * alpha).square()


class AntiAliasedSnake(nn.Module):
    """SnakeBeta at twice the sample rate (upsample x2, activate, downsample x2), so the harmonics the
    nonlinearity creates above Nyquist are filtered instead of aliased (BigVGAN, sec. 3.2). (B, C, T) -> same."""

    def __init__(self, channels: int, logscale: bool = True):
        super().__init__()
        self.act = SnakeBeta(channels, logscale)
        self.upsample = UpSample(2, 12)
        self.downsample = DownSample(2, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


class AMPBlock(nn.Module):
    """BigVGAN's anti-aliased multi-periodicity block, resblock type "1": for each dilation d,
    x += conv_1(act(conv_d(act(x)))). (B, C, T) -> (B, C, T)."""

    def __init__(self, channels: int, kernel_size: int, dilations, logscale: bool = True):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                              padding=d * (kernel_size - 1) // 2) for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2)
                                    for _ in dilations)
        self.activations = nn.ModuleList(AntiAliasedSnake(channels, logscale) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv1, conv2) in enumerate(zip(self.convs1, self.convs2)):
            x = x + conv2(self.activations[2 * i + 1](conv1(self.activations[2 * i](x))))
        return x


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain weight from a weight-normalised pair (Salimans & Kingma 2016): w = g * v / ||v||, the norm taken
    over all dims but the first (torch's weight_norm with dim=0). g: (d0, 1, ..., 1), v: like w."""
    return v * (g / torch.linalg.vector_norm(v, dim=list(range(1, v.ndim)), keepdim=True))


# The two spellings of a weight-normalised conv in published checkpoints: torch.nn.utils.weight_norm (the
# released bigvgan_generator.pt) and torch.nn.utils.parametrizations.weight_norm (newer PyTorch).
_WEIGHT_NORM_NAMES = (("weight_g", "weight_v"),
                      ("parametrizations.weight.original0", "parametrizations.weight.original1"))


def _fold_weight_norm_on_load(module, state_dict, prefix, *args):
    """load_state_dict pre-hook of a conv: replace a weight-normalised (g, v) pair by the plain weight, once."""
    for g_name, v_name in _WEIGHT_NORM_NAMES:
        if prefix + g_name in state_dict and prefix + v_name in state_dict:
            g, v = state_dict.pop(prefix + g_name), state_dict.pop(prefix + v_name)
            state_dict[prefix + "weight"] = fold_weight_norm(g, v)


class BigVGAN(nn.Module):
    """BigVGAN v2 generator (NVIDIA, arXiv 2206.04658), inference only: log-mel (B, num_mels, T) ->
    waveform (B, 1, T * prod(upsample_rates)) in [-1, 1].

    conv_pre (k=7) -> for each rate u: transposed conv (x u, channels halve) -> mean of AMP blocks over the
    resblock kernel sizes -> anti-aliased SnakeBeta -> conv_post (k=7, 1 channel) -> clamp to [-1, 1]
    (v2 drops the final tanh and bias; `use_tanh_at_final` / `use_bias_at_final` bring them back).
    The convs hold plain weights. `load_state_dict` takes the published weight-normalised naming
    (`weight_g`/`weight_v`) or the newer `parametrizations.weight.original0/1` and folds each pair once, or
    plain `weight`; loading stays strict. `published_state_dict()` writes the `weight_g`/`weight_v` naming.
    Raises ValueError for configs other than resblock "1" with SnakeBeta activations.
    """

    def __init__(self, num_mels: int, upsample_rates, upsample_kernel_sizes, upsample_initial_channel: int,
                 resblock_kernel_sizes, resblock_dilation_sizes, resblock: str = "1",
                 activation: str = "snakebeta", snake_logscale: bool = True, use_tanh_at_final: bool = False,
                 use_bias_at_final: bool = False):
        super().__init__()
        if resblock != "1" or activation != "snakebeta":
            raise ValueError(f"only resblock '1' with 'snakebeta' (BigVGAN v2) is implemented, got resblock "
                             f"{resblock!r} and activation {activation!r}")
        if len(upsample_rates) != len(upsample_kernel_sizes):
            raise ValueError("upsample_rates and upsample_kernel_sizes must have the same length")
        self.num_mels = num_mels
        self.upsample_factor = math.prod(upsample_rates)  # waveform samples per mel frame (= hop length)
        self.use_tanh_at_final = use_tanh_at_final
        self.num_kernels = len(resblock_kernel_sizes)
        C = upsample_initial_channel
        self.conv_pre = nn.Conv1d(num_mels, C, 7, padding=3)
        # one-element lists keep the released key names (ups.{i}.0.weight)
        self.ups = nn.ModuleList(nn.ModuleList([nn.ConvTranspose1d(C >> i, C >> (i + 1), k, u, padding=(k - u) // 2)])
                                 for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)))
        self.resblocks = nn.ModuleList(AMPBlock(C >> (i + 1), k, d, snake_logscale)
                                       for i in range(len(upsample_rates))
                                       for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes))
        out_ch = C >> len(upsample_rates)
        self.activation_post = AntiAliasedSnake(out_ch, snake_logscale)
        self.conv_post = nn.Conv1d(out_ch, 1, 7, padding=3, bias=use_bias_at_final)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
                m.register_load_state_dict_pre_hook(_fold_weight_norm_on_load)

    @classmethod
    def from_config(cls, config: dict) -> "BigVGAN":
        """Build from a BigVGAN config dict (e.g. the published config.json); training-only keys such as
        sampling_rate or learning_rate are ignored. Raises KeyError naming a missing architecture key."""
        keys = ("num_mels", "upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel",
                "resblock_kernel_sizes", "resblock_dilation_sizes", "resblock", "activation", "snake_logscale",
                "use_tanh_at_final", "use_bias_at_final")
        missing = [k for k in keys[:6] if k not in config]
        if missing:
            raise KeyError(f"BigVGAN config lacks {missing}")
        return cls(**{k: config[k] for k in keys if k in config})

    @classmethod
    def from_pretrained(cls, config: dict, state: dict) -> "BigVGAN":
        """From the published folder's files: config.json (as a dict) and bigvgan_generator.pt ({"generator":
        state dict}, weight_g/weight_v naming, folded at load), read with data.read_weights. Eval mode."""
        model = cls.from_config(config)
        model.load_state_dict(state.get("generator", state), strict=True)
        model.sampling_rate = config.get("sampling_rate")
        return model.eval()

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.ndim != 3 or mel.shape[1] != self.num_mels:
            raise ValueError(f"mel must be (B, {self.num_mels}, T), got shape {tuple(mel.shape)}")
        x = self.conv_pre(mel)  # (B, C, T)
        for i, (up,) in enumerate(self.ups):
            x = up(x)  # (B, C / 2^(i+1), T * u_0 * ... * u_i)
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        x = self.conv_post(self.activation_post(x))  # (B, 1, S)
        return torch.tanh(x) if self.use_tanh_at_final else x.clamp(-1.0, 1.0)

    def published_state_dict(self) -> dict:
        """The state dict in the published naming: each conv as bias, weight_g = ||w|| over all dims but the
        first, weight_v = w (so weight_g * weight_v / ||weight_v|| = w), in the published key order."""
        convs = {name for name, m in self.named_modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))}
        out, pending = {}, {}
        for name, t in self.state_dict().items():
            module, _, leaf = name.rpartition(".")
            if module in convs and leaf == "weight":
                g = torch.linalg.vector_norm(t, dim=list(range(1, t.ndim)), keepdim=True)
                pending = {f"{module}.weight_g": g, f"{module}.weight_v": t}
                if getattr(self.get_submodule(module), "bias", None) is None:
                    out.update(pending)
                continue
            out[name] = t
            if module in convs and leaf == "bias":
                out.update(pending)  # the published files list a conv's bias before its (g, v)
        return out


# Architecture keys of BigVGAN configs: BigVGAN.from_config(BIGVGAN_CONFIGS[name]).
BIGVGAN_CONFIGS = {
    # the released 44.1 kHz vocoder: hop 512 (8*4*2*2*2*2), 128 mel bins, pairs with MEL_CONFIGS["44k"]
    "bigvgan_v2_44khz_128band_512x": dict(
        num_mels=128, upsample_rates=[8, 4, 2, 2, 2, 2], upsample_kernel_sizes=[16, 8, 4, 4, 4, 4],
        upsample_initial_channel=1536, resblock_kernel_sizes=[3, 7, 11],
        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], resblock="1", activation="snakebeta",
        snake_logscale=True, use_tanh_at_final=False, use_bias_at_final=False),
    # tests: 80 mel bins, x8 (the config of fixtures/bigvgan_a.pt)
    "tiny": dict(
        num_mels=80, upsample_rates=[4, 2], upsample_kernel_sizes=[8, 4], upsample_initial_channel=32,
        resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]], resblock="1",
        activation="snakebeta", snake_logscale=True, use_tanh_at_final=False, use_bias_at_final=False),
}
