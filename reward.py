"""Rewards and evaluation metrics. Every scorer is a Reward: score(audio (B, S) float, sample_rate, prompts) -> (B,)
float32, higher is better. In order: signal-level rewards (no download), Audiobox Aesthetics ("aes"), CLAPScore
("clap", Microsoft CLAP 2023), LAION-CLAP ("laion_clap"), the Qwen-Omni judge ("qwen_omni", the training reward, and
"aqa", AQAScore), and build_reward("loudness:1.0,clap:0.5") -> a WeightedSum of REWARDS entries."""

import dataclasses
import functools
import inspect
import json
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from data import WeightsMissing, hub_files, pick_device, read_weights, resample, seeded_generator

# ---------------------------------------------------------------- the interface


def prepare_audio(audio, sample_rate, target_rate, prompts) -> torch.Tensor:
    """(B, S) float at `sample_rate` Hz -> (B, S') float32 at `target_rate` (None: as is); ValueError for bad input."""
    if not torch.is_tensor(audio) or audio.ndim != 2 or not audio.is_floating_point():
        shape = tuple(audio.shape) if torch.is_tensor(audio) else type(audio).__name__
        raise ValueError(f"audio must be a (B, S) float tensor, got {shape}; squeeze a (B, 1, S) vocoder output")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer in Hz, got {sample_rate!r}")
    if isinstance(prompts, str) or len(prompts) != audio.shape[0]:
        raise ValueError(f"need one prompt per clip: {audio.shape[0]} clips, prompts={prompts!r:.80}")
    audio = audio.detach().float()
    return audio if target_rate is None else resample(audio, int(sample_rate), int(target_rate))


class Reward:
    """Subclasses set `sample_rate` (Hz; None: any) and implement score, or score_all with a "score" column."""
    sample_rate = None

    def score(self, audio, sample_rate, prompts) -> torch.Tensor:
        if type(self).score_all is Reward.score_all:
            raise NotImplementedError(f"{type(self).__name__} implements neither score nor score_all")
        return self.score_all(audio, sample_rate, prompts)["score"]

    def score_all(self, audio, sample_rate, prompts, ids=None) -> dict:
        """{column: (B,) float32} (bench.py's columns); ids: the prompt ids, for scorers that draw per clip."""
        return {"score": self.score(audio, sample_rate, prompts)}

    def __call__(self, audio, sample_rate, prompts):
        return self.score(audio, sample_rate, prompts)


# ---------------------------------------------------------------- signal-level rewards (no download)

class LoudnessReward(Reward):
    """-|RMS level (dBFS) - target_db| per clip (silence: -200 dBFS): a quick reward to check the RL loop on a CPU."""
    def __init__(self, target_db: float = -20.0):
        self.target_db = float(target_db)

    def score(self, audio, sample_rate, prompts):
        audio = prepare_audio(audio, sample_rate, None, prompts)
        rms = audio.pow(2).mean(-1).clamp_min(1e-20).sqrt()  # (B,)
        return -(20 * torch.log10(rms) - self.target_db).abs()


class SpectralCentroidReward(Reward):
    """-|log2(centroid / target_hz)| (octaves); centroid: the mean frequency of the clip's Hann-windowed spectrum."""
    def __init__(self, target_hz: float = 1000.0):
        if target_hz <= 0:
            raise ValueError(f"target_hz must be positive, got {target_hz}")
        self.target_hz = float(target_hz)

    def score(self, audio, sample_rate, prompts):
        audio = prepare_audio(audio, sample_rate, None, prompts)
        S = audio.shape[-1]
        magnitude = torch.fft.rfft(audio * torch.hann_window(S, device=audio.device)).abs()  # (B, S // 2 + 1)
        freqs = torch.fft.rfftfreq(S, d=1.0 / sample_rate).to(audio.device)
        centroid = (magnitude * freqs).sum(-1) / magnitude.sum(-1).clamp_min(1e-12)  # (B,) Hz
        return -torch.log2(centroid.clamp_min(1.0) / self.target_hz).abs()


# ---------------------------------------------------------------- Audiobox Aesthetics

AES_AXES = ("CE", "CU", "PC", "PQ")  # content enjoyment, content usefulness, production complexity, production quality
AES_REPO, AES_FILE = "facebook/audiobox-aesthetics", "checkpoint.pt"  # audiobox_aesthetics/utils.py, DEFAULT_CKPT_FNAME
# The WavLM (base size) backbone the package builds for every checkpoint (audiobox_aesthetics/model/aes.py,
# DEFAULT_AUDIO_CFG): the fields that shape the weights or the forward pass. The checkpoint does not store it.
AES_WAVLM = {"extractor_mode": "default", "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
             "conv_bias": False, "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
             "encoder_attention_heads": 12, "activation_fn": "gelu", "layer_norm_first": False, "conv_pos": 128,
             "conv_pos_groups": 16, "relative_position_embedding": True, "num_buckets": 320, "max_distance": 800,
             "gru_rel_pos": True, "normalize": False}
