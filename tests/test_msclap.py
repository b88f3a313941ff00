"""Microsoft CLAP 2023 (CLAPScore) against msclap 1.3.4: fixtures/msclap_a.pt (tiny HTSAT and GPT-2, random
weights, official key names), the full-size key manifest, torchaudio's resampler (fixtures/resample_a.pt),
loading from a folder in the published format, and the offline error.

Nothing is downloaded. The fixture holds token ids, not captions (its tiny GPT-2 has a 1,000-word random
vocabulary), so the text parity starts from its input_ids; the tokenisation recipe is checked separately with a
small byte-level GPT-2 tokenizer written here (GPT-2's 256 byte symbols in GPT-2's order, so '!' is 0 and ' ' is
220 as in the real vocabulary, a few merges, <|endoftext|> last) against the call msclap makes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2Tokenizer

from conftest import FIXTURES
from data import resample
from reward import (HTSAT_2023, MSCLAP_D_PROJ, MSCLAP_KEY_MAP, REWARDS, ClapReward, MSClap, MSClapScore,
                    crop_start, rename_key, seven_seconds, stft_kernels)

ROOT = Path(__file__).resolve().parents[1]
SEVEN_S = 7 * 44100
CAPTIONS = ["a dog barks", "rain on a tin roof!! thunder !", "birds " * 100]  # '!'s inside; over 77 tokens


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURES / "msclap_a.pt", weights_only=True)


def htsat_args(fx):
    """Our HTSAT arguments from the fixture's HTSAT_Swin_Transformer kwargs and front-end constants."""
    a, front = fx["htsat_args"], fx["htsat_frontend"]
    assert (a["patch_stride"] == [a["patch_size"]] * 2 and a["in_chans"] == 1 and not a["ape"]
            and a["patch_norm"] and a["qkv_bias"] and a["norm_before_mlp"] == "ln")  # the variant we implement
    return dict({k: a[k] for k in ("embed_dim", "depths", "num_heads", "window_size", "spec_size", "patch_size",
                                   "mlp_ratio", "num_classes")},
                n_fft=front["window_size"], hop=front["hop_size"], mel_bins=front["mel_bins"])


def gpt2_config(fx):
    return GPT2Config(**fx["gpt2_config"], bos_token_id=fx["eot_id"], eos_token_id=fx["eot_id"])


@pytest.fixture(scope="module")
def model(fx):
    m = MSClap(htsat_args(fx), gpt2_config(fx), fx["clap_args"]["d_proj"]).eval()
    m.load_official(fx["state_dict"])  # omits the STFT kernels: load_official computes them
    return m


def fixture_clips(fx):
    """The fixture's clips through msclap's audio rule: resampled to 44.1 kHz, then tiled or cropped at the
    fixture's crop starts. -> (B, 7 s) and the flattened lengths the rule saw."""
    waves = [resample(w["waveform"], w["sample_rate"], 44100) if w["sample_rate"] != 44100
             else w["waveform"] for w in fx["audio_inputs"]]
    return torch.stack([seven_seconds(w, s) for w, s in zip(waves, fx["crop_starts"])]), [w.numel() for w in waves]


# ---------------------------------------------------------------- parity with msclap

def test_audio_and_text_embeddings_match_msclap(fx, model):
    clips, lengths = fixture_clips(fx)
    assert lengths == fx["flat_lengths"]  # stereo concatenated, the 16 kHz clip resampled first
    assert [s is None for s in fx["crop_starts"]] == [n <= SEVEN_S for n in lengths]
    with torch.no_grad():
        assert (model.audio.logmel(clips[:1]) - fx["logmel_clip0"][0]).abs().max() < 1e-4
        assert (model.audio(clips) - fx["audio_latent"]).abs().max() < 1e-4
    audio = model.embed_audio(clips)
    text = model.embed_text(fx["input_ids"], fx["attention_mask"])
    assert (audio - fx["audio_embeddings"]).abs().max() < 1e-4
    assert (text - fx["text_embeddings"]).abs().max() < 1e-4
    cosine = (F.normalize(audio, dim=-1) * F.normalize(text, dim=-1)).sum(-1)
    assert (cosine - fx["cosine"]).abs().max() < 1e-4


