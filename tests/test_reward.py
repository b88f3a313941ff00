"""Rewards: signal-level orderings, a tiny random CLAP, a tiny random Qwen2.5-Omni thinker, the registry.

Nothing is downloaded. The Qwen judge is tested with a randomly initialised thinker (1-2 layers, tiny audio
encoder) and a small byte-level BPE tokenizer trained here on the judge's own prompt text, carrying the Qwen
special tokens; the real tokenizer, weights and chat template are not available offline.
"""

import copy
import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, PreTrainedTokenizerFast,
                          Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration,
                          WhisperFeatureExtractor)
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

import data
from data import resample
from reward import (AES_AXES, AES_WAVLM, REWARDS, AesModel, AudioboxAesthetics, ClapReward, LoudnessReward,
                    QwenOmniJudge, SpectralCentroidReward, WeightedSum, aes_key, audio_token_count, build_reward,
                    yes_no_score)

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
    parts = reward.score_all(audio, SR, ["a", "b"])
    total = parts.pop("score")
    assert set(parts) == {"loudness", "centroid"} and torch.equal(total, reward.score(audio, SR, ["a", "b"]))
    assert torch.allclose(total, parts["loudness"] + 0.5 * parts["centroid"])
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
    assert {"qwen_omni", "clap", "loudness", "centroid"} <= set(REWARDS)


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
    assert ours == {aes_key(k): shape for k, shape in manifest["shapes"].items()}
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


# ---------------------------------------------------------------- Qwen2.5-Omni judge (tiny, random)

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
                "<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>"]


def tiny_qwen_tokenizer():
    """Byte-level BPE like Qwen's, trained on the judge's prompt text; Yes and No are single tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=QWEN_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([QwenOmniJudge.SYSTEM_PROMPT, QwenOmniJudge.QUESTION] + PROMPTS, trainer)
    backend.add_tokens(["Yes", "No"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def tiny_thinker(tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          d_model=16, output_dim=32),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        audio_token_index=ids("<|AUDIO|>"), image_token_index=ids("<|IMAGE|>"), video_token_index=ids("<|VIDEO|>"),
        audio_start_token_id=ids("<|audio_bos|>"), audio_end_token_id=ids("<|audio_eos|>"),
        vision_start_token_id=ids("<|vision_bos|>"))
    torch.manual_seed(0)
    return Qwen2_5OmniThinkerForConditionalGeneration(config)


@pytest.fixture(scope="module")
def judges():
    """(plain judge, judge whose Yes/No output rows are boosted so the greedy answer is Yes or No)."""
    tokenizer = tiny_qwen_tokenizer()
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=SR, chunk_length=2)  # pads to 2 s
    model = tiny_thinker(tokenizer)
    plain = QwenOmniJudge(model=model, tokenizer=tokenizer, feature_extractor=features, device="cpu")
    boosted_model = copy.deepcopy(model)
    with torch.no_grad():
        # Opposite rows: whichever side of the hyperplane the last hidden state falls on, Yes or No wins.
        row = torch.randn(boosted_model.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(1))
        boosted_model.lm_head.weight[plain.yes_id] = 0.5 * row
        boosted_model.lm_head.weight[plain.no_id] = -0.5 * row
    boosted = QwenOmniJudge(model=boosted_model, tokenizer=tokenizer, feature_extractor=features, device="cpu")
    return plain, boosted


def released_style_scores(judge, audio_16k, prompts):
    """The released recipe, clip by clip: greedy `generate` of one token, then p(Yes)/(p(Yes)+p(No)) from its
    scores if that token is Yes or No, else 0."""
    out = []
    for i in range(len(prompts)):
        inputs = judge.inputs(audio_16k[i:i + 1], prompts[i:i + 1])
        gen = judge.model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                   output_scores=True)
        token = gen.sequences[0, -1].item()
        log_probs = gen.scores[0][0].float().log_softmax(-1)
        p = torch.sigmoid(log_probs[judge.yes_id] - log_probs[judge.no_id]).item()
        out.append(p if token in (judge.yes_id, judge.no_id) else 0.0)
    return torch.tensor(out)


def test_judge_prompt_is_system_then_question_then_audio(judges):
    judge = judges[0]
    expected = ("<|im_start|>system\nYou are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, "
                "capable of perceiving auditory and visual inputs, as well as generating text and speech.<|im_end|>\n"
                "<|im_start|>user\nDoes this audio contain the sound events described by the text: a dog barks? "
                "Please only answer yes or no, without other explanations."
                "<|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|><|im_end|>\n<|im_start|>assistant\n")
    assert judge.prompt("a dog barks", 2) == expected


def test_judge_audio_placeholders_match_the_encoder(judges):
    judge = judges[0]
    audio = torch.randn(2, 12000) * 0.1  # 0.75 s at 16 kHz -> 75 mel frames
    inputs = judge.inputs(audio, PROMPTS[:2])
    frames = inputs["feature_attention_mask"].sum(-1)
    assert torch.equal(audio_token_count(frames), _get_feat_extract_output_lengths(frames))  # the processor's count
    placeholders = (inputs["input_ids"] == judge.model.config.audio_token_id).sum(-1)
    encoded = judge.model.model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
    assert torch.equal(placeholders, audio_token_count(frames)) and placeholders.sum() == encoded.last_hidden_state.shape[0]
    assert inputs["attention_mask"][:, -1].all() and not inputs["attention_mask"][:, 0].all()  # left-padded


def test_judge_batch_equals_clip_by_clip_released_recipe(judges):
    _, judge = judges
    audio = torch.randn(3, 22050, generator=torch.Generator().manual_seed(0)) * 0.1  # 1 s at 22.05 kHz
    scores = judge.score(audio, 22050, PROMPTS)
    assert scores.shape == (3,) and ((scores > 0) & (scores < 1)).all()
    reference = released_style_scores(judge, resample(audio, 22050, SR), PROMPTS)
    assert (scores - reference).abs().max() < 1e-5
    one_by_one = torch.cat([judge.score(audio[i:i + 1], 22050, PROMPTS[i:i + 1]) for i in range(3)])
    assert (scores - one_by_one).abs().max() < 1e-5
    chunked = QwenOmniJudge(model=judge.model, tokenizer=judge.tokenizer, feature_extractor=judge.feature_extractor,
                            device="cpu", max_batch=2)
    assert (chunked.score(audio, 22050, PROMPTS) - scores).abs().max() < 1e-5


def test_judge_scores_zero_when_greedy_token_is_neither(judges):
    judge = judges[0]  # a random model never picks Yes or No first
    audio = torch.randn(2, SR // 2, generator=torch.Generator().manual_seed(2)) * 0.1
    reference = released_style_scores(judge, audio, PROMPTS[:2])
    assert torch.equal(reference, torch.zeros(2))
    assert torch.equal(judge.score(audio, SR, PROMPTS[:2]), torch.zeros(2))


def test_yes_no_score_quirk():
    logits = torch.full((3, 6), -5.0)
    yes, no = 1, 4
    logits[0, [yes, no]] = torch.tensor([2.0, 1.0])  # greedy Yes
    logits[1, [yes, no]] = torch.tensor([0.0, 3.0])  # greedy No
    logits[2, [yes, no, 0]] = torch.tensor([2.0, 1.0, 4.0])  # greedy neither: released scores 0
    scores = yes_no_score(logits, yes, no)
    assert torch.allclose(scores[:2], torch.tensor([math.e / (math.e + 1), 1 / (1 + math.e ** 3)]))
    assert scores[2] == 0
