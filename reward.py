"""Rewards for Flow-GRPO: score a batch of generated clips against their captions.

Every reward is an object with
    score(audio (B, S) float, sample_rate: int, prompts: list[str]) -> (B,) float32 tensor
and an attribute `sample_rate`, the rate its judge listens at (None: works at any rate). Audio is resampled to
that rate with data.resample. Higher is better.

    QwenOmniJudge          an audio LLM asked whether the clip matches the caption: Resonate's training reward
                           (Qwen2.5-Omni) and AQAScore, the evaluation metric (Qwen3-Omni), by JudgeSettings
    ClapReward             cosine of CLAP text and audio embeddings
    LoudnessReward         signal-level rewards needing no download, for tests and CPU runs
    SpectralCentroidReward
    build_reward("loudness:1.0,clap:0.5")  -> WeightedSum of rewards from the REWARDS registry
"""

import dataclasses
import functools
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from data import WeightsMissing, hub_files, pick_device, resample


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


# ---------------------------------------------------------------- Qwen-Omni judges: the LALM reward and AQAScore

@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    """How QwenOmniJudge asks its model and reads the answer.

    repo: the Hugging Face repository (thinker + talker; only the thinker is built).
    system_prompt: the system turn's text, or None for no system turn.
    yes, no: the answer words, one token each.
    audio_tokens: (start, placeholder, end) special tokens around the clip.
    whole_clip: log-mel of the whole clip, unpadded, as Qwen3-Omni's processor computes it; False: padded or cut
        to Whisper's 30 s window, as Qwen2.5-Omni's.
    rule: "first_token" or "last_yes_no" (see QwenOmniJudge); max_new_tokens: the greedy answer's length cap.
    """
    repo: str
    system_prompt: str | None
    yes: str
    no: str
    audio_tokens: tuple[str, str, str]
    whole_clip: bool
    rule: str
    max_new_tokens: int = 1024  # the cap the Omni generate() gives the thinker in the released runs


QWEN25_OMNI = JudgeSettings(  # Resonate's training reward
    repo="Qwen/Qwen2.5-Omni-7B",
    system_prompt=("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
                   "auditory and visual inputs, as well as generating text and speech."),
    yes="Yes", no="No", audio_tokens=("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"), whole_clip=False,
    rule="first_token")
AQA_QWEN3_OMNI = JudgeSettings(  # AQAScore, the TTA-Bench evaluation metric
    repo="Qwen/Qwen3-Omni-30B-A3B-Instruct", system_prompt=None, yes="yes", no="no",
    audio_tokens=("<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"), whole_clip=True, rule="last_yes_no")

# what from_pretrained reads besides the weight shards the index lists
JUDGE_FILES = ["config.json", "model.safetensors.index.json", "preprocessor_config.json", "tokenizer_config.json",
               "vocab.json", "merges.txt"]


def audio_token_count(mel_frames, chunk=None):
    """Audio tokens the Omni audio encoder emits for `mel_frames` 10 ms mel frames (int or (B,) tensor), as the
    processors count them. chunk=None: Qwen2.5-Omni, a stride-2 convolution then a stride-2 pooling over the clip.
    chunk=2 * n_window (Qwen3-Omni: 100 frames): the clip is cut into chunks, each halved three times by stride-2
    convolutions (100 frames -> 13 tokens)."""
    def halve(n, times=1):
        for _ in range(times):
            n = (n - 1) // 2 + 1  # kernel 3, padding 1; halve(0) == 0
        return n
    if chunk is None:
        return (halve(mel_frames) - 2) // 2 + 1
    return mel_frames // chunk * halve(chunk, 3) + halve(mel_frames % chunk, 3)