def test_text_pooling_keeps_msclaps_count_of_nonzero_ids(fx, model):
    """msclap pools at (ids != 0).sum() - 1; the fixture's last caption holds a 0 ('!') among its tokens, so that
    position is one before its last real token, and pooling at the last real token would not match."""
    ids, mask = fx["input_ids"], fx["attention_mask"]
    row = int(((ids == 0) & (mask == 1)).any(-1).nonzero()[0])
    with torch.no_grad():
        hidden = model.text(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).last_hidden_state[0]
    assert (hidden[int((ids[row] != 0).sum()) - 1] - fx["text_pooled_hidden"][row]).abs().max() < 1e-4
    assert (hidden[int(mask[row].sum()) - 1] - fx["text_pooled_hidden"][row]).abs().max() > 1e-2


def test_seven_second_rule():
    sec = torch.randn(2, 3 * 44100, generator=torch.Generator().manual_seed(0))
    stereo = seven_seconds(sec, None)  # 6 s of concatenated channels, tiled: ch0, ch1, then ch0 again
    assert torch.equal(stereo, torch.cat([sec[0], sec[1], sec[0]])[:SEVEN_S])
    exact = torch.randn(1, SEVEN_S)
    assert torch.equal(seven_seconds(exact), exact[0])  # exactly 7 s is tiled (once), not cropped
    longer = torch.randn(1, SEVEN_S + 1)
    with pytest.raises(AssertionError, match="longer than 7 s"):
        seven_seconds(longer)
    assert torch.equal(seven_seconds(longer, 1), longer[0, 1:])
    assert crop_start(SEVEN_S, 0, "a dog") is None
    starts = [crop_start(10 * 44100, 0, f"prompt {i}") for i in range(20)]
    assert all(0 <= s < 3 * 44100 for s in starts) and len(set(starts)) > 1  # randrange's range, varying by id
    assert starts == [crop_start(10 * 44100, 0, f"prompt {i}") for i in range(20)]  # and the same on every run
    assert starts != [crop_start(10 * 44100, 1, f"prompt {i}") for i in range(20)]


def test_stft_kernels_are_cos_and_minus_sin_times_periodic_hann():
    real, imag = stft_kernels(16)
    frame = torch.randn(16, dtype=torch.float64)
    spectrum = torch.fft.rfft(frame * torch.hann_window(16, periodic=True, dtype=torch.float64))
    assert torch.allclose(real[:, 0].double() @ frame, spectrum.real, atol=1e-5)
    assert torch.allclose(imag[:, 0].double() @ frame, spectrum.imag, atol=1e-5)


def test_full_size_model_has_the_published_keys_and_shapes():
    manifest = json.loads((FIXTURES / "manifest_msclap_2023_full.json").read_text())
    assert GPT2Config().n_embd == manifest["config_2023"]["transformer_embed_dim"]  # GPT2Config() is gpt2's shape
    with torch.device("meta"):
        m = MSClap(HTSAT_2023, GPT2Config(), MSCLAP_D_PROJ)
    shapes = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {rename_key(k, MSCLAP_KEY_MAP): shape for k, shape in manifest["shapes"].items()}
    # the STFT kernels and mel filterbank are buffers here, frozen parameters in msclap
    assert sum(p.numel() for p in m.parameters()) == manifest["num_trainable"]
    assert sum(v.numel() for v in m.state_dict().values()) == manifest["num_state_dict_elements"]


# ---------------------------------------------------------------- tokenizer, loading, scoring

