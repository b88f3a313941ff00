"""The audio side of Resonate, with the key names of the released `v1-44.pth` and `bigvgan_generator.pt`:
  1. waveform -> log-mel (`MelSpectrogram`), and back without a vocoder (`griffin_lim`),
  2. log-mel <-> latent: MMAudio's mel VAE of EDM2 magnitude-preserving layers (`MelVAE`, arXiv 2312.02696),
  3. log-mel -> waveform: the BigVGAN v2 vocoder (`BigVGAN`, arXiv 2206.04658)."""

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Log-mel front end

# The settings the released VAEs were trained on. Hz for rates and frequencies, samples for n_fft, hop and window.
MEL_CONFIGS = {
    "16k": dict(sample_rate=16_000, n_mels=80, n_fft=1024, hop_length=256, win_length=1024,
                f_min=0.0, f_max=8_000.0, log_base=10.0),
    "44k": dict(sample_rate=44_100, n_mels=128, n_fft=2048, hop_length=512, win_length=2048,
                f_min=0.0, f_max=22_050.0, log_base=math.e),
}


def get_mel_config(config) -> dict:
    """A key of MEL_CONFIGS, or one of its dicts, -> that dict. Raises ValueError for an unknown key."""
    if isinstance(config, dict):
        return config
    if config not in MEL_CONFIGS:
        raise ValueError(f"unknown mel config {config!r}; use one of {sorted(MEL_CONFIGS)}")
    return MEL_CONFIGS[config]


def mel_filterbank(cfg: dict) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) float64: librosa's default Slaney-scale, Slaney-normalised triangles."""
    from transformers.audio_utils import mel_filter_bank  # here, not at the top: transformers imports slowly
    fb = mel_filter_bank(cfg["n_fft"] // 2 + 1, cfg["n_mels"], cfg["f_min"], cfg["f_max"], cfg["sample_rate"],
                         norm="slaney", mel_scale="slaney")
    return torch.from_numpy(fb.T.copy())


def num_mel_frames(num_samples: int, config="44k") -> int:
    """Mel frames T for S samples: reflect-padded by (n_fft - hop) // 2 a side, uncentred frames; S // hop here."""
    cfg = get_mel_config(config)
    pad = (cfg["n_fft"] - cfg["hop_length"]) // 2
    return (num_samples + 2 * pad - cfg["n_fft"]) // cfg["hop_length"] + 1


def num_latent_frames(seconds: float, config="44k", cover=False) -> int:
    """Half the mel frames of `seconds`: floored (10 s at 44k: 430), or ceiled if cover, as released (431)."""
    cfg = get_mel_config(config)
    if cover:
        return math.ceil(seconds * cfg["sample_rate"] / cfg["hop_length"] / 2)
    return num_mel_frames(round(seconds * cfg["sample_rate"]), cfg) // 2


