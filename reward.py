"""Rewards for Flow-GRPO: score a batch of generated clips against their captions.

Every reward is an object with
    score(audio (B, S) float, sample_rate: int, prompts: list[str]) -> (B,) float32 tensor
and an attribute `sample_rate`, the rate its judge listens at (None: works at any rate). Audio is resampled to
that rate with data.resample. Higher is better.

    QwenOmniJudge          Resonate's training reward: an audio LLM asked whether the clip matches the caption
    ClapReward             cosine of CLAP text and audio embeddings
    LoudnessReward         signal-level rewards needing no download, for tests and CPU runs
    SpectralCentroidReward
    build_reward("loudness:1.0,clap:0.5")  -> WeightedSum of rewards from the REWARDS registry
"""

import inspect

import torch
import torch.nn.functional as F

from data import pick_device, resample


def prepare_audio(audio, sample_rate, target_rate, prompts) -> torch.Tensor:
    """Check a batch of clips against its prompts and resample it to `target_rate` (None: keep the rate).

    Args:
        audio: (B, S) float waveforms in [-1, 1].
        sample_rate: their rate in Hz.
        target_rate: the judge's rate in Hz, or None.
        prompts: B captions.
    Returns:
        (B, S') float32 tensor, detached, on audio's device.
    Raises:
        ValueError for a wrong shape, a non-float tensor, a bad rate or a prompt count that does not match.
    """
    if not torch.is_tensor(audio) or audio.ndim != 2 or not audio.is_floating_point():
        shape = tuple(audio.shape) if torch.is_tensor(audio) else type(audio).__name__
        raise ValueError(f"audio must be a (B, S) float tensor, got {shape}; squeeze a (B, 1, S) vocoder output")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer in Hz, got {sample_rate!r}")
    if isinstance(prompts, str) or len(prompts) != audio.shape[0]:
        raise ValueError(f"need one prompt per clip: {audio.shape[0]} clips, prompts={prompts!r:.80}")
    audio = audio.detach().float()
    if target_rate is not None and target_rate != sample_rate:
        audio = resample(audio, int(sample_rate), int(target_rate))
    return audio


class Reward:
    """Interface of every reward; subclasses set `sample_rate` and implement `score`."""
    sample_rate = None

    def score(self, audio, sample_rate, prompts) -> torch.Tensor:
        raise NotImplementedError

    def score_all(self, audio, sample_rate, prompts) -> dict:
        """{column: (B,) float32} of every figure this scorer computes (bench.py's columns); default: one, "score"."""
        return {"score": self.score(audio, sample_rate, prompts)}

    def __call__(self, audio, sample_rate, prompts):
        return self.score(audio, sample_rate, prompts)


# ---------------------------------------------------------------- signal-level rewards (no download)

class LoudnessReward(Reward):
    """Negative distance, in dB, of each clip's RMS level (dBFS, full scale = RMS 1.0) to `target_db`.

    A reward any generator can learn quickly, to check the RL loop on a CPU. Silence counts as -200 dBFS.
    """
    def __init__(self, target_db: float = -20.0):
        self.target_db = float(target_db)

    def score(self, audio, sample_rate, prompts):
        audio = prepare_audio(audio, sample_rate, None, prompts)
        rms = audio.pow(2).mean(-1).clamp_min(1e-20).sqrt()  # (B,)
        return -(20 * torch.log10(rms) - self.target_db).abs()


class SpectralCentroidReward(Reward):
    """Negative distance, in octaves, of each clip's spectral centroid to `target_hz`.

    Centroid = magnitude-weighted mean frequency of the Hann-windowed spectrum of the whole clip, in Hz.
    Octaves (log2 of the ratio) so that 500 Hz and 2 kHz are equally far from 1 kHz.
    """
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


# ---------------------------------------------------------------- CLAP

