"""Rewards: signal-level orderings, a tiny random CLAP, tiny random Qwen2.5-Omni and Qwen3-Omni thinkers, the registry.

Nothing is downloaded. The Qwen judges are tested with randomly initialised thinkers (2 layers, tiny audio encoders
with the real strides) and a small byte-level BPE tokenizer trained here on the judges' prompt text, carrying the
Qwen special tokens; the real tokenizers, weights and chat templates are not available offline. The reference is the
released recipe run clip by clip through transformers' generate().
"""

import copy
import dataclasses
import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, PreTrainedTokenizerFast,
                          Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerConfig,
                          Qwen2_5OmniThinkerForConditionalGeneration, Qwen2Tokenizer, Qwen3OmniMoeConfig,
                          Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeThinkerConfig,
                          Qwen3OmniMoeThinkerForConditionalGeneration, WhisperFeatureExtractor)
from transformers.models.qwen2_5_omni import processing_qwen2_5_omni
from transformers.models.qwen3_omni_moe import processing_qwen3_omni_moe

import data
from data import WeightsMissing, resample
from reward import (AES_AXES, AES_KEY_MAP, AES_WAVLM, AQA_QWEN3_OMNI, QWEN25_OMNI, REWARDS, AesModel,
                    AudioboxAesthetics, ClapReward, LoudnessReward, QwenOmniJudge, SpectralCentroidReward, WeightedSum,
                    audio_token_count, build_reward, rename_key)

SR = 16000
PROMPTS = ["a dog barks", "rain falls on a tin roof while thunder rumbles", "birds"]


def tone(freq_hz, amplitude=0.1, seconds=0.5, sr=SR):
    t = torch.arange(int(seconds * sr)) / sr
    return amplitude * torch.sin(2 * math.pi * freq_hz * t)


# ---------------------------------------------------------------- signal-level rewards

def test_loudness_prefers_the_level_closest_to_target():
    audio = torch.stack([tone(440, a) for a in (0.001, 0.1 * math.sqrt(2), 0.9)])  # RMS -63, -20, -4 dBFS
    scores = LoudnessReward(target_db=-20).score(audio, SR, ["x"] * 3)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert scores[1] > scores[2] > scores[0]
    assert abs(scores[1].item()) < 0.01  # a sine of peak 0.1 * sqrt(2) has RMS 0.1 = -20 dBFS


def test_spectral_centroid_prefers_the_frequency_closest_to_target():
    audio = torch.stack([tone(f) for f in (200.0, 1000.0, 3000.0)])
    scores = SpectralCentroidReward(target_hz=1000).score(audio, SR, ["x"] * 3)
    assert scores.argmax() == 1 and scores[2] > scores[0]  # 3 kHz is 1.6 octaves away, 200 Hz 2.3
    assert abs(scores[1].item()) < 0.05


def test_rewards_reject_bad_input():
    reward = LoudnessReward()
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        reward.score(torch.zeros(2, 1, 100), SR, ["a", "b"])
    with pytest.raises(ValueError, match="one prompt per clip"):
        reward.score(torch.zeros(2, 100), SR, ["a"])
    with pytest.raises(ValueError, match="sample_rate"):
        reward.score(torch.zeros(2, 100), 0, ["a", "b"])


# ---------------------------------------------------------------- registry

def test_build_reward_weighted_sum_and_components():
    audio = torch.stack([tone(300, 0.05), tone(2000, 0.3)])
    reward = build_reward("loudness:1.0, centroid:0.5")
    total = reward.score(audio, SR, ["a", "b"])
    assert set(reward.terms) == {"loudness", "centroid"}
    assert torch.equal(reward.score_all(audio, SR, ["a", "b"])["score"], total)
    parts = [r.score(audio, SR, ["a", "b"]) for r in (LoudnessReward(), SpectralCentroidReward())]
    assert torch.allclose(total, parts[0] + 0.5 * parts[1])
    same = build_reward({"loudness": 1.0, "centroid": {"weight": 0.5}})
    assert torch.allclose(same.score(audio, SR, ["a", "b"]), total)
    custom = build_reward({"loudness": {"weight": 2.0, "target_db": -6}})
    expected = 2.0 * LoudnessReward(-6).score(audio, SR, ["a", "b"])
    assert torch.allclose(custom.score(audio, SR, ["a", "b"]), expected)
    assert isinstance(reward, WeightedSum) and reward.sample_rate is None