def judge_folder(repo, weights_dir=None) -> Path:
    """The folder holding the judge's files: `weights_dir` when it has them, else the Hugging Face cache, where the
    config, tokenizer, feature extractor and every weight shard (talker ones too: from_pretrained reads the whole
    index) are downloaded. Raises data.WeightsMissing naming the repository, ValueError for a partial weights_dir."""
    try:
        paths = hub_files(repo, JUDGE_FILES, weights_dir)
        shards = json.loads(paths["model.safetensors.index.json"].read_text())["weight_map"].values()
        paths.update(hub_files(repo, sorted(set(shards)), weights_dir))
    except WeightsMissing:
        raise WeightsMissing(f"the judge https://huggingface.co/{repo} is not on this machine and could not be "
                             f"downloaded: fetch it where you have access (`hf download {repo}`) and pass that folder "
                             f"as weights_dir, or run the command here to fill the Hugging Face cache (HF_TOKEN for "
                             f"gated copies, HF_ENDPOINT for a mirror)") from None
    folders = {p.parent for p in paths.values()}
    if len(folders) > 1:
        raise ValueError(f"{weights_dir} holds only some of {repo}'s files; put all of them there, or none")
    return folders.pop()


def _load_thinker(folder, dtype):
    """The thinker (text half) of the Qwen2.5-Omni or Qwen3-Omni checkpoint in `folder`: transformers maps the full
    repository's thinker.* weights onto it and skips the talker's."""
    import transformers
    thinkers = {"qwen2_5_omni": "Qwen2_5OmniThinkerForConditionalGeneration",
                "qwen3_omni_moe": "Qwen3OmniMoeThinkerForConditionalGeneration"}
    family = json.loads((folder / "config.json").read_text())["model_type"].removesuffix("_thinker")
    if family not in thinkers:
        raise ValueError(f"{folder} holds a {family!r} model; the judge runs {' or '.join(thinkers)} checkpoints")
    # dtype "auto": the checkpoint's own precision (bf16), as released
    return getattr(transformers, thinkers[family]).from_pretrained(folder, dtype=dtype or "auto")