class ClapReward(Reward):
    """Cosine similarity of CLAP text and audio embeddings, at 48 kHz.

    Resonate's alternative reward uses the original LAION-CLAP checkpoint (HTSAT-base,
    `music_speech_audioset_epoch_15_esc_89.98.pt`, loaded with the laion_clap package). We use transformers'
    port of LAION's CLAP (`ClapModel`, default `laion/clap-htsat-unfused`), so scores are close to but not the
    released numbers. As released, the audio is quantised to int16 and back before embedding, and a clip longer
    than 10 s is cut by the feature extractor (randomly, depending on its truncation mode).

    Args:
        model_name_or_path: a transformers CLAP checkpoint.
        device, dtype: where and in what precision to run (default: best device, float32).
        model, processor: an already built ClapModel / ClapProcessor (tests), instead of loading.
    """
    sample_rate = 48000

    def __init__(self, model_name_or_path="laion/clap-htsat-unfused", device=None, dtype=None, *,
                 model=None, processor=None):
        from transformers import ClapModel, ClapProcessor
        self.model = model if model is not None else ClapModel.from_pretrained(model_name_or_path)
        self.processor = processor if processor is not None else ClapProcessor.from_pretrained(model_name_or_path)
        self.device = torch.device(device) if device is not None else pick_device()
        self.model.to(self.device, dtype=dtype or torch.float32).eval()

    @torch.no_grad()
    def score(self, audio, sample_rate, prompts):
        audio = prepare_audio(audio, sample_rate, self.sample_rate, prompts)
        # Round trip through int16 (truncating), as the LAION-CLAP reward in the released code does.
        waves = (audio.clamp(-1, 1) * 32767.0).to(torch.int16).float() / 32767.0
        # LAION-CLAP truncates captions to 77 tokens.
        text = self.processor.tokenizer(list(prompts), padding=True, truncation=True, max_length=77,
                                        return_tensors="pt").to(self.device)
        # The unfused checkpoint takes one mel channel: "fusion" truncation would stack four.
        truncation = "fusion" if self.model.config.audio_config.enable_fusion else "rand_trunc"
        sound = self.processor.feature_extractor([w.numpy() for w in waves.cpu()], sampling_rate=self.sample_rate,
                                                 truncation=truncation, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        text = self.model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        sound = self.model.get_audio_features(input_features=sound["input_features"].to(self.device, dtype),
                                              is_longer=sound["is_longer"].to(self.device))
        text, sound = (_pooled(text), _pooled(sound))  # (B, D) each
        return (F.normalize(text.float(), dim=-1) * F.normalize(sound.float(), dim=-1)).sum(-1).to(audio.device)


def _pooled(features):
    """transformers 4.x returns the projected embedding, 5.x an output whose pooler_output holds it."""
    return features if torch.is_tensor(features) else features.pooler_output


# ---------------------------------------------------------------- Qwen2.5-Omni judge

def yes_no_score(logits, yes_id: int, no_id: int) -> torch.Tensor:
    """p(Yes) / (p(Yes) + p(No)) from next-token logits, 0 where the greedy token is neither.

    The 0 is the released code's quirk: it reads the probabilities only when greedy decoding emits Yes or No.
    Args:
        logits: (B, V) next-token logits.
    Returns:
        (B,) float32 scores in [0, 1].
    """
    logits = logits.float()
    log_probs = logits.log_softmax(-1)
    score = torch.sigmoid(log_probs[:, yes_id] - log_probs[:, no_id])  # = p_yes / (p_yes + p_no)
    greedy = logits.argmax(-1)
    return torch.where((greedy == yes_id) | (greedy == no_id), score, torch.zeros_like(score))


def audio_token_count(mel_frames: torch.Tensor) -> torch.Tensor:
    """Audio tokens the Qwen2.5-Omni audio encoder emits for `mel_frames` 10 ms mel frames (two stride-2 stages)."""
    after_conv = (mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def _single_token_id(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the judge reads one token for {text!r}, but the tokenizer splits it into {ids}")
    return ids[0]


def _load_qwen_thinker(path, dtype):
    """The text-generating half (thinker) of Qwen2.5-Omni; the speech talker is not needed to judge."""
    from transformers import (AutoConfig, Qwen2_5OmniForConditionalGeneration,
                              Qwen2_5OmniThinkerForConditionalGeneration)
    dtype = dtype or "auto"  # the checkpoint's own precision (bf16), as released
    if AutoConfig.from_pretrained(path).model_type == "qwen2_5_omni":  # the published thinker + talker repo
        full = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=dtype, enable_audio_output=False)
        full.disable_talker()
        return full.thinker
    return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=dtype)


class QwenOmniJudge(Reward):
    """Resonate's LALM reward: ask Qwen2.5-Omni whether the clip contains the caption's sound events.

    As released (Resonate, arXiv 2603.11661): mono 16 kHz audio, the standard Qwen system prompt, a user turn of
    the question text followed by the audio, and reward = p(Yes) / (p(Yes) + p(No)) over the first generated
    token; 0 when the greedy first token is neither Yes nor No. The released code runs one `generate` per clip;
    here the whole batch goes through one forward pass (prompts left-padded, so every prompt ends in the last
    column, with an attention mask; positions restart at each prompt's first real token), which gives the same
    scores up to float rounding.

    Inputs are built from the tokenizer and the Whisper feature extractor rather than Qwen2_5OmniProcessor,
    which also needs the image stack (PIL, torchvision) that we do not depend on. `prompt` renders the
    Qwen2.5-Omni chat template's output for this conversation, and the audio placeholder is expanded to the
    encoder's token count as the processor does. Audio longer than 30 s is cut to 30 s by the feature extractor.

    Args:
        model_name_or_path: the Qwen2.5-Omni checkpoint (full thinker + talker repo, or a thinker-only one).
        device: where to run (default: best available); dtype: default = the checkpoint's (bf16).
        max_batch: clips per forward pass (None: the whole batch at once); lowers peak memory.
        model, tokenizer, feature_extractor: already built parts (tests), instead of loading.
    """
    sample_rate = 16000
    SYSTEM_PROMPT = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
                     "perceiving auditory and visual inputs, as well as generating text and speech.")
    QUESTION = ("Does this audio contain the sound events described by the text: {caption}? "
                "Please only answer yes or no, without other explanations.")
    AUDIO_TOKEN = "<|AUDIO|>"

    def __init__(self, model_name_or_path="Qwen/Qwen2.5-Omni-7B", device=None, dtype=None, max_batch=None, *,
                 model=None, tokenizer=None, feature_extractor=None):
        from transformers import AutoTokenizer, WhisperFeatureExtractor
        self.model = model if model is not None else _load_qwen_thinker(model_name_or_path, dtype)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        if feature_extractor is None:
            feature_extractor = WhisperFeatureExtractor.from_pretrained(model_name_or_path)
        self.tokenizer, self.feature_extractor = tokenizer, feature_extractor
        self.device = torch.device(device) if device is not None else pick_device()
        self.model.to(self.device).eval()
        if dtype is not None:
            self.model.to(dtype)
        self.max_batch = max_batch
        self.yes_id = _single_token_id(self.tokenizer, "Yes")
        self.no_id = _single_token_id(self.tokenizer, "No")
        if self.tokenizer.convert_tokens_to_ids(self.AUDIO_TOKEN) != self.model.config.audio_token_id:
            raise ValueError(f"tokenizer's {self.AUDIO_TOKEN} id differs from the model's audio_token_id")

    def prompt(self, caption: str, num_audio_tokens: int) -> str:
        """The chat text for one clip: system turn, user turn (question then audio), open assistant turn."""
        audio = "<|audio_bos|>" + self.AUDIO_TOKEN * num_audio_tokens + "<|audio_eos|>"
        return (f"<|im_start|>system\n{self.SYSTEM_PROMPT}<|im_end|>\n"
                f"<|im_start|>user\n{self.QUESTION.format(caption=caption)}{audio}<|im_end|>\n"
                f"<|im_start|>assistant\n")

    def inputs(self, audio, prompts) -> dict:
        """Model inputs for (B, S) 16 kHz clips: left-padded input_ids / attention_mask, log-mel
        input_features (B, mels, 3000) and feature_attention_mask (B, 3000), on the judge's device."""
        features = self.feature_extractor([w.numpy() for w in audio.cpu()], sampling_rate=self.sample_rate,
                                          padding="max_length", return_attention_mask=True, return_tensors="pt")
        num_tokens = audio_token_count(features["attention_mask"].sum(-1))  # (B,)
        texts = [self.prompt(p, int(n)) for p, n in zip(prompts, num_tokens)]
        text = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        return {"input_ids": text["input_ids"].to(self.device),
                "attention_mask": text["attention_mask"].to(self.device),
                "input_features": features["input_features"].to(self.device, dtype),
                "feature_attention_mask": features["attention_mask"].to(self.device)}

    @torch.no_grad()
    def next_token_logits(self, inputs) -> torch.Tensor:
        """(B, V) float32 logits of the first answer token."""
        if not inputs["attention_mask"][:, -1].all():
            raise ValueError("prompts must be left-padded so that each one ends in the last column")
        hidden = self.model.model(**inputs, use_cache=False).last_hidden_state[:, -1]  # (B, D)
        return self.model.lm_head(hidden).float()  # only the last position: the full (B, L, V) logits are large

    @torch.no_grad()
    def score(self, audio, sample_rate, prompts):
        audio = prepare_audio(audio, sample_rate, self.sample_rate, prompts)
        step = self.max_batch or audio.shape[0]
        scores = [yes_no_score(self.next_token_logits(self.inputs(audio[i:i + step], prompts[i:i + step])),
                               self.yes_id, self.no_id)
                  for i in range(0, audio.shape[0], step)]
        return torch.cat(scores).to(audio.device)