def test_build_reward_rejects_unknown_names():
    with pytest.raises(ValueError, match="known rewards: .*loudness"):
        build_reward("loudnes:1.0")
    with pytest.raises(ValueError, match="empty"):
        build_reward("")
    assert {"qwen_omni", "aqa", "clap", "loudness", "centroid"} <= set(REWARDS)


# ---------------------------------------------------------------- CLAP (tiny, random)

@pytest.fixture(scope="module")
def clap():
    words = "a dog barks rain falls on tin roof while thunder rumbles birds".split()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(dict.fromkeys(words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")  # pad id 1 as in RoBERTa
    config = ClapConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=40, projection_dim=8),
        audio_config=dict(patch_embeds_hidden_size=8, depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1],
                          hidden_size=64, projection_dim=8, window_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    processor = ClapProcessor(feature_extractor=ClapFeatureExtractor(), tokenizer=tokenizer)
    return ClapReward(model=ClapModel(config), processor=processor, device="cpu")


def test_clap_scores_are_cosines_and_batch_independent(clap):
    assert clap.sample_rate == 48000
    audio = torch.randn(3, 22050, generator=torch.Generator().manual_seed(0)) * 0.1
    scores = clap.score(audio, 22050, PROMPTS)
    assert scores.shape == (3,) and scores.abs().max() <= 1.0
    one_by_one = torch.cat([clap.score(audio[i:i + 1], 22050, PROMPTS[i:i + 1]) for i in range(3)])
    assert (scores - one_by_one).abs().max() < 1e-5
    assert (scores - clap.score(audio, 22050, PROMPTS[::-1])).abs().max() > 1e-4  # the caption matters


# ---------------------------------------------------------------- Audiobox Aesthetics (tiny, random)

AES_FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def aes_fx():
    """fixtures/aes_a.pt: audiobox-aesthetics 0.0.4 on a tiny seeded WavLM, its inputs, outputs and windows."""
    return torch.load(AES_FIXTURES / "aes_a.pt", weights_only=True)


@pytest.fixture(scope="module")
def aes(aes_fx):
    model = AesModel.from_official(aes_fx["wavlm_config"], aes_fx["model_cfg"], aes_fx["state_dict"])
    return AudioboxAesthetics(model, aes_fx["target_transform"], device="cpu")


def test_aes_matches_the_package_clip_by_clip(aes, aes_fx):
    for clip, expected in zip(aes_fx["inputs"], aes_fx["outputs"]):
        mono = clip["waveform"].mean(0, keepdim=True)  # ours takes mono clips; the package averages after resampling
        scores = aes.score_all(mono, clip["sample_rate"], [""])
        assert set(scores) == set(AES_AXES) and scores["PQ"].shape == (1,) and scores["PQ"].dtype == torch.float32
        for axis in AES_AXES:
            assert abs(scores[axis].item() - expected[axis]) < 1e-4, axis
        assert torch.equal(aes.score(mono, clip["sample_rate"], [""]), scores["PQ"])


def test_aes_windows_masks_and_layer_results_match_the_package(aes, aes_fx):
    W = aes.WINDOW_SECONDS * aes.sample_rate
    windows, valid = [], []
    for clip in aes_fx["inputs"]:  # 10 s windows, 10 s hop, the last zero-padded, in clip order
        wave = resample(clip["waveform"].mean(0), clip["sample_rate"], aes.sample_rate)
        for start in range(0, wave.shape[0], W):
            piece = wave[start:start + W]
            windows.append(F.pad(piece, (0, W - piece.shape[0])))
            valid.append(torch.arange(W) < piece.shape[0])
    windows, valid = torch.stack(windows), torch.stack(valid)
    torch.testing.assert_close(valid.float().mean(-1), torch.tensor(aes_fx["window_weights"]))
    with torch.no_grad():
        states, frames = aes.model.hidden_states(windows, valid)
        preds = aes.model(windows, valid)
    assert torch.equal(~frames, aes_fx["window_padding_mask"])
    for axis in AES_AXES:
        torch.testing.assert_close(preds[axis], aes_fx["window_preds_raw"][axis], rtol=0, atol=1e-4)
    w = aes_fx["debug_window"]
    layer_results = states[w, frames[w]].permute(2, 0, 1)  # (L, T_real, D), as the package's layer_results
    torch.testing.assert_close(layer_results, aes_fx["layer_results_debug_window"], rtol=0, atol=1e-4)


def test_aes_batch_equals_clip_by_clip(aes, aes_fx):
    clip = aes_fx["inputs"][2]
    mono = clip["waveform"].mean(0)
    batch = aes.score_all(torch.stack([mono, 0.3 * mono.flip(0)]), clip["sample_rate"], ["a", "b"])
    for b, wave in enumerate([mono, 0.3 * mono.flip(0)]):
        alone = aes.score_all(wave[None], clip["sample_rate"], ["a"])
        for axis in AES_AXES:
            torch.testing.assert_close(batch[axis][b], alone[axis][0], rtol=0, atol=1e-5)


def test_aes_full_size_has_the_published_keys_and_shapes():
    manifest = json.loads((AES_FIXTURES / "manifest_aes_full.json").read_text())
    assert {k: manifest["wavlm_config"][k] for k in AES_WAVLM} == AES_WAVLM  # the package's default backbone
    with torch.device("meta"):
        model = AesModel(AES_WAVLM, manifest["constructor"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {rename_key(k, AES_KEY_MAP): shape for k, shape in manifest["shapes"].items()}
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["num_parameters"]


def test_aes_loads_a_folder_in_the_published_format(aes_fx, tmp_path):
    # checkpoint.pt as published: "model."-prefixed names, the AesMultiOutput fields, the target statistics
    torch.save({"state_dict": OrderedDict(("model." + k, v) for k, v in aes_fx["state_dict"].items()),
                "model_cfg": dict(aes_fx["model_cfg"]), "target_transform": aes_fx["target_transform"]},
               tmp_path / "checkpoint.pt")
    spec = {"aes": {"weights_dir": str(tmp_path), "axis": "CE", "wavlm_config": aes_fx["wavlm_config"]}}
    reward = build_reward(spec, device="cpu")  # REWARDS["aes"] = AudioboxAesthetics.from_pretrained
    clip, expected = aes_fx["inputs"][1], aes_fx["outputs"][1]
    mono = clip["waveform"].mean(0, keepdim=True)
    assert abs(reward.score(mono, clip["sample_rate"], [""]).item() - expected["CE"]) < 1e-4
    with pytest.raises(ValueError, match="axis must be one of"):
        AudioboxAesthetics.from_pretrained(tmp_path, "cpu", axis="quality", wavlm_config=aes_fx["wavlm_config"])


def test_aes_offline_without_weights_names_repo_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as hub  # read from the environment once, at import: set them here too
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(data.WeightsMissing) as info:
        AudioboxAesthetics.from_pretrained(device="cpu")
    assert "facebook/audiobox-aesthetics" in str(info.value) and "checkpoint.pt" in str(info.value)


# ---------------------------------------------------------------- Qwen-Omni judges (tiny, random)

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
                "<|audio_start|>", "<|audio_pad|>", "<|audio_end|>", "<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>",
                "<|vision_eos|>"]
KINDS = {"qwen2_5": QWEN25_OMNI, "qwen3": AQA_QWEN3_OMNI}
RULES = ["first_token", "last_yes_no"]


def tiny_qwen_backend():
    """Byte-level BPE like Qwen's, trained on the judges' prompt text; the answer words are single tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=QWEN_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([QWEN25_OMNI.system_prompt, QwenOmniJudge.QUESTION] + PROMPTS, trainer)
    backend.add_tokens(["Yes", "No", "yes", "no"])
    return backend


def tiny_qwen_tokenizer(backend):
    return Qwen2Tokenizer(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def tiny_thinker(kind, tokenizer):
    """A seeded random thinker of either family, a few thousand weights; the audio encoders keep their real
    strides and (Qwen3-Omni) chunking."""
    ids = tokenizer.convert_tokens_to_ids
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, rope_parameters=rope)
    audio = dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                 output_dim=32)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)
    if kind == "qwen2_5":
        config = Qwen2_5OmniThinkerConfig(
            audio_config=audio, vision_config={**vision, "fullatt_block_indexes": [0]}, text_config=text,
            audio_token_index=ids("<|AUDIO|>"), image_token_index=ids("<|IMAGE|>"),
            video_token_index=ids("<|VIDEO|>"), audio_start_token_id=ids("<|audio_bos|>"),
            audio_end_token_id=ids("<|audio_eos|>"), vision_start_token_id=ids("<|vision_bos|>"))
        cls = Qwen2_5OmniThinkerForConditionalGeneration
    else:
        config = Qwen3OmniMoeThinkerConfig(
            audio_config={**audio, "downsample_hidden_size": 8, "n_window": 50, "n_window_infer": 100},
            vision_config={**vision, "deepstack_visual_indexes": [0]},
            text_config={**text, "head_dim": 16, "moe_intermediate_size": 16, "num_experts": 4,
                         "num_experts_per_tok": 2, "rope_parameters": {**rope, "interleaved": True}},
            audio_token_id=ids("<|audio_pad|>"), image_token_id=ids("<|IMAGE|>"), video_token_id=ids("<|VIDEO|>"),
            audio_start_token_id=ids("<|audio_start|>"), vision_start_token_id=ids("<|vision_bos|>"))
        cls = Qwen3OmniMoeThinkerForConditionalGeneration
    torch.manual_seed(0)
    return cls(config).eval()


def boost_answers(model, tokenizer, words):
    """Rewrite the output rows of the answer words and <|im_end|> so that greedy answers are yes/no words, now
    and then ended: opposite rows for yes and no (whichever side of a hyperplane the hidden state falls on wins),
    a random row of its own for <|im_end|>."""
    yes, no, end = tokenizer.convert_tokens_to_ids([*words, "<|im_end|>"])
    generator = torch.Generator().manual_seed(4)  # a seed whose answers end at different steps (see below)
    row, other = torch.randn(2, model.lm_head.weight.shape[1], generator=generator)
    with torch.no_grad():
        model.lm_head.weight[yes], model.lm_head.weight[no], model.lm_head.weight[end] = 0.5 * row, -0.5 * row, other
    return model


@pytest.fixture(scope="module")
def qwen_parts():
    backend = tiny_qwen_backend()
    tokenizer = tiny_qwen_tokenizer(backend)
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=SR, chunk_length=2)  # a 2 s window
    return backend, tokenizer, features, {kind: tiny_thinker(kind, tokenizer) for kind in KINDS}


def judge_for(qwen_parts, kind, rule, boosted=False, **kw):
    _, tokenizer, features, thinkers = qwen_parts
    model = thinkers[kind]
    if boosted:
        model = boost_answers(copy.deepcopy(model), tokenizer, (KINDS[kind].yes, KINDS[kind].no))
    return QwenOmniJudge(KINDS[kind], model=model, tokenizer=tokenizer, feature_extractor=features, device="cpu",
                         rule=rule, max_new_tokens=6, **kw)


def released_scores(judge, audio_16k, prompts):
    """The released recipe, clip by clip: greedy generate() to <|im_end|> (one token under first_token), then
    p(yes) / (p(yes) + p(no)) from the scores at the last generated token that is yes or no, 0 if none is.
    Returns the scores and each clip's answer tokens."""
    steps = 1 if judge.settings.rule == "first_token" else judge.settings.max_new_tokens
    scores, answers = [], []
    for i in range(len(prompts)):
        inputs = judge.inputs(audio_16k[i:i + 1], prompts[i:i + 1])
        gen = judge.model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=judge.eos_id,
                                   pad_token_id=judge.tokenizer.pad_token_id, return_dict_in_generate=True,
                                   output_scores=True)
        answer = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        hits = [t for t, token in enumerate(answer) if token in (judge.yes_id, judge.no_id)]
        log_probs = gen.scores[hits[-1]][0].float().log_softmax(-1) if hits else None
        scores.append(torch.sigmoid(log_probs[judge.yes_id] - log_probs[judge.no_id]).item() if hits else 0.0)
        answers.append(answer)
    return torch.tensor(scores), answers


def clips(seconds=1.3, sr=22050):
    """Three different clips: quiet noise, a loud tone, a square-ish noise. 1.3 s: a full Qwen3-Omni encoder chunk
    and a tail; within the 2 s window of the test feature extractor."""
    n, g = int(seconds * sr), torch.Generator().manual_seed(0)
    return torch.stack([0.02 * torch.randn(n, generator=g), 0.5 * torch.sin(torch.arange(n) * 0.3),
                        0.3 * torch.randn(n, generator=g).sign()]), sr


def write_published_folder(folder, kind, model, qwen_parts):
    """The judge's repository as published, tiny: the full model's config and sharded weights (thinker.* keys; no
    talker weights here), a vocab.json / merges.txt tokenizer whose tokenizer_config lists the added tokens, and the
    feature extractor's config."""
    backend, tokenizer, features, _ = qwen_parts
    full_class, full_config = {"qwen2_5": (Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniConfig),
                               "qwen3": (Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeConfig)}[kind]
    full = full_class(full_config(thinker_config=model.config.to_dict(), enable_audio_output=False))
    full.thinker.load_state_dict(model.state_dict())
    full.save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)
    backend.model.save(str(folder))  # vocab.json, merges.txt: what the published repositories ship and we read
    (folder / "tokenizer.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(i): {"content": t.content, "special": t.special, "normalized": False,
                                               "lstrip": False, "rstrip": False, "single_word": False}
                                      for i, t in tokenizer.added_tokens_decoder.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    features.save_pretrained(folder)