# Official AesMultiOutput state-dict names -> ours (transformers' WavLMModel under `wavlm`, the heads under `heads`)
AES_KEY_MAP = [
    (r"^model\.", ""),  # checkpoint.pt's prefix, which the package strips
    (r"^wavlm_model\.mask_emb$", "wavlm.masked_spec_embed"),
    (r"conv_layers\.(\d+)\.0\.", r"conv_layers.\1.conv."),  # blocks: Sequential(conv, dropout, [norm,] gelu)
    (r"conv_layers\.0\.2\.", "conv_layers.0.layer_norm."),  # the group norm of the first conv block
    (r"^wavlm_model\.layer_norm\.", "wavlm.feature_projection.layer_norm."),
    (r"^wavlm_model\.post_extract_proj\.", "wavlm.feature_projection.projection."),
    (r"pos_conv\.0\.weight_g$", "pos_conv_embed.conv.parametrizations.weight.original0"),  # weight norm, dim=2
    (r"pos_conv\.0\.weight_v$", "pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"pos_conv\.0\.bias$", "pos_conv_embed.conv.bias"),
    (r"self_attn\.grep_a$", "attention.gru_rel_pos_const"),
    (r"self_attn\.grep_linear\.", "attention.gru_rel_pos_linear."),
    (r"self_attn\.relative_attention_bias\.", "attention.rel_attn_embed."),  # first layer only, in both
    (r"self_attn\.", "attention."),
    (r"self_attn_layer_norm\.", "layer_norm."),
    (r"fc1\.", "feed_forward.intermediate_dense."),
    (r"fc2\.", "feed_forward.output_dense."),
    (r"^wavlm_model\.", "wavlm."),
    (r"^proj_layer\.", "heads."),
]


def rename_key(name: str, rules) -> str:
    """An official state-dict name rewritten by every (regex, replacement) rule in turn: ours."""
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


class AesModel(nn.Module):
    """The package's AesMultiOutput on transformers' WavLM, from its WavLM dict (AES_WAVLM) and the checkpoint's
    model_cfg: per axis a softmax-weighted sum of all hidden states, mean over real frames, L2 norm, a linear head."""
    def __init__(self, wavlm_config: dict, model_cfg: dict):
        from transformers import WavLMConfig, WavLMModel
        super().__init__()
        c, m = wavlm_config, model_cfg
        assert c["extractor_mode"] == "default" and not c["layer_norm_first"] and not c["normalize"], c
        assert c["relative_position_embedding"] and c["gru_rel_pos"], "transformers' WavLM always has both"
        assert m["use_weighted_layer_sum"] and m["normalize_embed"] and m["proj_num_layer"] == 1, m  # as published
        # "[(512,10,5)] + [(512,3,2)] * 4" -> (dim, kernel, stride) per conv layer, read without eval
        terms = re.findall(r"\[\((\d+),\s*(\d+),\s*(\d+)\)\]\s*(?:\*\s*(\d+))?", c["conv_feature_layers"])
        dims, kernels, strides = zip(*[(int(d), int(k), int(s)) for d, k, s, n in terms for _ in range(int(n or 1))])
        self.wavlm = WavLMModel(WavLMConfig(
            hidden_size=c["encoder_embed_dim"], num_hidden_layers=c["encoder_layers"],
            num_attention_heads=c["encoder_attention_heads"], intermediate_size=c["encoder_ffn_embed_dim"],
            hidden_act=c["activation_fn"], feat_extract_norm="group", conv_dim=dims, conv_kernel=kernels,
            conv_stride=strides, conv_bias=c["conv_bias"], num_conv_pos_embeddings=c["conv_pos"],
            num_conv_pos_embedding_groups=c["conv_pos_groups"], num_buckets=c["num_buckets"],
            max_bucket_distance=c["max_distance"]))
        dim, L = self.wavlm.config.hidden_size, m["nth_layer"]
        assert L == self.wavlm.config.num_hidden_layers + 1, "the package's layer sum only works on all the states"
        self.layer_weights = nn.ParameterDict({a: nn.Parameter(torch.full((L,), 1 / L)) for a in AES_AXES})
        self.heads = nn.ModuleDict({a: nn.Sequential(nn.Linear(dim, m["output_dim"])) for a in AES_AXES})

    @classmethod
    def from_official(cls, wavlm_config, model_cfg, state_dict):
        with torch.device("meta"):
            model = cls(wavlm_config, model_cfg)
        model.load_state_dict({rename_key(k, AES_KEY_MAP): v for k, v in state_dict.items()}, assign=True)
        return model

    def hidden_states(self, wav, valid):
        """(N, W) 16 kHz windows, (N, W) bool real samples -> (N, T, D, L) states, (N, T) bool real frames."""
        # layer by layer with our frame mask: the package pads a frame only when all its samples are padding
        wavlm, encoder = self.wavlm, self.wavlm.encoder
        x = wavlm.feature_extractor(wav).transpose(1, 2)  # (N, T, C)
        N, T, _ = x.shape
        frames = valid[:, : wav.shape[1] // T * T].reshape(N, T, -1).any(-1)  # the tail W mod T is dropped
        x, _ = wavlm.feature_projection(x)  # layer norm, projection: (N, T, D)
        x = x.masked_fill(~frames[..., None], 0.0)
        x = encoder.layer_norm(x + encoder.pos_conv_embed(x))
        states, position_bias = [x], None  # the relative position bias comes from layer 0, shared by the rest
        for layer in encoder.layers:
            x, position_bias = layer(x, attention_mask=frames, position_bias=position_bias)
            states.append(x)
        return torch.stack(states, dim=-1), frames

    def forward(self, wav, valid) -> dict:
        """-> {axis: (N,)} predictions in normalised units."""
        states, frames = self.hidden_states(wav, valid)
        keep = frames[..., None].float()  # (N, T, 1)
        preds = {}
        for axis, head in self.heads.items():
            embed = states @ self.layer_weights[axis].softmax(-1)  # (N, T, D)
            embed = (embed * keep).sum(1) / keep.sum(1).clamp(min=1)  # mean over the real frames
            preds[axis] = head(F.normalize(embed, dim=-1)).squeeze(-1)
        return preds


class AudioboxAesthetics(Reward):
    """Audiobox Aesthetics (arXiv 2502.05139; audiobox-aesthetics 0.0.4, AesPredictor.forward): CE, CU, PC, PQ (1-10)
    of 10 s windows, weighted by their share of audio; caption unused. score: `axis` (ValueError for an unknown one)."""
    sample_rate = 16000
    WINDOW_SECONDS = 10

    def __init__(self, model, target_transform, axis="PQ", device=None, max_windows=16):
        if axis not in AES_AXES:
            raise ValueError(f"axis must be one of {', '.join(AES_AXES)}, got {axis!r}")
        self.device = pick_device(device or "auto")
        self.model = model.to(self.device, torch.float32).eval()
        self.target_transform = {a: (float(t["mean"]), float(t["std"])) for a, t in target_transform.items()}
        self.axis, self.max_windows = axis, max_windows

    @classmethod
    def from_pretrained(cls, weights_dir=None, device=None, axis="PQ", max_windows=16, wavlm_config=AES_WAVLM):
        """facebook/audiobox-aesthetics' checkpoint.pt (~416 MB) via data.hub_files (raises data.WeightsMissing)."""
        ckpt = read_weights(hub_files(AES_REPO, [AES_FILE], weights_dir)[AES_FILE])
        model = AesModel.from_official(wavlm_config, ckpt["model_cfg"], ckpt["state_dict"])
        return cls(model, ckpt["target_transform"], axis, device, max_windows)

    @torch.no_grad()
    def score_all(self, audio, sample_rate, prompts, ids=None) -> dict:
        wave = prepare_audio(audio, sample_rate, self.sample_rate, prompts).to(self.device)
        (B, S), W, m = wave.shape, self.WINDOW_SECONDS * self.sample_rate, self.max_windows
        n = -(-S // W)  # windows per clip
        windows = F.pad(wave, (0, n * W - S)).reshape(B * n, W)  # (B n, W), clip-major
        valid = (torch.arange(n * W, device=self.device) < S).reshape(n, W).repeat(B, 1)  # (B n, W)
        fill = valid.float().mean(-1).view(B, n)  # each window's weight
        with torch.autocast(self.device.type, enabled=False):
            preds = [self.model(windows[i:i + m], valid[i:i + m]) for i in range(0, B * n, m)]
        per_window = {a: torch.cat([p[a] for p in preds]).view(B, n) * std + mean
                      for a, (mean, std) in self.target_transform.items()}  # (B, n) each, on the 1-10 scale
        return {a: ((p * fill).sum(1) / fill.sum(1)).to(audio.device) for a, p in per_window.items()}

    def score(self, audio, sample_rate, prompts):
        return self.score_all(audio, sample_rate, prompts)[self.axis]


# ---------------------------------------------------------------- Microsoft CLAP 2023 (CLAPScore)
# msclap 1.3.4 (github.com/microsoft/CLAP, msclap/): CLAPWrapper.py (audio and text recipes), models/clap.py
# (projections, GPT-2 pooling), models/htsat.py (the audio encoder) and models/config.py (HTSAT's settings).

MSCLAP_REPO, MSCLAP_FILE = "microsoft/msclap", "CLAP_weights_2023.pth"
GPT2_REPO, GPT2_FILES = "gpt2", ("config.json", "vocab.json", "merges.txt")  # the weights are in MSCLAP_FILE
MSCLAP_RATE, MSCLAP_SPAN, MSCLAP_TEXT_LEN = 44100, 7 * 44100, 77  # config_2023.yml: sampling_rate, 7 s, text_len
MSCLAP_D_PROJ = 1024  # config_2023.yml: d_proj, the joint embedding size
# HTSATWrapper ignores config_2023.yml's audio settings: HTSAT_Swin_Transformer's defaults and the 32 kHz mel front
# end of models/config.py (the stored melW), although the audio arrives at 44.1 kHz
HTSAT_2023 = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(4, 8, 16, 32), window_size=8, spec_size=256,
                  patch_size=4, mlp_ratio=4.0, num_classes=527, n_fft=1024, hop=320, mel_bins=64)
MSCLAP_KEY_MAP = [  # official names -> ours (rename_key)
    (r"^audio_encoder\.base\.htsat\.spectrogram_extractor\.stft\.conv_(real|imag)\.weight$", r"audio.stft_\1"),
    (r"^audio_encoder\.base\.htsat\.(logmel_extractor\.)?", "audio."),  # logmel_extractor.melW: audio.melW
    (r"^audio_encoder\.projection\.", "audio_proj."),
    (r"^caption_encoder\.base\.", "text."),
    (r"^caption_encoder\.projection\.", "text_proj."),
]


def seven_seconds(wave, start=None) -> torch.Tensor:
    """msclap's CLAPWrapper.load_audio_into_tensor: (C, S) 44.1 kHz -> (308700,), channels concatenated, then tiled
    and cut to 7 s, or if longer cropped to 7 s from sample `start`."""
    flat = wave.reshape(-1)
    if flat.numel() <= MSCLAP_SPAN:
        return flat.repeat(math.ceil(MSCLAP_SPAN / flat.numel()))[:MSCLAP_SPAN]
    assert start is not None, f"a clip of {flat.numel()} samples is longer than 7 s: it needs a crop start"
    return flat[start:start + MSCLAP_SPAN]


def crop_start(num_samples: int, seed, prompt_id):
    """msclap's random.randrange(num_samples - 7 s), seeded by (seed, prompt_id); None for a clip that is tiled."""
    if num_samples > MSCLAP_SPAN:
        return int(torch.randint(num_samples - MSCLAP_SPAN, (), generator=seeded_generator(seed, prompt_id)))


def stft_kernels(n_fft: int):
    """torchlibrosa's STFT as conv1d kernels (n_fft // 2 + 1, 1, n_fft): cos and -sin times a periodic Hann window."""
    n = torch.arange(n_fft, dtype=torch.float64)
    angle = 2 * math.pi * torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None] * n / n_fft
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    return (torch.cos(angle) * window)[:, None].float(), (-torch.sin(angle) * window)[:, None].float()


def shifted_window_mask(res: int, window: int, shift: int) -> torch.Tensor:
    """(num_windows, N, N) Swin mask: -100 between tokens the cyclic shift brought from different regions, else 0."""
    region = torch.zeros(res, res)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (rows, cols) in enumerate((r, c) for r in cuts for c in cuts):
        region[rows, cols] = i
    region = region.view(res // window, window, res // window, window).transpose(1, 2).reshape(-1, window * window)
    return torch.where(region[:, None, :] == region[:, :, None], 0.0, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned bias per relative position and head."""
    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        ij = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = ij[:, :, None] - ij[:, None, :] + window - 1  # (2, N, N) row and column offsets, from 0
        self.register_buffer("relative_position_index", rel[0] * (2 * window - 1) + rel[1])

    def forward(self, x, mask=None):  # x (B, nW, N, C) windows; mask (nW, N, N) or None
        B, nW, N, C = x.shape
        q, k, v = self.qkv(x).view(B, nW, N, 3, self.heads, C // self.heads).permute(3, 0, 1, 4, 2, 5)
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # (heads, N, N)
        bias = bias if mask is None else bias + mask[:, None]  # (nW, heads, N, N)
        return self.proj(F.scaled_dot_product_attention(q, k, v, bias).transpose(2, 3).reshape(B, nW, N, C))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP on a (res, res) token grid."""
    def __init__(self, dim, res, heads, window, shift, mlp_ratio):
        super().__init__()
        if res <= window:  # the last stage is a single window: no partition, no shift
            window, shift = res, 0
        self.res, self.window, self.shift = res, window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, hidden), fc2=nn.Linear(hidden, dim)))
        self.register_buffer("attn_mask", shifted_window_mask(res, window, shift) if shift else None)

    def forward(self, x):  # (B, res * res, C)
        B, L, C = x.shape
        r, w, s, n = self.res, self.window, self.shift, self.res // self.window
        h = self.norm1(x).view(B, r, r, C).roll((-s, -s), (1, 2))
        h = h.view(B, n, w, n, w, C).transpose(2, 3).reshape(B, n * n, w * w, C)  # (B, nW, N, C)
        h = self.attn(h, self.attn_mask).view(B, n, n, w, w, C).transpose(2, 3).reshape(B, r, r, C)
        x = x + h.roll((s, s), (1, 2)).reshape(B, L, C)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class SwinStage(nn.Module):
    """`depth` blocks, every second one shifted by half a window, then 2 x 2 patch merging (except the last)."""
    def __init__(self, dim, res, depth, heads, window, mlp_ratio, merge):
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dim, res, heads, window, (i % 2) * (window // 2), mlp_ratio)
                                    for i in range(depth))
        self.downsample = nn.ModuleDict(dict(norm=nn.LayerNorm(4 * dim),
                                             reduction=nn.Linear(4 * dim, 2 * dim, bias=False))) if merge else None

    def forward(self, x):  # (B, res * res, C) -> (B, res * res / 4, 2 C) when merging
        for block in self.blocks:
            x = block(x)
        if self.downsample is None:
            return x
        B, L, C = x.shape
        x = x.view(B, math.isqrt(L), math.isqrt(L), C)
        # 2 x 2 neighbours side by side in the order (0, 0), (1, 0), (0, 1), (1, 1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(B, -1, 4 * C)
        return self.downsample.reduction(self.downsample.norm(x))