def _stft(waveform: torch.Tensor, cfg: dict, window: torch.Tensor) -> torch.Tensor:
    # (B, S) -> complex (B, n_fft // 2 + 1, T), framed as in num_mel_frames
    pad = (cfg["n_fft"] - cfg["hop_length"]) // 2
    padded = F.pad(waveform.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    return torch.stft(padded, cfg["n_fft"], hop_length=cfg["hop_length"], window=window, center=False,
                      return_complex=True)


def _istft(spec: torch.Tensor, cfg: dict, window: torch.Tensor) -> torch.Tensor:
    # complex (B, F, T) -> (B, T * hop): _stft's least-squares inverse (Griffin & Lim 1984, eq. 6); torch.istft
    # refuses uncentred frames
    B, _, T = spec.shape
    frames = torch.fft.irfft(spec, n=cfg["n_fft"], dim=1) * window[:, None]  # (B, n_fft, T)
    length = cfg["n_fft"] + (T - 1) * cfg["hop_length"]
    fold = dict(output_size=(1, length), kernel_size=(1, cfg["n_fft"]), stride=(1, cfg["hop_length"]))
    signal = F.fold(frames, **fold).view(B, length)  # overlap-add
    norm = F.fold(window.square()[None, :, None].expand(1, -1, T), **fold).view(1, length)
    signal = torch.where(norm > 1e-6, signal / norm.clamp(min=1e-6), torch.zeros_like(signal))
    pad = (cfg["n_fft"] - cfg["hop_length"]) // 2
    return signal[:, pad:pad + T * cfg["hop_length"]]  # drop the reflect padding


class MelSpectrogram(nn.Module):
    """The released front end: waveform (B, S) in [-1, 1] -> log_base(max(mel, 1e-5)) (B, n_mels, S // hop)."""

    def __init__(self, config="44k"):
        super().__init__()
        self.cfg = get_mel_config(config)
        self.register_buffer("mel_basis", mel_filterbank(self.cfg).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(self.cfg["win_length"]), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        assert waveform.ndim == 2, f"waveform must be (B, S), got {tuple(waveform.shape)}"
        spec = _stft(waveform.float().clamp(-1.0, 1.0), self.cfg, self.window)  # (B, F, T), clamped as released
        magnitude = torch.sqrt(spec.real.square() + spec.imag.square() + 1e-9)
        mel = self.mel_basis @ magnitude  # (B, n_mels, T)
        return mel.clamp(min=1e-5).log() / math.log(self.cfg["log_base"])


def griffin_lim(mel: torch.Tensor, mel_config="44k", n_iter: int = 32, momentum: float = 0.99, generator=None):
    """Log-mel (B, n_mels, T) -> waveform (B, T * hop): pseudo-inverse mel, fast Griffin-Lim (Perraudin et al. 2013)."""
    cfg = get_mel_config(mel_config)
    assert mel.ndim == 3 and mel.shape[1] == cfg["n_mels"], f"mel {tuple(mel.shape)} for {cfg['n_mels']} bins"
    device = mel.device
    inverse = torch.linalg.pinv(mel_filterbank(cfg)).float().to(device)  # (F, n_mels)
    magnitude = (inverse @ (mel.float() * math.log(cfg["log_base"])).exp()).clamp(min=0)  # (B, F, T)
    window = torch.hann_window(cfg["win_length"], device=device)
    generator = generator or torch.Generator().manual_seed(0)
    phase = torch.rand(magnitude.shape, generator=generator, device=generator.device).to(device)
    angles = torch.polar(torch.ones_like(magnitude), 2 * math.pi * phase)
    previous = torch.zeros_like(angles)
    for _ in range(n_iter):
        rebuilt = _stft(_istft(magnitude * angles, cfg, window), cfg, window)
        angles = rebuilt - (momentum / (1 + momentum)) * previous  # the "fast" extrapolation
        angles = angles / (angles.abs() + 1e-16)
        previous = rebuilt
    return _istft(magnitude * angles, cfg, window)


class GriffinLim(nn.Module):
    """Griffin-Lim behind BigVGAN's interface: mel (B, n_mels, T) -> waveform (B, 1, T * hop)."""

    def __init__(self, mel_config):
        super().__init__()
        cfg = self.cfg = get_mel_config(mel_config)
        self.num_mels, self.upsample_factor, self.sampling_rate = cfg["n_mels"], cfg["hop_length"], cfg["sample_rate"]

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return griffin_lim(mel, self.cfg).unsqueeze(1)


# -----------------------------------------------------------------------------
# 2. Mel VAE (MMAudio's 1-D conv VAE) from EDM2 magnitude-preserving layers


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + RMS of x over `dim`), default all dims but the first (EDM2 eq. 66); the norm in float32."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / 0.596  # EDM2 eq. 81: 0.596 is SiLU's output RMS for unit-normal input


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)  # EDM2 eq. 88: lerp rescaled to unit variance


class MPConv1d(nn.Module):
    """EDM2 conv, no bias, w = normalize(weight) / sqrt(fan_in) (eq. 47, 66): (B, C_in, T) -> (B, C_out, T).
    fold_weight_norm() stores normalize(weight) once for inference (the state dict keeps its training format)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size))
        self.folded = False  # weight already normalised, by fold_weight_norm

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        if self.training:  # forced weight normalisation: the stored weight is renormalised in place
            assert not self.folded, "a folded MPConv1d is for inference; reload the state dict to train"
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight))
        w = self.weight if self.folded else normalize(self.weight)
        w = w * (gain / math.sqrt(w[0].numel()))
        return F.conv1d(x, w, padding=w.shape[-1] // 2)

    @torch.no_grad()
    def fold_weight_norm(self) -> "MPConv1d":
        if not self.folded:
            self.weight.copy_(normalize(self.weight))
            self.folded = True
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.folded = False


class ResBlock(nn.Module):
    """Pixel norm, (mp_silu -> conv) x 2, mp_sum(t=0.3) with the (projected) input. (B, C_in, T) -> (B, C_out, T)."""

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
    """Single-head self-attention over time with q, k, v each unit RMS per position. (B, C, T) -> (B, C, T)."""

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
    """1x1 conv, average-pool time by 2 (floors odd T), 1x1 conv. (B, C, T) -> (B, C, T // 2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = MPConv1d(dim, dim, 1)
        self.conv2 = MPConv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.avg_pool1d(self.conv1(x), kernel_size=2, stride=2))