def test_judge_prompts(qwen_parts):
    question = ("Does this audio contain the sound events described by the text: a dog barks? "
                "Please only answer yes or no, without other explanations.")
    qwen25 = ("<|im_start|>system\nYou are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable "
              "of perceiving auditory and visual inputs, as well as generating text and speech.<|im_end|>\n"
              f"<|im_start|>user\n{question}<|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|><|im_end|>\n"
              "<|im_start|>assistant\n")
    qwen3 = (f"<|im_start|>user\n{question}<|audio_start|><|audio_pad|><|audio_pad|><|audio_end|><|im_end|>\n"
             "<|im_start|>assistant\n")  # no system turn
    assert judge_for(qwen_parts, "qwen2_5", "first_token").prompt("a dog barks", 2) == qwen25
    assert judge_for(qwen_parts, "qwen3", "last_yes_no").prompt("a dog barks", 2) == qwen3


def test_audio_token_count_matches_the_processors():
    frames = torch.arange(1, 3001)
    assert torch.equal(audio_token_count(frames), processing_qwen2_5_omni._get_feat_extract_output_lengths(frames))
    assert torch.equal(audio_token_count(frames, 100),
                       processing_qwen3_omni_moe._get_feat_extract_output_lengths(frames))


@pytest.mark.parametrize("kind", KINDS)
def test_judge_audio_placeholders_match_the_encoder(qwen_parts, kind):
    judge = judge_for(qwen_parts, kind, "first_token")
    audio = torch.randn(2, 20050) * 0.1  # 1.25 s at 16 kHz, not a whole number of 10 ms frames
    inputs = judge.inputs(audio, PROMPTS[:2])
    # Qwen2.5-Omni: the 2 s window (30 s in the real extractor), 126 frames of clip; Qwen3-Omni: the clip alone
    assert inputs["input_features"].shape[-1] == {"qwen2_5": 200, "qwen3": 125}[kind]
    frames = inputs["feature_attention_mask"].sum(-1)
    assert torch.equal(frames, torch.full((2,), {"qwen2_5": 126, "qwen3": 125}[kind]))
    placeholders = (inputs["input_ids"] == judge.model.config.audio_token_id).sum(-1)
    encoded = judge.model.model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
    assert torch.equal(placeholders, audio_token_count(frames, judge.chunk))
    assert placeholders.sum() == encoded.last_hidden_state.shape[0]
    assert inputs["attention_mask"][:, -1].all() and not inputs["attention_mask"][:, 0].all()  # left-padded


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule", RULES)
def test_judge_batch_equals_clip_by_clip_released_recipe(qwen_parts, kind, rule):
    judge = judge_for(qwen_parts, kind, rule, boosted=True)
    audio, sr = clips()
    scores = judge.score(audio, sr, PROMPTS)
    reference, _ = released_scores(judge, resample(audio, sr, SR), PROMPTS)
    assert scores.shape == (3,) and (scores - reference).abs().max() < 1e-5
    one_by_one = torch.cat([judge.score(audio[i:i + 1], sr, PROMPTS[i:i + 1]) for i in range(3)])
    assert (scores - one_by_one).abs().max() < 1e-5
    chunked = judge_for(qwen_parts, kind, rule, boosted=True, max_batch=2)
    assert (chunked.score(audio, sr, PROMPTS) - scores).abs().max() < 1e-5