class HTSAT(nn.Module):
    """HTS-AT (arXiv 2202.00874) as msclap runs it: a Swin transformer over the log-mel image, mean of its tokens."""
    def __init__(self, embed_dim, depths, num_heads, window_size, spec_size, patch_size, mlp_ratio, num_classes,
                 n_fft, hop, mel_bins):
        super().__init__()
        self.hop, self.spec_size, self.freq_ratio = hop, spec_size, spec_size // mel_bins
        for name, kernel in zip(("stft_real", "stft_imag"), stft_kernels(n_fft)):
            self.register_buffer(name, kernel)
        self.register_buffer("melW", torch.zeros(n_fft // 2 + 1, mel_bins))  # librosa's Slaney mel filters, loaded
        self.bn0 = nn.BatchNorm2d(mel_bins)
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(1, embed_dim, patch_size, stride=patch_size),
                                              norm=nn.LayerNorm(embed_dim)))
        res, last = spec_size // patch_size, len(depths) - 1
        self.layers = nn.ModuleList(
            SwinStage(embed_dim * 2 ** i, res // 2 ** i, depth, heads, window_size, mlp_ratio, merge=i < last)
            for i, (depth, heads) in enumerate(zip(depths, num_heads)))
        dim = embed_dim * 2 ** last
        self.norm = nn.LayerNorm(dim)
        # AudioSet tagging head: not on the embedding's path, kept so that the published state dict loads strictly
        self.tscam_conv = nn.Conv2d(dim, num_classes, (res // 2 ** last // self.freq_ratio, 3), padding=(0, 1))
        self.head = nn.Linear(num_classes, num_classes)

    def logmel(self, wave):  # (B, S) -> (B, S // hop + 1, mel_bins) power in dB
        pad = self.stft_real.shape[-1] // 2
        x = F.pad(wave[:, None], (pad, pad), mode="reflect")  # centred frames
        real, imag = F.conv1d(x, self.stft_real, stride=self.hop), F.conv1d(x, self.stft_imag, stride=self.hop)
        return 10 * torch.log10(((real ** 2 + imag ** 2).transpose(1, 2) @ self.melW).clamp_min(1e-10))

    def forward(self, wave):  # (B, S) 7 s at 44.1 kHz -> (B, C)
        x = self.bn0(self.logmel(wave).transpose(1, 2)[..., None])[..., 0]  # (B, M, T), normalised per mel bin
        B, M, T = x.shape
        assert T <= self.freq_ratio * self.spec_size, "HTSAT takes at most 1024 frames (10.24 s at 32 kHz)"
        # stretch to 1024 frames, then stack the 4 time quarters along frequency: a (spec_size, spec_size) image
        x = F.interpolate(x[:, None], (M, self.freq_ratio * self.spec_size), mode="bicubic", align_corners=True)
        x = x.view(B, 1, M, self.freq_ratio, -1).transpose(2, 3).reshape(B, 1, self.spec_size, -1)
        x = self.patch_embed.norm(self.patch_embed.proj(x).flatten(2).transpose(1, 2))  # (B, L, C)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).mean(1)


class Projection(nn.Module):
    """msclap's projection into the joint space: h = linear1(x); layer_norm(h + linear2(gelu(h)))."""
    def __init__(self, d_in, d_out):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d_in, d_out, bias=False), nn.Linear(d_out, d_out, bias=False)
        self.layer_norm = nn.LayerNorm(d_out)

    def forward(self, x):
        h = self.linear1(x)
        return self.layer_norm(h + self.linear2(F.gelu(h)))


class MSClap(nn.Module):
    """Microsoft CLAP 2023 (arXiv 2309.05767): HTSAT audio and GPT-2 text encoders projected to a joint space."""
    def __init__(self, htsat: dict, gpt2_config, d_proj=MSCLAP_D_PROJ, tokenizer=None):
        super().__init__()
        from transformers import GPT2Model
        self.audio = HTSAT(**htsat)
        self.audio_proj = Projection(self.audio.norm.normalized_shape[0], d_proj)
        self.text = GPT2Model(gpt2_config)
        self.text_proj = Projection(gpt2_config.n_embd, d_proj)
        self.logit_scale = nn.Parameter(torch.zeros(()))  # training temperature; the score is the plain cosine
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, weights_dir=None, device=None, htsat=HTSAT_2023, d_proj=MSCLAP_D_PROJ):
        """msclap's CLAP_weights_2023.pth, gpt2's config and tokenizer via data.hub_files (data.WeightsMissing)."""
        from transformers import GPT2Config, GPT2Tokenizer
        clap = hub_files(MSCLAP_REPO, [MSCLAP_FILE], weights_dir)[MSCLAP_FILE]
        gpt2 = hub_files(GPT2_REPO, GPT2_FILES, weights_dir)
        state = read_weights(clap)  # tensors and containers only, as msclap's torch.load reads it on torch >= 2.6
        if "model" not in state:
            raise ValueError(f"{clap} is not msclap's checkpoint: it has no 'model' entry")
        tokenizer = GPT2Tokenizer(vocab=str(gpt2["vocab.json"]), merges=str(gpt2["merges.txt"]), pad_token="!")
        with torch.device("meta"):
            model = cls(htsat, GPT2Config.from_json_file(gpt2["config.json"]), d_proj, tokenizer)
        model.load_official(state["model"])
        return model.to(pick_device(device or "auto")).eval()

    def load_official(self, state):
        """Load msclap's state dict strictly, less GPT-2's causal-mask buffers (msclap loads non-strictly)."""
        real, imag = stft_kernels(self.audio.stft_real.shape[-1])
        state = {"audio.stft_real": real, "audio.stft_imag": imag, **{
            rename_key(k, MSCLAP_KEY_MAP): v for k, v in state.items()
            if not (k.startswith("caption_encoder.base.h.") and k.endswith((".attn.bias", ".attn.masked_bias")))}}
        self.load_state_dict(state, strict=True, assign=True)

    @torch.no_grad()
    def embed_audio(self, clips):  # (B, 308700) 7 s clips at 44.1 kHz -> (B, d_proj)
        return self.audio_proj(self.audio(clips))

    @torch.no_grad()
    def embed_text(self, input_ids, attention_mask):  # (B, L) -> (B, d_proj)
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        # msclap pools at (number of ids other than 0) - 1. 0 is '!', the pad: each '!' inside a caption moves the
        # pooled position one token earlier than its <|endoftext|>
        last = (input_ids != 0).sum(-1) - 1
        return self.text_proj(hidden[torch.arange(len(last), device=last.device), last])

    def tokenize(self, prompts):
        """msclap's CLAPWrapper.preprocess_text -> input_ids, attention_mask (B, max(77, longest)), padded with '!'."""
        tokens = self.tokenizer([p + " <|endoftext|>" for p in prompts], padding=True, return_tensors="pt")
        extra = max(0, MSCLAP_TEXT_LEN - tokens["input_ids"].shape[1])
        return (F.pad(tokens["input_ids"], (0, extra), value=self.tokenizer.pad_token_id),
                F.pad(tokens["attention_mask"], (0, extra)))


class MSClapScore(Reward):
    """CLAPScore (TTA-Bench): cosine of Microsoft CLAP 2023 audio and text embeddings; a clip over 7 s is cropped at
    crop_start(seed, its prompt id, else its caption). sizes: MSClap.from_pretrained's htsat, d_proj."""
    sample_rate = MSCLAP_RATE

    def __init__(self, weights_dir=None, device=None, seed=0, model=None, **sizes):
        self.model = model or MSClap.from_pretrained(weights_dir, device, **sizes)
        self.seed = seed

    def score_all(self, audio, sample_rate, prompts, ids=None):
        audio = prepare_audio(audio, sample_rate, self.sample_rate, prompts)
        keys = prompts if ids is None else ids
        clips = torch.stack([seven_seconds(w, crop_start(w.numel(), self.seed, k)) for w, k in zip(audio, keys)])
        device = self.model.logit_scale.device
        sound = self.model.embed_audio(clips.to(device))  # (B, d_proj)
        text = self.model.embed_text(*(t.to(device) for t in self.model.tokenize(prompts)))
        return {"score": F.cosine_similarity(sound.float(), text.float()).to(audio.device)}


# ---------------------------------------------------------------- LAION-CLAP (the alternative GRPO reward)

class ClapReward(Reward):
    """Cosine of LAION-CLAP text and audio embeddings, Resonate's alternative GRPO reward, on transformers' ClapModel
    (not the released laion_clap checkpoint: close to, not equal to, its numbers)."""
    sample_rate = 48000

    def __init__(self, model_name_or_path="laion/clap-htsat-unfused", device=None, dtype=None, *,
                 model=None, processor=None):
        from transformers import ClapModel, ClapProcessor
        self.model = model if model is not None else ClapModel.from_pretrained(model_name_or_path)
        self.processor = processor if processor is not None else ClapProcessor.from_pretrained(model_name_or_path)
        self.device = pick_device(device or "auto")
        self.model.to(self.device, dtype or torch.float32).eval()

    @torch.no_grad()
    def score(self, audio, sample_rate, prompts):
        audio = prepare_audio(audio, sample_rate, self.sample_rate, prompts)
        waves = (audio.clamp(-1, 1) * 32767.0).to(torch.int16).float() / 32767.0  # truncating, as released
        text = self.processor.tokenizer(list(prompts), padding=True, truncation=True, max_length=77,
                                        return_tensors="pt").to(self.device)  # LAION-CLAP's 77 tokens
        # the unfused checkpoint takes one mel channel: "fusion" truncation would stack four
        truncation = "fusion" if self.model.config.audio_config.enable_fusion else "rand_trunc"
        sound = self.processor.feature_extractor([w.numpy() for w in waves.cpu()], sampling_rate=self.sample_rate,
                                                 truncation=truncation, return_tensors="pt")
        text = self.model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        sound = self.model.get_audio_features(input_features=sound["input_features"].to(self.device, self.model.dtype),
                                              is_longer=sound["is_longer"].to(self.device))
        return F.cosine_similarity(text.pooler_output.float(), sound.pooler_output.float()).to(audio.device)


# ---------------------------------------------------------------- Qwen-Omni judges: the LALM reward and AQAScore

@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    """How QwenOmniJudge asks its model and reads the answer."""
    repo: str  # the Omni repository; only its thinker is built
    system_prompt: str | None  # None: no system turn
    yes: str  # the answer words, one token each
    no: str
    audio_tokens: tuple[str, str, str]  # (start, placeholder, end)
    whole_clip: bool  # log-mel of the whole clip (Qwen3-Omni), else of Whisper's 30 s window (Qwen2.5-Omni)
    rule: str  # "first_token" or "last_yes_no": see QwenOmniJudge
    max_new_tokens: int = 1024  # the cap the Omni generate() gives the thinker in the released runs


QWEN25_OMNI = JudgeSettings(  # Resonate's training reward
    repo="Qwen/Qwen2.5-Omni-7B", yes="Yes", no="No", audio_tokens=("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"),
    whole_clip=False, rule="first_token", system_prompt=(
        "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and "
        "visual inputs, as well as generating text and speech."))
AQA_QWEN3_OMNI = JudgeSettings(  # AQAScore, the TTA-Bench evaluation metric
    repo="Qwen/Qwen3-Omni-30B-A3B-Instruct", system_prompt=None, yes="yes", no="no",
    audio_tokens=("<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"), whole_clip=True, rule="last_yes_no")

# what from_pretrained reads besides the weight shards the index lists
JUDGE_FILES = ["config.json", "model.safetensors.index.json", "preprocessor_config.json", "tokenizer_config.json",
               "vocab.json", "merges.txt"]
THINKERS = {"qwen2_5_omni": "Qwen2_5OmniThinkerForConditionalGeneration",  # config.json's model_type -> class
            "qwen3_omni_moe": "Qwen3OmniMoeThinkerForConditionalGeneration"}


def audio_token_count(mel_frames, chunk=None):
    """Audio tokens for `mel_frames` (int or (B,) tensor), as the processors count: chunk None (Qwen2.5-Omni), a
    stride-2 conv and stride-2 pooling; else (Qwen3-Omni) three stride-2 convs, ceil(n / 8), per chunk of frames."""
    if chunk is None:
        return (-(-mel_frames // 2) - 2) // 2 + 1
    return mel_frames // chunk * -(-chunk // 8) + -(-(mel_frames % chunk) // 8)


def load_judge(repo, weights_dir, dtype):
    """(thinker, tokenizer, Whisper feature extractor) of a Qwen-Omni repository via data.hub_files; dtype None: the
    checkpoint's. Raises data.WeightsMissing; ValueError for a weights_dir with only some files or another family."""
    import transformers
    try:
        paths = hub_files(repo, JUDGE_FILES, weights_dir)
        shards = json.loads(paths["model.safetensors.index.json"].read_text())["weight_map"].values()
        paths.update(hub_files(repo, sorted(set(shards)), weights_dir))
    except WeightsMissing:  # one message for the whole repository rather than a list of shards
        raise WeightsMissing(f"the judge https://huggingface.co/{repo} is not on this machine and could not be "
                             f"downloaded: run `hf download {repo}` here (HF_TOKEN for gated copies, HF_ENDPOINT for a "
                             f"mirror), or where you have access and pass that folder as weights_dir") from None
    folder, *others = {p.parent for p in paths.values()}
    if others:
        raise ValueError(f"{weights_dir} holds only some of {repo}'s files; put all of them there, or none")
    family = json.loads((folder / "config.json").read_text())["model_type"].removesuffix("_thinker")
    if family not in THINKERS:
        raise ValueError(f"{folder} holds a {family!r} model; the judge runs {' or '.join(THINKERS)} checkpoints")
    return (getattr(transformers, THINKERS[family]).from_pretrained(folder, dtype=dtype or "auto"),
            transformers.AutoTokenizer.from_pretrained(folder),
            transformers.WhisperFeatureExtractor.from_pretrained(folder))


class QwenOmniJudge(Reward):
    """A Qwen-Omni thinker asked whether the clip holds the caption's sound events (Resonate, arXiv 2603.11661; released
    flow_grpo/rewards.py): p(yes) / (p(yes) + p(no)) at the greedy answer token the rule reads, 0 if neither word.
    "last_yes_no" (released): the last yes/no of the answer, decoded to <|im_end|>; "first_token": its first token.
    overrides replace JudgeSettings fields. Raises data.WeightsMissing; ValueError for bad settings or tokenizer."""
    sample_rate = 16000
    QUESTION = ("Does this audio contain the sound events described by the text: {caption}? "
                "Please only answer yes or no, without other explanations.")

    def __init__(self, settings=QWEN25_OMNI, weights_dir=None, device=None, dtype=None, max_batch=None, *,
                 model=None, tokenizer=None, feature_extractor=None, **overrides):
        self.settings = s = dataclasses.replace(settings, **overrides)
        if s.rule not in ("first_token", "last_yes_no") or s.max_new_tokens < 1:
            raise ValueError(f"rule must be 'first_token' or 'last_yes_no' and max_new_tokens at least 1, got "
                             f"{s.rule!r} and {s.max_new_tokens}")
        if model is None:
            model, tokenizer, feature_extractor = load_judge(s.repo, weights_dir, dtype)
        self.tokenizer, self.feature_extractor, self.max_batch = tokenizer, feature_extractor, max_batch
        self.device = pick_device(device or "auto")
        self.model = model.to(self.device, dtype).eval()
        ids = [tokenizer.encode(word, add_special_tokens=False) for word in (s.yes, s.no, "<|im_end|>")]
        audio_id = tokenizer.convert_tokens_to_ids(s.audio_tokens[1])
        if {len(i) for i in ids} != {1} or audio_id != model.config.audio_token_id:
            raise ValueError(f"the tokenizer does not fit the judge: {s.yes!r}, {s.no!r} and <|im_end|> must be one "
                             f"token each (got {ids}) and {s.audio_tokens[1]} the model's audio_token_id")
        (self.yes_id,), (self.no_id,), (self.eos_id,) = ids
        audio_config = model.config.audio_config  # Qwen3-Omni's encoder reads 2 * n_window-frame chunks
        self.chunk = 2 * audio_config.n_window if audio_config.model_type.startswith("qwen3") else None

    def prompt(self, caption: str, num_audio_tokens: int) -> str:
        """The chat text of one clip, as the chat template renders the released conversation."""
        (start, pad, end), system = self.settings.audio_tokens, self.settings.system_prompt
        system = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
        return (f"{system}<|im_start|>user\n{self.QUESTION.format(caption=caption)}{start}{pad * num_audio_tokens}"
                f"{end}<|im_end|>\n<|im_start|>assistant\n")

    def inputs(self, audio, prompts) -> dict:
        """Model inputs of (B, S) 16 kHz clips, left-padded, each audio placeholder expanded as the processor does."""
        pad = dict(padding="longest", truncation=False) if self.settings.whole_clip else dict(padding="max_length")
        features = self.feature_extractor([w.numpy() for w in audio.cpu()], sampling_rate=self.sample_rate,
                                          return_attention_mask=True, return_tensors="pt", **pad)
        num_tokens = audio_token_count(features["attention_mask"].sum(-1), self.chunk)  # (B,)
        texts = [self.prompt(p, int(n)) for p, n in zip(prompts, num_tokens)]
        text = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        inputs = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                  "input_features": features["input_features"].to(self.model.dtype),
                  "feature_attention_mask": features["attention_mask"]}
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.no_grad()
    def yes_no_scores(self, inputs) -> torch.Tensor:
        """(B,) float32 scores; all rows decode together, a row past its <|im_end|> no longer counting."""
        assert inputs["attention_mask"][:, -1].all(), "prompts must be left-padded, each ending in the last column"
        steps = 1 if self.settings.rule == "first_token" else self.settings.max_new_tokens
        thinker, mask = self.model.model, inputs["attention_mask"]
        out = thinker(**inputs, use_cache=steps > 1)
        score = torch.zeros(mask.shape[0], device=self.device)
        running = torch.ones_like(score, dtype=torch.bool)
        for step in range(steps):
            logits = self.model.lm_head(out.last_hidden_state[:, -1]).float()  # (B, V): the full (B, L, V) is large
            token = logits.argmax(-1)  # (B,) greedy
            hit = running & ((token == self.yes_id) | (token == self.no_id))
            # the softmax normaliser cancels: p_yes / (p_yes + p_no) = sigmoid(logit_yes - logit_no)
            score = torch.where(hit, torch.sigmoid(logits[:, self.yes_id] - logits[:, self.no_id]), score)
            running &= token != self.eos_id
            if step + 1 == steps or not running.any():
                break
            mask = F.pad(mask, (0, 1), value=1)
            # each row's next text position: its token count plus the offset M-RoPE left after the prompt
            position = (mask.sum(-1, keepdim=True) - 1 + thinker.rope_deltas)[None].expand(3, -1, -1)  # (3, B, 1)
            out = thinker(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=out.cache,
                          use_cache=True)
        return score

    def score(self, audio, sample_rate, prompts):
        audio = prepare_audio(audio, sample_rate, self.sample_rate, prompts)
        step = self.max_batch or audio.shape[0]
        scores = [self.yes_no_scores(self.inputs(audio[i:i + step], prompts[i:i + step]))
                  for i in range(0, audio.shape[0], step)]
        return torch.cat(scores).to(audio.device)


# ---------------------------------------------------------------- combining rewards

class WeightedSum(Reward):
    """sum_k weight_k * reward_k over terms {name: (reward, weight)}, the way Resonate combines rewards."""
    def __init__(self, terms):
        assert terms, "WeightedSum needs at least one reward"
        self.terms = dict(terms)

    def score(self, audio, sample_rate, prompts):
        return sum(weight * reward.score(audio, sample_rate, prompts) for reward, weight in self.terms.values())


REWARDS = {"loudness": LoudnessReward, "centroid": SpectralCentroidReward, "aes": AudioboxAesthetics.from_pretrained,
           "clap": MSClapScore, "laion_clap": ClapReward,
           "qwen_omni": QwenOmniJudge, "aqa": functools.partial(QwenOmniJudge, AQA_QWEN3_OMNI)}


def build_reward(spec, device=None) -> WeightedSum:
    """A WeightedSum from "loudness:1.0,clap:0.5", {"loudness": 1.0} or {"loudness": {"weight": 1, "target_db": -14}};
    `device` goes to the rewards that take one. Raises ValueError for an empty, unknown or malformed spec."""
    if isinstance(spec, str):  # "a:1.0, b" -> {"a": 1.0, "b": 1.0}
        spec = {name.strip(): float(weight or 1.0)
                for name, _, weight in (item.partition(":") for item in spec.split(",") if item.strip())}
    if not isinstance(spec, dict):
        raise ValueError(f"reward spec must be a string like 'loudness:1.0,clap:0.5' or a dict, got {spec!r}")
    unknown = sorted(set(spec) - set(REWARDS))
    if not spec or unknown:
        raise ValueError(f"reward spec {spec!r} is empty or names unknown rewards {unknown}; "
                         f"known rewards: {', '.join(sorted(REWARDS))}")
    terms = {}
    for name, value in spec.items():
        kwargs = dict(value) if isinstance(value, dict) else {"weight": value}
        weight, ctor = float(kwargs.pop("weight", 1.0)), REWARDS[name]
        if device is not None and "device" in inspect.signature(ctor).parameters:
            kwargs.setdefault("device", device)
        terms[name] = (ctor(**kwargs), weight)
    return WeightedSum(terms)