# ---------------------------------------------------------------- combining rewards

class WeightedSum(Reward):
    """sum_k weight_k * reward_k, the way Resonate combines several rewards.

    Args:
        terms: {name: (reward, weight)}.
    """
    def __init__(self, terms):
        if not terms:
            raise ValueError("WeightedSum needs at least one reward")
        self.terms = dict(terms)

    def score(self, audio, sample_rate, prompts, return_components=False):
        """(B,) weighted sum; with return_components, also {name: (B,) unweighted score} for logging."""
        components = {name: reward.score(audio, sample_rate, prompts).float().to(audio.device)
                      for name, (reward, _) in self.terms.items()}
        total = sum(weight * components[name] for name, (_, weight) in self.terms.items())
        return (total, components) if return_components else total


REWARDS = {
    "loudness": LoudnessReward,
    "centroid": SpectralCentroidReward,
    "clap": ClapReward,
    "qwen_omni": QwenOmniJudge,
    # the names the released configs use
    "clapscore": ClapReward,
    "qwen25_omni_semantic_align_score": QwenOmniJudge,
}


def _parse_spec(spec) -> dict:
    """'a:1.0,b' or {'a': 1.0, 'b': {'weight': 0.5, **kwargs}} -> {name: (weight, kwargs)}."""
    if isinstance(spec, str):
        terms = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, _, weight = item.partition(":")
            terms[name.strip()] = (float(weight) if weight else 1.0, {})
        return terms
    if isinstance(spec, dict):
        terms = {}
        for name, value in spec.items():
            if isinstance(value, dict):
                kwargs = dict(value)
                terms[name] = (float(kwargs.pop("weight", 1.0)), kwargs)
            else:
                terms[name] = (float(value), {})
        return terms
    raise ValueError(f"reward spec must be a string like 'loudness:1.0,clap:0.5' or a dict, got {spec!r}")


def build_reward(spec, device=None) -> WeightedSum:
    """Build a WeightedSum from a config spec, e.g. "loudness:1.0,clap:0.5", {"loudness": 1.0} or
    {"loudness": {"weight": 1.0, "target_db": -14}}. `device` goes to the rewards that run a model.

    Raises:
        ValueError for an unknown name (listing the known ones), an empty spec or a malformed weight.
    """
    terms = _parse_spec(spec)
    if not terms:
        raise ValueError(f"empty reward spec {spec!r}; known rewards: {', '.join(sorted(REWARDS))}")
    built = {}
    for name, (weight, kwargs) in terms.items():
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
        ctor = REWARDS[name]
        if device is not None and "device" in inspect.signature(ctor).parameters:
            kwargs.setdefault("device", device)
        built[name] = (ctor(**kwargs), weight)
    return WeightedSum(built)