def byte_symbols():
    """GPT-2's byte -> symbol table, in GPT-2's vocabulary order (printable bytes first, the rest shifted)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def write_gpt2_tokenizer(folder, eot_id):
    symbols = byte_symbols()
    merges = [("Ġ", "b"), ("i", "r"), ("Ġb", "ir"), ("d", "s"), ("Ġbir", "ds"), ("Ġ", "d"), ("o", "g"), ("!", "!"),
              ("Ġ", "!")]
    vocab = {s: i for i, s in enumerate(symbols + ["".join(m) for m in merges])}
    vocab["<|endoftext|>"] = eot_id
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


@pytest.fixture(scope="module")
def published_dir(fx, tmp_path_factory):
    """A folder laid out like the published files: CLAP_weights_2023.pth ({"model": state dict} with official
    names, GPT-2 causal-mask buffers as older transformers saved them, no STFT kernels) and gpt2's config.json,
    vocab.json and merges.txt, at the fixture's tiny size."""
    folder = tmp_path_factory.mktemp("msclap")
    state = dict(fx["state_dict"])
    state["caption_encoder.base.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128, dtype=torch.bool))
    state["caption_encoder.base.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save({"model": state}, folder / "CLAP_weights_2023.pth")
    (folder / "config.json").write_text(gpt2_config(fx).to_json_string())
    write_gpt2_tokenizer(folder, fx["eot_id"])
    return folder


@pytest.fixture(scope="module")
def loaded(fx, published_dir):
    return MSClap.from_pretrained(published_dir, device="cpu", htsat=htsat_args(fx), d_proj=fx["clap_args"]["d_proj"])


def test_loads_the_published_format_from_a_folder(fx, loaded):
    tensors = [*loaded.parameters(), *loaded.buffers()]
    assert not any(t.is_meta for t in tensors) and not loaded.training
    clips, _ = fixture_clips(fx)
    assert (loaded.embed_audio(clips) - fx["audio_embeddings"]).abs().max() < 1e-4
    assert (loaded.embed_text(fx["input_ids"], fx["attention_mask"]) - fx["text_embeddings"]).abs().max() < 1e-4


def test_tokenize_is_msclaps_recipe(fx, published_dir, loaded):
    tok = GPT2Tokenizer.from_pretrained(published_dir)  # as CLAPWrapper.load_clap builds it
    tok.add_special_tokens({"pad_token": "!"})
    ids, mask = loaded.tokenize(CAPTIONS)
    assert ids.shape[1] > 77 and ids.shape == mask.shape  # the long caption is not cut
    for i, caption in enumerate(CAPTIONS):  # msclap's call, one caption at a time (encode_plus in transformers 4)
        ref = tok(caption + " <|endoftext|>", add_special_tokens=True, max_length=77, padding="max_length",
                  return_tensors="pt")
        n = ref["input_ids"].shape[1]
        assert torch.equal(ids[i, :n], ref["input_ids"][0]) and torch.equal(mask[i, :n], ref["attention_mask"][0])
        assert not ids[i, n:].any() and not mask[i, n:].any()  # the batch's extra padding is '!' (0), masked
        real = ids[i, :int(mask[i].sum())]
        assert real[-2:].tolist() == [220, fx["eot_id"]]  # ... 'Ġ' <|endoftext|>: the space stays a token
    # '!' is a special token there (the pad): each '!' of a caption is id 0, never merged into '!!' or 'Ġ!'
    assert (ids[1, :int(mask[1].sum())] == 0).sum() == 3


def test_score_is_the_cosine_with_seeded_crops(loaded):
    scorer = MSClapScore(model=loaded, seed=3)
    g = torch.Generator().manual_seed(0)
    long = 0.1 * torch.randn(3, 9 * 44100, generator=g)  # longer than 7 s: cropped
    scores = scorer.score(long, 44100, CAPTIONS)
    starts = [crop_start(9 * 44100, 3, c) for c in CAPTIONS]
    audio = loaded.embed_audio(torch.stack([seven_seconds(w[None], s) for w, s in zip(long, starts)]))
    text = loaded.embed_text(*loaded.tokenize(CAPTIONS))
    assert scores.shape == (3,) and (scores - F.cosine_similarity(audio, text)).abs().max() < 1e-5
    assert torch.equal(scorer.score(long, 44100, CAPTIONS), scores)  # the same crops on every call
    other_seed = MSClapScore(model=loaded, seed=4).score(long, 44100, CAPTIONS)
    assert (other_seed - scores).abs().max() > 1e-6  # another seed, other crops
    ids = ["prompt_0001", "prompt_0002", "prompt_0003"]  # bench.py passes the TTA-Bench ids
    by_id = scorer.score_all(long, 44100, CAPTIONS, ids)["score"]
    starts = [crop_start(9 * 44100, 3, i) for i in ids]
    audio = loaded.embed_audio(torch.stack([seven_seconds(w[None], s) for w, s in zip(long, starts)]))
    assert (by_id - F.cosine_similarity(audio, text)).abs().max() < 1e-5
    short = 0.1 * torch.randn(2, 16000, generator=g)  # 1 s at 16 kHz: resampled as msclap does, then tiled
    tiled = [seven_seconds(resample(w[None], 16000, 44100)) for w in short]
    assert (scorer.score(short, 16000, CAPTIONS[:2]) - F.cosine_similarity(
        loaded.embed_audio(torch.stack(tiled)), loaded.embed_text(*loaded.tokenize(CAPTIONS[:2])))).abs().max() < 1e-5


def test_registry_names():
    assert REWARDS["clap"] is MSClapScore and REWARDS["laion_clap"] is ClapReward and "clapscore" not in REWARDS


def test_offline_with_nothing_cached_names_the_repository_and_file(tmp_path):
    code = ("import data, reward\n"
            "try:\n    reward.MSClapScore(device='cpu')\n"
            "except data.WeightsMissing as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr
    assert "https://huggingface.co/microsoft/msclap" in run.stdout and "CLAP_weights_2023.pth" in run.stdout