class Upsample(nn.Module):
    """Repeat each frame twice, then a conv. (B, C, T) -> (B, C, 2T)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = MPConv1d(dim, dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.repeat_interleave(2, dim=-1))


CLIP_ACT = 256.0  # activations are clamped to +-CLIP_ACT between stages (keeps fp16/bf16 finite)
CH_MULT = (1, 2, 4)  # channel multipliers of the three resolutions; only the first one changes time


class Level(nn.Module):
    """ResBlocks at one resolution, then the resampler if any (`downsample` or `upsample`, the released keys)."""

    def __init__(self, dims: list, resample: str = None):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(a, b) for a, b in zip(dims[:-1], dims[1:]))
        if resample == "down":
            self.downsample = Downsample(dims[-1])
        elif resample == "up":
            self.upsample = Upsample(dims[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x).clamp(-CLIP_ACT, CLIP_ACT)
        if hasattr(self, "downsample"):
            return self.downsample(x)
        return self.upsample(x) if hasattr(self, "upsample") else x


class Middle(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.block_1 = ResBlock(dim, dim)
        self.attn_1 = AttnBlock(dim)
        self.block_2 = ResBlock(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


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
            h = level(h)  # (B, C', T // 2) from level 0 on
        h = self.mid(h).clamp(-CLIP_ACT, CLIP_ACT)
        return self.conv_out(mp_silu(h), gain=self.learnable_gain + 1)


class Decoder(nn.Module):
    """Latent (B, E, N) -> normalised mel (B, n_mels, 2N). `up[i]` mirrors `down[i]` and runs from i = 2 to 0."""

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
            h = level(h)  # (B, C', 2N) from level 1 on
        return self.conv_out(mp_silu(h), gain=self.learnable_gain + 1)


class MelVAE(nn.Module):
    """MMAudio's mel VAE (`v1-16.pth`, `v1-44.pth`): log-mel (B, n_mels, T) <-> latent (B, E, T // 2). The mel is
    normalised per bin by the saved `data_mean`, `data_std` (1, n_mels, 1); fold_weight_norm() once for inference."""

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
        """Per-bin mean and std (n_mels,) of the training log-mels."""
        assert mean.shape == std.shape == (self.data_dim,) and (std > 0).all(), (mean.shape, std.shape)
        self.data_mean.copy_(mean.view(1, -1, 1))
        self.data_std.copy_(std.view(1, -1, 1))

    def normalize(self, mel: torch.Tensor) -> torch.Tensor:
        return (mel - self.data_mean) / self.data_std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.data_std + self.data_mean

    def encode(self, mel: torch.Tensor) -> tuple:
        """log-mel (B, n_mels, T >= 2) -> (mean, logvar), each (B, E, T // 2); logvar clamped to [-30, 20]."""
        assert mel.ndim == 3 and mel.shape[1] == self.data_dim and mel.shape[2] >= 2, tuple(mel.shape)
        mean, logvar = self.encoder(self.normalize(mel)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """latent (B, E, N) -> log-mel (B, n_mels, 2N)."""
        assert z.ndim == 3 and z.shape[1] == self.embed_dim, f"latent must be (B, E, N), got {tuple(z.shape)}"
        return self.unnormalize(self.decoder(z))

    def forward(self, mel: torch.Tensor, generator=None, kl_weight: float = 1e-3, eps: torch.Tensor = None) -> tuple:
        """The training loss of log-mel (B, n_mels, T): L1 on the normalised mel + kl_weight * KL(q(z|mel) || N(0, I))
        (Kingma & Welling 2014), eps (B, E, T // 2) given or drawn. Returns (loss, {"rec", "kl"} detached)."""
        mean, logvar = self.encode(mel)
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        assert eps.shape == mean.shape, f"eps {tuple(eps.shape)} for a latent {tuple(mean.shape)}"
        recon = self.decoder(mean + torch.exp(0.5 * logvar) * eps)  # (B, n_mels, 2 * (T // 2))
        rec = (recon - self.normalize(mel[:, :, :recon.shape[2]])).abs().mean()  # an odd T's last frame unscored
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        return rec + kl_weight * kl, {"rec": rec.detach(), "kl": kl.detach()}

    def fold_weight_norm(self) -> "MelVAE":
        """Normalise every conv weight once, for inference (as the released loader does, up to rounding)."""
        for m in self.modules():
            if isinstance(m, MPConv1d):
                m.fold_weight_norm()
        return self

    @classmethod
    def from_pretrained(cls, state: dict) -> "MelVAE":
        """From a state dict such as `v1-44.pth`; folded, eval mode. Raises ValueError if it is no mel VAE's."""
        try:
            args = dict(data_dim=state["data_mean"].shape[1], embed_dim=state["decoder.conv_in.weight"].shape[1],
                        hidden_dim=state["decoder.conv_out.weight"].shape[1])
        except (KeyError, AttributeError, IndexError) as e:
            raise ValueError(f"not a mel VAE state dict ({e!r} missing)") from None
        with torch.device("meta"):  # nothing allocated until the file's tensors are assigned
            vae = cls(**args)
        vae.load_state_dict(state, assign=True)
        return vae.fold_weight_norm().eval()

    @property
    def mel_config(self) -> dict:
        """The MEL_CONFIGS entry of this VAE's mel bins; ValueError for a VAE of other bins."""
        configs = {c["n_mels"]: c for c in MEL_CONFIGS.values()}
        if self.data_dim not in configs:
            raise ValueError(f"a VAE of {self.data_dim} mel bins fits no mel config (vae.MEL_CONFIGS: 80 or 128 bins)")
        return configs[self.data_dim]


# Model sizes: VAES[name]() builds one; MelVAE(**vae.args) rebuilds it.
VAES = {
    "vae_44k": lambda: MelVAE(data_dim=128, embed_dim=40, hidden_dim=512),  # v1-44.pth, MEL_CONFIGS["44k"]
    "vae_16k": lambda: MelVAE(data_dim=80, embed_dim=20, hidden_dim=384),  # v1-16.pth, MEL_CONFIGS["16k"]
    "small": lambda: MelVAE(data_dim=80, embed_dim=20, hidden_dim=64),  # 4.8 M parameters, trains on a CPU
    "tiny": lambda: MelVAE(data_dim=80, embed_dim=4, hidden_dim=32),  # tests: the config of fixtures/vae_a.pt
}


# -----------------------------------------------------------------------------
# 3. BigVGAN v2 vocoder: log-mel (B, n_mels, T) -> waveform (B, 1, T * prod(upsample_rates))


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """BigVGAN's Kaiser-windowed sinc low-pass (1, 1, kernel_size), sum 1; cutoff, half_width in cycles per sample."""
    assert kernel_size % 2 == 0, "taps sit between samples, as in BigVGAN's even-length filters"
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95  # Oppenheim & Schafer, eq. 7.62
    assert attenuation > 50.0, "Kaiser's beta below is the formula for A > 50 dB"
    window = torch.kaiser_window(kernel_size, periodic=False, beta=0.1102 * (attenuation - 8.7))
    time = torch.arange(-half, half) + 0.5
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    return (taps / taps.sum()).view(1, 1, kernel_size)


class SincUpsample(nn.Module):
    """BigVGAN's anti-aliased upsampler: zero-stuffing, Kaiser-sinc low-pass. (B, C, T) -> (B, C, ratio * T)."""

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


class SincDownsample(nn.Module):
    """BigVGAN's anti-aliased downsampler: the Kaiser-sinc low-pass, strided. (B, C, ratio * T) -> (B, C, T)."""

    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.ratio = ratio
        self.pad = (kernel_size // 2 - 1, kernel_size // 2)  # (left, right) for an even kernel
        self.lowpass = nn.Module()  # only holds the filter, under the released key lowpass.filter
        self.lowpass.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        x = F.pad(x, self.pad, mode="replicate")
        return F.conv1d(x, self.lowpass.filter.expand(C, -1, -1), stride=self.ratio, groups=C)


class SnakeBeta(nn.Module):
    """x + 1 / beta * sin^2(alpha * x) per channel (Ziyin et al. 2020; BigVGAN adds beta, v2 stores their logs)."""

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
    """SnakeBeta at twice the rate, so its harmonics above Nyquist are filtered, not aliased (BigVGAN sec. 3.2)."""

    def __init__(self, channels: int, logscale: bool = True):
        super().__init__()
        self.act = SnakeBeta(channels, logscale)
        self.upsample = SincUpsample(2, 12)
        self.downsample = SincDownsample(2, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


class AMPBlock(nn.Module):
    """BigVGAN's anti-aliased multi-periodicity block (resblock "1"): x += conv(act(conv_d(act(x)))) per dilation d."""

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


# (g, v) as torch.nn.utils.weight_norm saves them (bigvgan_generator.pt), and as parametrizations.weight_norm does
_WEIGHT_NORM_NAMES = (("weight_g", "weight_v"),
                      ("parametrizations.weight.original0", "parametrizations.weight.original1"))


def _merge_weight_norm_on_load(module, state_dict, prefix, *args):
    # load_state_dict pre-hook of a conv: the pair becomes the plain weight w = g * v / ||v|| (Salimans & Kingma 2016)
    for g_name, v_name in _WEIGHT_NORM_NAMES:
        if prefix + g_name in state_dict and prefix + v_name in state_dict:
            g, v = state_dict.pop(prefix + g_name), state_dict.pop(prefix + v_name)
            norm = torch.linalg.vector_norm(v, dim=list(range(1, v.ndim)), keepdim=True)  # weight_norm's dim=0
            state_dict[prefix + "weight"] = v * (g / norm)


class BigVGAN(nn.Module):
    """BigVGAN v2 generator, inference only: log-mel (B, num_mels, T) -> waveform (B, 1, T * prod(upsample_rates))
    in [-1, 1]. Raises ValueError for configs other than resblock "1" with SnakeBeta."""

    def __init__(self, num_mels: int, upsample_rates, upsample_kernel_sizes, upsample_initial_channel: int,
                 resblock_kernel_sizes, resblock_dilation_sizes, resblock: str = "1",
                 activation: str = "snakebeta", snake_logscale: bool = True, use_tanh_at_final: bool = False,
                 use_bias_at_final: bool = False):
        super().__init__()
        if resblock != "1" or activation != "snakebeta":
            raise ValueError(f"only resblock '1' with 'snakebeta' (BigVGAN v2) is implemented, got resblock "
                             f"{resblock!r} and activation {activation!r}")
        assert len(upsample_rates) == len(upsample_kernel_sizes), (upsample_rates, upsample_kernel_sizes)
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
                m.register_load_state_dict_pre_hook(_merge_weight_norm_on_load)

    @classmethod
    def from_config(cls, config: dict) -> "BigVGAN":
        """From a config dict such as config.json, other keys ignored. Raises TypeError naming a missing key."""
        arch = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in config.items() if k in arch})

    @classmethod
    def from_pretrained(cls, config: dict, state: dict) -> "BigVGAN":
        """From config.json (as a dict) and bigvgan_generator.pt ({"generator": state dict}); eval mode."""
        with torch.device("meta"):  # nothing allocated until the file's tensors are assigned
            model = cls.from_config(config)
        model.load_state_dict(state.get("generator", state), strict=True, assign=True)
        model.sampling_rate = config.get("sampling_rate")
        return model.eval()

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        assert mel.ndim == 3 and mel.shape[1] == self.num_mels, f"mel {tuple(mel.shape)} for {self.num_mels} bins"
        x = self.conv_pre(mel)  # (B, C, T)
        for i, (up,) in enumerate(self.ups):
            x = up(x)  # (B, C / 2^(i+1), T * u_0 * ... * u_i)
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        x = self.conv_post(self.activation_post(x))  # (B, 1, S)
        return torch.tanh(x) if self.use_tanh_at_final else x.clamp(-1.0, 1.0)


# Architecture keys of BigVGAN configs, BigVGAN.from_config(BIGVGAN_CONFIGS[name]); the rest are BigVGAN's defaults.
BIGVGAN_CONFIGS = {
    # the released 44.1 kHz vocoder: hop 512 (8*4*2*2*2*2), 128 mel bins, pairs with MEL_CONFIGS["44k"]
    "bigvgan_v2_44khz_128band_512x": dict(
        num_mels=128, upsample_rates=[8, 4, 2, 2, 2, 2], upsample_kernel_sizes=[16, 8, 4, 4, 4, 4],
        upsample_initial_channel=1536, resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3),
    # tests: 80 mel bins, x8 (the config of fixtures/bigvgan_a.pt)
    "tiny": dict(num_mels=80, upsample_rates=[4, 2], upsample_kernel_sizes=[8, 4], upsample_initial_channel=32,
                 resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5]] * 2),
}
