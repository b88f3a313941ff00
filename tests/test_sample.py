"""sample.py: the released generation chain (parity), loading published-format files from a folder or the Hugging
Face cache, and the command line (names, overwrite, seeds, WAV format)."""

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import soundfile as sf
import torch

import data
import sample
from conftest import published_bigvgan_state, put_in_hf_cache
from transformer import MODELS, Resonate, ResonateConfig, config_from_state_dict, load_released_state_dict
from vae import MEL_CONFIGS, BigVGAN, MelVAE, num_latent_frames

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-4
TEXT_DIM = 32  # width of the tiny text encoder below


# -----------------------------------------------------------------------------
# parity of the whole chain with the released implementation


def test_pipeline_matches_released_chain():
    fx = torch.load(FIXTURES / "pipeline_a.pt", weights_only=True)
    net = Resonate(ResonateConfig(**fx["transformer_config"])).eval()
    load_released_state_dict(net, fx["transformer_state_dict"])
    vae_net = MelVAE(**fx["vae_config"])
    vae_net.load_state_dict(fx["vae_state_dict"])
    voc = BigVGAN.from_config(fx["vocoder_config"])
    voc.load_state_dict(fx["vocoder_state_dict"])
    pipe = sample.Pipeline(net, vae_net.fold_weight_norm().eval(), voc.eval(), None, MEL_CONFIGS["16k"])
    latents, mel, wave = pipe.synthesize(fx["text_f"], fx["text_f_c"], fx["x0"], fx["num_steps"],
                                         fx["cfg_strength"])
    assert (latents - fx["latents"]).abs().max() <= TOL
    assert (mel - fx["mel"]).abs().max() <= TOL
    assert (wave - fx["waveform"]).abs().max() <= TOL


def test_transformer_config_is_read_from_shapes():
    fx = torch.load(FIXTURES / "pipeline_a.pt", weights_only=True)
    cfg = config_from_state_dict(fx["transformer_state_dict"])
    for key, value in fx["transformer_config"].items():
        if key != "latent_seq_len":  # only a default length, not in the weights
            assert getattr(cfg, key) == value, key
    manifest = json.loads((FIXTURES / "manifest_transformer_fluxaudio_m_44k.json").read_text())
    full = {k: torch.empty(v, device="meta") for k, v in manifest["shapes"].items()}
    assert config_from_state_dict(full) == MODELS["resonate_m_44k"]()
    with pytest.raises(ValueError, match="not a released Resonate transformer"):
        config_from_state_dict({"foo": torch.zeros(1)})


# -----------------------------------------------------------------------------
# tiny stand-ins for the published files, in the published formats