def _single_token_id(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the judge reads one token for {text!r}, but the tokenizer splits it into {ids}")
    return ids[0]


class QwenOmniJudge(Reward):
    """Ask a Qwen-Omni thinker whether the clip contains the caption's sound events (Resonate, arXiv 2603.11661;
    released flow_grpo/rewards.py). QWEN25_OMNI is the training reward, AQA_QWEN3_OMNI the AQAScore metric.

    Both: mono 16 kHz audio; user turn = the question, then the clip; greedy answer; score = p(yes) / (p(yes) + p(no))
    at one answer token, 0 when the token the rule reads is neither word exactly (the released quirk: with
    Qwen3-Omni's lowercase words a "Yes" answer scores 0).
    Rules. "last_yes_no" is the released one: both released functions ask generate() for one new token, but the Omni
    generate() replaces that with its own thinker_max_new_tokens=1024, so they decode the answer to <|im_end|> and
    read the last answer token that is yes or no; so do we, at most max_new_tokens. "first_token" reads the first
    answer token only: one forward pass, no decoding. They agree when the first token is the answer's only yes or
    no (the usual "yes" / "Yes."); they differ when the answer starts otherwise (first_token scores 0) or says yes
    or no again later (the released rule reads the last). QWEN25_OMNI takes first_token, the cheap training reward.
    Batching: the released code scores one clip at a time; here a batch runs together, prompts left-padded with an
    attention mask, every row decoded in step; the same scores up to float rounding.
    Inputs come from the tokenizer and the Whisper feature extractor, not the Omni processors, which also need the
    image and video stack (PIL, torchvision; still so in transformers 5.24).

    Args:
        settings: a JudgeSettings; keyword overrides replace its fields (rule="last_yes_no", max_new_tokens=32).
        weights_dir: a folder with the repository's files (default: the Hugging Face cache, downloading).
        device: default the best available; dtype: default the checkpoint's (bf16).
        max_batch: clips per pass (None: the whole batch at once); lowers peak memory.
        model, tokenizer, feature_extractor: already built parts (tests), instead of loading.
    Raises:
        data.WeightsMissing when the repository is neither in weights_dir nor cached and cannot be downloaded;
        ValueError for an unknown rule, max_new_tokens < 1 or a tokenizer that does not fit the model.
    """
    sample_rate = 16000
    QUESTION = ("Does this audio contain the sound events described by the text: {caption}? "
                "Please only answer yes or no, without other explanations.")

    def __init__(self, settings=QWEN25_OMNI, weights_dir=None, device=None, dtype=None, max_batch=None, *,
                 model=None, tokenizer=None, feature_extractor=None, **overrides):
        from transformers import AutoTokenizer, WhisperFeatureExtractor
        self.settings = s = dataclasses.replace(settings, **overrides)
        if s.rule not in ("first_token", "last_yes_no") or s.max_new_tokens < 1:
            raise ValueError(f"rule must be 'first_token' or 'last_yes_no' and max_new_tokens at least 1, got "
                             f"{s.rule!r} and {s.max_new_tokens}")
        if model is None or tokenizer is None or feature_extractor is None:
            folder = judge_folder(s.repo, weights_dir)
        self.model = model if model is not None else _load_thinker(folder, dtype)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(folder)
        self.feature_extractor = (feature_extractor if feature_extractor is not None
                                  else WhisperFeatureExtractor.from_pretrained(folder))
        self.device = torch.device(device) if device is not None else pick_device()
        self.model.to(self.device).eval()
        if dtype is not None:
            self.model.to(dtype)
        self.max_batch = max_batch
        self.yes_id, self.no_id = (_single_token_id(self.tokenizer, w) for w in (s.yes, s.no))
        self.eos_id = _single_token_id(self.tokenizer, "<|im_end|>")
        if self.tokenizer.convert_tokens_to_ids(s.audio_tokens[1]) != self.model.config.audio_token_id:
            raise ValueError(f"tokenizer's {s.audio_tokens[1]} id differs from the model's audio_token_id")
        audio_config = self.model.config.audio_config  # Qwen3-Omni's encoder reads 2 * n_window-frame chunks
        self.chunk = 2 * audio_config.n_window if audio_config.model_type.startswith("qwen3") else None

    def prompt(self, caption: str, num_audio_tokens: int) -> str:
        """The chat text for one clip, as the model's chat template renders the released conversation:
        [system turn,] user turn (question then audio), open assistant turn."""
        start, pad, end = self.settings.audio_tokens
        system = self.settings.system_prompt
        system = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
        return (f"{system}<|im_start|>user\n{self.QUESTION.format(caption=caption)}{start}{pad * num_audio_tokens}"
                f"{end}<|im_end|>\n<|im_start|>assistant\n")

    def inputs(self, audio, prompts) -> dict:
        """Model inputs for (B, S) 16 kHz clips: left-padded input_ids / attention_mask (B, L), log-mel
        input_features (B, mels, T) and feature_attention_mask (B, T), on the judge's device. The audio placeholder
        is expanded to the encoder's token count, as the processor does."""
        pad = dict(padding="longest", truncation=False) if self.settings.whole_clip else dict(padding="max_length")
        features = self.feature_extractor([w.numpy() for w in audio.cpu()], sampling_rate=self.sample_rate,
                                          return_attention_mask=True, return_tensors="pt", **pad)
        num_tokens = audio_token_count(features["attention_mask"].sum(-1), self.chunk)  # (B,)
        texts = [self.prompt(p, int(n)) for p, n in zip(prompts, num_tokens)]
        text = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        return {"input_ids": text["input_ids"].to(self.device),
                "attention_mask": text["attention_mask"].to(self.device),
                "input_features": features["input_features"].to(self.device, dtype),
                "feature_attention_mask": features["attention_mask"].to(self.device)}

    @torch.no_grad()
    def yes_no_scores(self, inputs) -> torch.Tensor:
        """(B,) float32 p(yes) / (p(yes) + p(no)) at the greedy answer token the rule reads, 0 where it is neither
        word. All rows decode together; a row that has emitted <|im_end|> is fed on but no longer counts."""
        if not inputs["attention_mask"][:, -1].all():
            raise ValueError("prompts must be left-padded so that each one ends in the last column")
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
    "qwen_omni": QwenOmniJudge,  # Qwen2.5-Omni-7B, the training reward
    "aqa": functools.partial(QwenOmniJudge, AQA_QWEN3_OMNI),  # AQAScore: Qwen3-Omni-30B-A3B-Instruct
    # the names the released configs use
    "clapscore": ClapReward,
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
