"""Resonate transformer: parity with the released FluxAudio, full-size layout, input checks, text encoders."""

import json
from pathlib import Path

import pytest
import torch

from transformer import (MODELS, Resonate, ResonateConfig, TextEncoder, apply_rope, load_released_state_dict,
                         minilm_path, rope_tables)

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-4


@torch.no_grad()
def test_flow_parity(model, fx):
    i = fx["inputs"]
    flow = model(i["latent"], i["text_f"], i["text_f_c"], i["t"])
    assert (flow - fx["outputs"]["flow"]).abs().max() <= TOL
    # fewer frames than the configured latent_seq_len: RoPE and convs must adapt to any N
    short = model(i["latent_short"], i["text_f"], i["text_f_c"], i["t"])
    assert (short - fx["outputs"]["flow_short"]).abs().max() <= TOL


def test_load_is_strict(fx):
    m = Resonate(ResonateConfig(**fx["config"]))
    sd = dict(fx["state_dict"])
    sd.pop("final_layer.conv.bias")
    sd["joint_blocks.9.foo"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"final_layer\.conv\.bias.*joint_blocks\.9\.foo"):
        load_released_state_dict(m, sd)
    load_released_state_dict(m, fx["state_dict"])
    assert torch.equal(m.latent_std, fx["state_dict"]["latent_std"])


def test_full_size_matches_released_manifest():
    manifest = json.loads((FIXTURES / "manifest_transformer_fluxaudio_m_44k.json").read_text())
    cfg = MODELS["resonate_m_44k"]()
    for k, v in manifest["constructor"].items():
        assert getattr(cfg, k) == v, k
    with torch.device("meta"):
        m = Resonate(cfg)
    shapes = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert shapes == manifest["shapes"]
    assert sum(p.numel() for p in m.parameters()) == manifest["num_trainable"] == 468_205_480
    sd = {k: torch.empty(v, device="meta") for k, v in manifest["shapes"].items() if "joint_blocks.3." not in k}
    with pytest.raises(KeyError, match=r"missing \['joint_blocks\.3\."):
        load_released_state_dict(m, sd)  # e.g. a checkpoint of a model with fewer blocks


@torch.no_grad()
def test_meta_build_then_assign_gives_same_outputs(fx):
    with torch.device("meta"):
        m = Resonate(ResonateConfig(**fx["config"]))
    load_released_state_dict(m, fx["state_dict"])
    i = fx["inputs"]
    flow = m(i["latent"], i["text_f"], i["text_f_c"], i["t"])
    assert (flow - fx["outputs"]["flow"]).abs().max() <= TOL


def test_registry_overrides_and_sizes():
    small = MODELS["small"]()
    assert (small.latent_dim, small.text_dim, small.text_c_dim) == (20, 384, 384)
    assert small.depth - small.fused_depth >= 2 and small.fused_depth >= 2
    assert MODELS["small"](latent_dim=40, text_dim=1024).latent_dim == 40
    with pytest.raises(ValueError, match="num_heads"):
        MODELS["tiny"](num_heads=3)


def test_adaln_zero_init_predicts_zero_and_normalize_roundtrip():
    torch.manual_seed(0)
    m = Resonate(MODELS["tiny"]())
    cfg = m.cfg
    B, N = 2, 10
    v = m(torch.randn(B, N, cfg.latent_dim), torch.randn(B, 77, cfg.text_dim), torch.randn(B, cfg.text_c_dim),
          torch.rand(B))
    assert v.shape == (B, N, cfg.latent_dim) and v.abs().max() == 0
    m.set_latent_stats(torch.arange(cfg.latent_dim).float(), torch.full((cfg.latent_dim,), 2.0))
    x = torch.randn(B, N, cfg.latent_dim)
    assert torch.allclose(m.unnormalize(m.normalize(x)), x, atol=1e-6)
    assert torch.allclose(m.normalize(x)[..., 3], (x[..., 3] - 3) / 2)