@pytest.fixture(scope="module")
def text_encoder_dir(tmp_path_factory):
    """A tiny random BERT (32-d) with MiniLM's tokenizer, saved as a local folder: loads in a blink."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    from transformer import minilm_path
    folder = tmp_path_factory.mktemp("text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=TEXT_DIM, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    net = Resonate(MODELS["tiny"](latent_dim=4, text_dim=TEXT_DIM, text_c_dim=TEXT_DIM, max_latent_len=64))
    with torch.no_grad():  # adaLN-Zero would make the velocity zero: give every weight a value
        for p in net.parameters():
            p.normal_(0, 0.05)
    net.set_empty_string(torch.randn(77, TEXT_DIM), torch.randn(TEXT_DIM))
    return net


def tiny_vae(seed=1):
    torch.manual_seed(seed)
    vae_net = MelVAE(data_dim=80, embed_dim=4, hidden_dim=16)
    vae_net.set_mel_stats(torch.full((80,), -4.0), torch.full((80,), 2.0))
    return vae_net


TINY_VOCODER = dict(num_mels=80, upsample_rates=[4, 4, 4, 4], upsample_kernel_sizes=[8, 8, 8, 8],
                    upsample_initial_channel=32, resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]],
                    resblock="1", activation="snakebeta", snake_logscale=True, use_tanh_at_final=False,
                    use_bias_at_final=False, sampling_rate=16000, hop_size=256)  # hop 256 = the 16k mel config


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory):
    """A folder laid out like the published repository, with tiny files in the published formats: released
    transformer keys, a training-format VAE, and a BigVGAN folder with config.json + {"generator": sd} in the
    weight_g/weight_v naming."""
    folder = tmp_path_factory.mktemp("weights")
    net = tiny_transformer()
    torch.save(net.state_dict(), folder / "Resonate_GRPO.pth")
    torch.save(tiny_transformer(seed=5).state_dict(), folder / "Resonate_PT.pth")
    torch.save(tiny_vae().state_dict(), folder / "v1-44.pth")
    torch.manual_seed(2)
    voc = BigVGAN.from_config(TINY_VOCODER)
    (folder / sample.VOCODER_DIR).mkdir()
    (folder / sample.PUBLISHED["vocoder_config"]).write_text(json.dumps(TINY_VOCODER))
    torch.save({"generator": published_bigvgan_state(voc)}, folder / sample.PUBLISHED["vocoder"])
    return folder


def test_load_published_from_folder(published_dir, text_encoder_dir):
    pipe = sample.load_pipeline(weights_dir=published_dir, device="cpu", text_encoder=text_encoder_dir)
    ref = tiny_transformer()
    assert pipe.transformer.cfg == config_from_state_dict(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[k], v), k
    assert pipe.vae.embed_dim == 4 and pipe.vae.hidden_dim == 16 and pipe.sample_rate == 16000
    assert isinstance(pipe.vocoder, BigVGAN) and pipe.vocoder.upsample_factor == 256
    # the published VAE is stored before its one-time weight normalisation: folded at load, same numbers
    z = torch.randn(1, 4, 6)
    with torch.no_grad():
        assert (pipe.vae.decode(z) - tiny_vae().eval().decode(z)).abs().max() <= 1e-5
    # 'pt' picks the other transformer file
    pt = sample.load_pipeline(weights_dir=published_dir, device="cpu", weights="pt", text_encoder=text_encoder_dir)
    assert torch.equal(pt.transformer.latent_mean, tiny_transformer(seed=5).latent_mean)
    assert not torch.equal(pt.transformer.final_layer.conv.weight, pipe.transformer.final_layer.conv.weight)


def test_text_encoder_folder_inside_weights_dir_is_used_offline(published_dir, text_encoder_dir, tmp_path):
    import shutil
    folder = tmp_path / "weights"
    shutil.copytree(published_dir, folder)
    shutil.copytree(text_encoder_dir, folder / "flan-t5-large")  # any saved encoder under that name
    pipe = sample.load_pipeline(weights_dir=folder, device="cpu")  # HF_ENDPOINT is a closed port here
    assert pipe.text_encoder.dim == TEXT_DIM


def test_mismatched_files_are_rejected(published_dir, text_encoder_dir, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(published_dir, bad)
    (bad / sample.PUBLISHED["vocoder_config"]).write_text(json.dumps({**TINY_VOCODER, "sampling_rate": 44100}))
    with pytest.raises(ValueError, match="does not fit"):
        sample.load_pipeline(weights_dir=bad, device="cpu", text_encoder=text_encoder_dir)


def test_offline_with_nothing_cached_names_every_file(tmp_path, hf_cache):
    with pytest.raises(data.WeightsMissing) as info:
        sample.load_pipeline(device="cpu", weights_dir=tmp_path)
    for f in ("Resonate_GRPO.pth", "v1-44.pth", sample.PUBLISHED["vocoder_config"], sample.PUBLISHED["vocoder"]):
        assert f in str(info.value)


def test_files_in_the_hugging_face_cache_are_used_without_a_download(published_dir, text_encoder_dir, hf_cache):
    """A user who downloaded the repository with `hf download` (or an earlier run) downloads nothing."""
    put_in_hf_cache(hf_cache, sample.PUBLISHED_REPO, published_dir)
    pipe = sample.load_pipeline(device="cpu", text_encoder=text_encoder_dir)  # HF_HUB_OFFLINE=1 (conftest)
    assert torch.equal(pipe.transformer.latent_std, tiny_transformer().latent_std)
    assert isinstance(pipe.vocoder, BigVGAN)


# -----------------------------------------------------------------------------
# generation and the command line


@pytest.fixture(scope="module")
def pipe(published_dir, text_encoder_dir):
    return sample.load_pipeline(weights_dir=published_dir, device="cpu", text_encoder=text_encoder_dir)


def test_generate_shapes_seeds_and_negative(pipe):
    audio, sr = sample.generate(["rain on a tin roof", "a dog barks"], pipe, duration=1.0, steps=3, seed=7,
                                num_samples=2, batch_size=2, progress=False)
    assert sr == 16000 and audio.shape == (4, 16000) and audio.dtype == torch.float32
    assert audio.abs().max() <= 1 and torch.isfinite(audio).all() and audio.abs().max() > 1e-3
    again, _ = sample.generate(["rain on a tin roof"], pipe, duration=1.0, steps=3, seed=7, num_samples=2,
                               batch_size=2, progress=False)
    assert torch.equal(again, audio[:2])  # batch 0 of both runs used seed 7 for the same rows
    assert not torch.equal(audio[0], audio[1])  # two samples of one prompt differ
    neg, _ = sample.generate(["rain on a tin roof"], pipe, duration=1.0, steps=3, seed=7, num_samples=2,
                             batch_size=2, negative="music", progress=False)
    assert not torch.equal(neg, audio[:2])
    # the empty-string features stored in the checkpoint are the default unconditional branch
    text_f, text_f_c = pipe.text_encoder.encode(["rain on a tin roof"])
    frames = num_latent_frames(1.0, pipe.mel_cfg, cover=True)
    noise = torch.randn(1, frames, 4, generator=torch.Generator().manual_seed(0))
    empty = pipe.transformer.empty_conditions(1)
    a = pipe.synthesize(text_f, text_f_c, noise, 2)[0]
    b = pipe.synthesize(text_f, text_f_c, noise, 2, 4.5, *empty)[0]
    assert torch.equal(a, b)


def test_duration_limits(pipe):
    # the released files hold no RoPE range: 2048 frames, as released (47.5 s at 44.1 kHz, here 16 kHz / hop 256)
    assert math.isclose(pipe.max_duration(), 2048 * 2 * 256 / 16000)
    for bad in (0.5, 70.0):
        with pytest.raises(ValueError, match="--duration must be between 1 and 65.5"):
            sample.generate(["x"], pipe, duration=bad, progress=False)
    assert num_latent_frames(10.0, pipe.mel_cfg, cover=True) == 313  # rounds up, as the released sampler (431 for 10 s at 44.1 kHz)


def test_read_prompts_and_safe_names(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("rain on a tin roof\n\n  a dog barks  \n")
    assert data.read_prompts(str(text)) == [(None, "rain on a tin roof"), (None, "a dog barks")]
    items = data.read_prompts(str(FIXTURES / "tta_bench_3.json"))
    assert [i for i, _ in items] == ["prompt_0001", "prompt_0002", "prompt_0003"]
    assert items[1][1] == "Banging followed by a distant train horn blowing"
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt_text": "x"}')
    with pytest.raises(ValueError, match="TTA-Bench"):
        data.read_prompts(str(bad))
    assert sample.safe_name('../../etc/passwd: "rain", 100%!') == "etc_passwd_rain_100"
    assert sample.safe_name("???") == "sample" and len(sample.safe_name("a" * 300)) == 80
    assert sample.safe_name("café au lait") == "caf_au_lait"


def cli(tmp_path, published_dir, text_encoder_dir, *args):
    sample.main([f"--weights_dir={published_dir}", f"--text_encoder={text_encoder_dir}", "--device=cpu",
                 "--duration=1.5", "--steps=2", f"--out_dir={tmp_path / 'out'}", *args])


def test_cli_refuses_what_generate_refuses(tmp_path, published_dir, text_encoder_dir, pipe):
    cases = [("--duration=70", dict(duration=70.0), "between 1 and 65.5"),
             ("--cfg_strength=nan", dict(cfg_strength=float("nan")), "finite"),
             ("--steps=0", dict(steps=0), "--steps"),
             ("--seed=99999999999999999999999", dict(seed=99999999999999999999999), "--seed"),
             ("--num_samples=0", dict(num_samples=0), "--num_samples"),
             ("--batch_size=0", dict(batch_size=0), "--batch_size")]
    for flag, kwargs, match in cases:
        with pytest.raises(SystemExit, match=match):
            cli(tmp_path, published_dir, text_encoder_dir, "a dog barks", flag)
        with pytest.raises(ValueError, match=match):
            sample.generate(["a dog barks"], pipe, **{"duration": 1.0, "steps": 2, "progress": False, **kwargs})
    with pytest.raises(ValueError, match="non-empty captions"):
        sample.generate([""], pipe, progress=False)
    with pytest.raises(SystemExit, match="non-empty captions"):
        cli(tmp_path, published_dir, text_encoder_dir, "")
    for flags in (["--best_of=0"], ["--num_samples=-1", "--best_of=-1"]):  # each is checked, not their product
        with pytest.raises(SystemExit, match="--best_of|--num_samples"):
            cli(tmp_path, published_dir, text_encoder_dir, "a dog barks", *flags)
    assert not list(tmp_path.rglob("*.wav"))  # nothing was written


def test_outputs_are_checked_before_the_work(tmp_path, published_dir, text_encoder_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: nothing to test here
            pytest.skip("running as a user who can write anywhere")
        for flag in (f"--out={locked / 'x.wav'}", f"--out_dir={locked / 'sub'}"):
            with pytest.raises(SystemExit, match="not a writable folder"):
                cli(tmp_path, published_dir, text_encoder_dir, "a dog barks", flag)
    finally:
        locked.chmod(0o700)
    with pytest.raises(SystemExit, match="is a folder"):
        cli(tmp_path, published_dir, text_encoder_dir, "a dog barks", f"--out={tmp_path / 'd.wav'}") \
            if (tmp_path / "d.wav").mkdir() is None else None


def test_non_finite_weights_never_reach_a_wav(tmp_path, text_encoder_dir):
    net, vae_net = tiny_transformer(seed=3), tiny_vae()
    with torch.no_grad():
        net.final_layer.conv.weight.fill_(float("nan"))
    ckpt = dict(model_args=asdict(net.cfg), model=net.state_dict(), ema=None, vae_args=vae_net.args,
                vae=vae_net.state_dict(), mel="16k", text_encoder=text_encoder_dir, step=10)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="non-finite"):
        sample.main([f"--ckpt={tmp_path / 'ckpt.pt'}", "a dog barks", "--duration=1", "--steps=2",
                     f"--out={tmp_path / 'nan.wav'}"])
    assert not (tmp_path / "nan.wav").exists()


def test_cli_writes_named_16_bit_wavs_without_overwriting(tmp_path, published_dir, text_encoder_dir, capsys):
    cli(tmp_path, published_dir, text_encoder_dir, "rain on a tin roof", "a/b: c?", "--seed=3")
    out = tmp_path / "out"
    first = out / "rain_on_a_tin_roof.wav"
    assert sorted(p.name for p in out.iterdir()) == ["a_b_c.wav", "rain_on_a_tin_roof.wav"]
    info = sf.info(first)
    assert info.subtype == "PCM_16" and info.samplerate == 16000 and info.frames == 24000
    wave, _ = sf.read(first)
    assert abs(wave).max() > 1e-3 and not (abs(wave) > 1).any()
    before = first.read_bytes()
    cli(tmp_path, published_dir, text_encoder_dir, "rain on a tin roof", "a/b: c?", "--seed=3")
    assert first.read_bytes() == before  # never replaced silently
    assert (out / "rain_on_a_tin_roof-1.wav").read_bytes() == before  # same command and seed -> same file
    assert "exists; writing" in capsys.readouterr().out
    cli(tmp_path, published_dir, text_encoder_dir, "rain on a tin roof", "--seed=4", "--overwrite")
    assert first.read_bytes() != before and not (out / "rain_on_a_tin_roof-2.wav").exists()


def test_cli_prompts_file_by_id_and_num_samples(tmp_path, published_dir, text_encoder_dir):
    cli(tmp_path, published_dir, text_encoder_dir, f"--prompts_file={FIXTURES / 'tta_bench_3.json'}",
        "--batch_size=2", "--num_samples=2")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"prompt_000{i}_{j}.wav" for i in (1, 2, 3) for j in (0, 1)]
    with pytest.raises(SystemExit):  # --out names a single file
        cli(tmp_path, published_dir, text_encoder_dir, "a", "b", f"--out={tmp_path / 'x.wav'}")


def test_our_train_checkpoint(tmp_path, text_encoder_dir):
    """A ckpt.pt in train.py's format (model_args, model, ema, vae_args, vae, mel, text_encoder) loads through
    the same --ckpt path; a 16 kHz model is vocoded with Griffin-Lim."""
    net, vae_net = tiny_transformer(seed=3), tiny_vae()
    ckpt = dict(model_args=asdict(net.cfg), model=net.state_dict(), ema=None, vae_args=vae_net.args,
                vae=vae_net.state_dict(), mel="16k", text_encoder=text_encoder_dir, step=10)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    pipe = sample.load_pipeline(str(tmp_path / "ckpt.pt"), device="cpu")
    assert torch.equal(pipe.transformer.latent_mean, net.latent_mean) and not isinstance(pipe.vocoder, BigVGAN)
    audio, sr = sample.generate(["a dog barks"], pipe, duration=1.0, steps=2, progress=False)
    assert sr == 16000 and audio.shape == (1, 16000) and torch.isfinite(audio).all()
    out = tmp_path / "dog.wav"
    sample.main([f"--ckpt={tmp_path / 'ckpt.pt'}", "a dog barks", "--duration=1", "--steps=2", f"--out={out}"])
    assert sf.info(out).frames == 16000
    with pytest.raises(SystemExit, match="does not exist"):
        sample.main([f"--ckpt={tmp_path / 'missing.pt'}", "a dog barks"])


def test_a_prompts_audio_depends_on_the_seed_alone(pipe):
    """Sample k of a prompt starts from seed + k: neither the other prompts nor batch_size change it."""
    kw = dict(duration=1.0, steps=2, progress=False)
    alone, _ = sample.generate(["a dog barks"], pipe, **kw)
    second, _ = sample.generate(["thunder", "a dog barks"], pipe, batch_size=1, **kw)
    several, _ = sample.generate(["a dog barks"], pipe, num_samples=2, batch_size=2, **kw)
    torch.testing.assert_close(second[1], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(several[0], alone[0], atol=1e-5, rtol=0)
    assert not torch.allclose(several[1], alone[0])


def test_wrong_inputs_are_refused_by_name(tmp_path, published_dir, text_encoder_dir):
    vae_only = tmp_path / "vae.pt"
    torch.save({"vae_args": tiny_vae().args, "model": tiny_vae().state_dict()}, vae_only)
    with pytest.raises(ValueError, match="VAE checkpoint"):
        sample.load_pipeline(str(vae_only), device="cpu")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable weights file"):
        sample.load_pipeline(str(text), device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            data.pick_device("cuda")
    for bad in (['""'.strip('"')], ["a", "--out=x.mp3"]):
        with pytest.raises(SystemExit):
            cli(tmp_path, published_dir, text_encoder_dir, *bad)


def test_damaged_checkpoints_and_misfits_are_named_before_any_download(tmp_path, text_encoder_dir):
    net, vae_net = tiny_transformer(seed=3), tiny_vae()
    ckpt = dict(model_args=asdict(net.cfg), model=net.state_dict(), ema=None, vae_args=vae_net.args,
                vae=vae_net.state_dict(), mel="16k", text_encoder=text_encoder_dir, step=10)
    path = str(tmp_path / "ckpt.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "mel"}, path)
    with pytest.raises(ValueError, match="not a complete train.py checkpoint: it has no mel"):
        sample.load_pipeline(path, device="cpu")
    for args in ({"depth": 6}, {"bogus": 1}, {"fused_depth": 9}):  # other weights, another version, a broken config
        torch.save({**ckpt, "model_args": {**ckpt["model_args"], **args}}, path)
        with pytest.raises(ValueError, match="do not fit its own model_args"):
            sample.load_pipeline(path, device="cpu")
    torch.save(ckpt, path)  # a 16 kHz model cannot take the 44.1 kHz BigVGAN: refused, nothing fetched
    with pytest.raises(ValueError, match="--vocoder=bigvgan takes 128-bin"):
        sample.load_pipeline(path, device="cpu", vocoder="bigvgan")


def test_overwrite_never_replaces_another_output_of_the_run(tmp_path, published_dir, text_encoder_dir, capsys):
    cli(tmp_path, published_dir, text_encoder_dir, "dog!", "dog?", "--overwrite")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dog-1.wav", "dog.wav"]
    assert "dog.wav is another output of this run; writing" in capsys.readouterr().out


def test_a_failed_write_is_one_line_and_keeps_the_files_written(tmp_path, published_dir, text_encoder_dir,
                                                                monkeypatch):
    real = sf.write

    def full_disk(path, *args, **kwargs):
        if "thunder" in path:
            raise sf.LibsndfileError(0, "System error.")
        real(path, *args, **kwargs)
    monkeypatch.setattr(sf, "write", full_disk)
    with pytest.raises(SystemExit, match=r"error: could not write .*thunder\.wav"):
        cli(tmp_path, published_dir, text_encoder_dir, "rain", "thunder", "--batch_size=1")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["rain.wav"]  # written before the failure, complete