def test_boosted_answers_exercise_the_released_rule(qwen_parts):
    """The answers the test above decodes: Qwen2.5-Omni says yes or no several times (the rules read different
    tokens), Qwen3-Omni's rows end at different steps (finished rows decode on in the batch)."""
    audio, sr = clips()
    audio_16k = resample(audio, sr, SR)
    first, last = (judge_for(qwen_parts, "qwen2_5", rule, boosted=True) for rule in RULES)
    _, answers = released_scores(last, audio_16k, PROMPTS)
    assert all(sum(token in (last.yes_id, last.no_id) for token in answer) > 1 for answer in answers)
    assert ((first.score(audio, sr, PROMPTS) - last.score(audio, sr, PROMPTS)).abs() > 1e-3).all()
    judge = judge_for(qwen_parts, "qwen3", "last_yes_no", boosted=True)
    _, answers = released_scores(judge, audio_16k, PROMPTS)
    assert len({len(answer) for answer in answers}) > 1 and all(answer[-1] == judge.eos_id for answer in answers)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule", RULES)
def test_judge_scores_zero_when_the_answer_has_no_yes_or_no(qwen_parts, kind, rule):
    judge = judge_for(qwen_parts, kind, rule)  # a random model never says yes or no
    audio, sr = clips()
    _, answers = released_scores(judge, resample(audio, sr, SR), PROMPTS)
    assert not any(token in (judge.yes_id, judge.no_id) for answer in answers for token in answer)
    assert torch.equal(judge.score(audio, sr, PROMPTS), torch.zeros(3))