def test_rope_depends_only_on_relative_position():
    q, k = torch.randn(2, 1, 1, 1, 64).unbind(0)  # (B, H, N, hd)
    cos, sin = rope_tables(40, 64)

    def score(i, j):
        return (apply_rope(q, (cos[i:i + 1], sin[i:i + 1])) * apply_rope(k, (cos[j:j + 1], sin[j:j + 1]))).sum()

    assert torch.allclose(score(3, 7), score(30, 34), atol=1e-4)
    assert not torch.allclose(score(3, 7), score(3, 9), atol=1e-4)


@pytest.mark.parametrize("what, shape", [("latent", (2, 24, 7)), ("text_f", (2, 76, 16)), ("text_f_c", (2, 16)),
                                         ("t", (1,))])  # a (1,) t would broadcast silently
def test_bad_shapes_fail(model, fx, what, shape):
    args = {k: fx["inputs"][k] for k in ("latent", "text_f", "text_f_c", "t")}
    args[what] = torch.zeros(shape)
    with pytest.raises(AssertionError, match=f"^{what} "):
        model(**args)


def test_too_long_latent_fails():
    m = Resonate(MODELS["tiny"](max_latent_len=16))
    with pytest.raises(AssertionError, match="max_latent_len"):
        m(torch.zeros(1, 17, 8), torch.zeros(1, 77, 16), torch.zeros(1, 12), torch.zeros(1))


@torch.no_grad()
def test_bf16_forward_close_to_fp32(model, fx):
    i = fx["inputs"]
    m16 = Resonate(model.cfg).to(torch.bfloat16)
    load_released_state_dict(m16, fx["state_dict"])
    out = m16(*(i[k].bfloat16() for k in ("latent", "text_f", "text_f_c")), i["t"].bfloat16())
    ref = fx["outputs"]["flow"]
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


# --- text encoders


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(minilm_path())


def test_minilm_encoder_shapes_pooling_determinism(minilm):
    prompts = ["a dog barks", "rain on a tin roof while thunder rolls " * 20]  # second is truncated
    f, f_c = minilm.encode(prompts)
    assert minilm.dim == 384 and f.shape == (2, 77, 384) and f_c.shape == (2, 384) and f.dtype == torch.float32
    assert torch.allclose(f_c, f.mean(1), atol=1e-6)  # default rule: mean over all 77 positions
    f1, f1_c = minilm.encode(prompts[:1])  # batch composition and repeat calls change nothing
    assert torch.allclose(f1, f[:1], atol=1e-5) and torch.allclose(f1_c, f_c[:1], atol=1e-5)
    n_real = len(minilm.tokenizer(prompts[0]).input_ids)  # [CLS] a dog barks [SEP]
    assert not torch.allclose(f1_c, f1[:, :n_real].mean(1), atol=1e-3)  # the released mean includes padding


def test_t5_pooled_mean_includes_padding(tmp_path, minilm):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=minilm.tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                   num_heads=4, pad_token_id=minilm.tokenizer.pad_token_id)
    T5EncoderModel(cfg).save_pretrained(tmp_path)
    minilm.tokenizer.save_pretrained(tmp_path)  # any tokenizer with a matching vocabulary will do offline
    enc = TextEncoder(str(tmp_path))
    assert isinstance(enc.model, T5EncoderModel) and enc.dim == 32
    f, f_c = enc.encode(["a dog barks"])
    n_real = enc.tokenizer(["a dog barks"], return_tensors="pt").attention_mask.sum().item()
    assert f.shape == (1, 77, 32)
    assert f[0, n_real:].abs().amax() > 0  # T5 outputs at padded positions are not zero ...
    assert torch.allclose(f_c, f.mean(1), atol=1e-6)  # ... and the released pooled vector averages them in
    assert not torch.allclose(f_c, f[:, :n_real].mean(1), atol=1e-3)


def test_a_text_encoder_folder_without_a_model_is_named(tmp_path):
    from transformer import load_text_encoder
    (tmp_path / "notes.txt").write_text("no model here")
    with pytest.raises(OSError, match=f"could not load the text encoder '{tmp_path}'"):
        load_text_encoder(str(tmp_path))