@pytest.mark.parametrize("kind", KINDS)
def test_judge_loads_a_folder_in_the_published_format(qwen_parts, kind, tmp_path):
    expected = judge_for(qwen_parts, kind, "last_yes_no", boosted=True)
    write_published_folder(tmp_path, kind, expected.model, qwen_parts)
    settings = dataclasses.replace(KINDS[kind], repo="tiny/omni", rule="last_yes_no", max_new_tokens=6)
    loaded = QwenOmniJudge(settings, weights_dir=tmp_path, device="cpu")  # hub_files -> from_pretrained, as published
    assert type(loaded.model) is type(expected.model) and not hasattr(loaded.model, "talker")
    audio, sr = clips()
    assert torch.equal(loaded.inputs(audio, PROMPTS)["input_ids"], expected.inputs(audio, PROMPTS)["input_ids"])
    assert (loaded.score(audio, sr, PROMPTS) - expected.score(audio, sr, PROMPTS)).abs().max() < 1e-6


def test_judge_rejects_an_unknown_rule(qwen_parts):
    with pytest.raises(ValueError, match="rule must be"):
        judge_for(qwen_parts, "qwen3", "first_yes")


def test_judge_offline_with_nothing_cached_names_the_repository(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsMissing, match="https://huggingface.co/Qwen/Qwen3-Omni-30B-A3B-Instruct") as info:
        build_reward("aqa", device="cpu")
    assert "`hf download Qwen/Qwen3-Omni-30B-A3B-Instruct`" in str(info.value)
