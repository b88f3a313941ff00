"""bench.py: settings (data.configure after the mode's defaults), the speed report's structure and FLOP counts (no
wall-clock assertions), and the TTA-Bench evaluation end to end with tiny random Audiobox Aesthetics, MS-CLAP and
Qwen3-Omni models loaded from published-format folders: files per id, resuming, rescoring a folder, skipped prompts,
metrics from the registry one at a time, friendly errors, and 2 processes giving the scores of one."""

import json
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import numpy as np
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor

import bench
import reward
import test_msclap  # the tiny metric builders of the metric tests
import test_reward
from conftest import FIXTURES, published_bigvgan_state

SETTINGS = {k: v for k, v in vars(bench).items() if not k.startswith("_") and isinstance(v, (int, float, str, dict))}
TINY = ["--size=tiny", "--vae=tiny", "--vocoder=griffin-lim", "--mel=16k", "--text_encoder=t5-tiny-random",
        "--duration=1.0", "--steps=2", "--repeats=1", "--probe_size=64", "--device=cpu"]


@pytest.fixture(autouse=True)
def restore_settings():
    threads = torch.get_num_threads()
    yield
    vars(bench).update(SETTINGS)
    torch.set_num_threads(threads)


def one_line_exit(argv):
    """The message of the SystemExit that bench.main(argv) ends in: one line, "error: ..."."""
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_configure_overrides_and_presets(tmp_path, capsys):
    bench.configure(["--duration=3", "--dtype=bf16", "--steps=10"])
    assert (bench.duration, bench.dtype, bench.steps) == (3.0, "bf16", 10) and isinstance(bench.duration, float)
    preset = tmp_path / "kw.py"  # a dict setting comes from a preset (or from Python)
    preset.write_text("metric_kwargs = {'loudness': {'target_db': -14.0}}\n")
    bench.configure([str(preset)])
    assert bench.metric_kwargs == {"loudness": {"target_db": -14.0}}
    for bad, named in ((["--nope=1"], "unknown setting --nope"), (["--steps=ten"], "--steps"),
                       (["duration=3"], "config file duration=3 does not exist"), (["--configure=1"], "unknown setting")):
        assert named in one_line_exit(bad)


@pytest.mark.parametrize("bad, named", [
    ("--dtype=int8", "--dtype"), ("--device=nonsense", "--device"), ("--mode=nope", "--mode"),
    ("--size=huge", "--size"), ("--vocoder=x", "--vocoder"), ("--parts=foo", "--parts"), ("--duration=0", "--duration"),
    ("--duration=-1", "--duration"), ("--threads=-1", "--threads"), ("--batch_size=0", "--batch_size"),
    ("--steps=0", "--steps"), ("--duration=100", "--duration must be at most 65.5 s"), ("--repeats=0", "--repeats"),
    ("--probe_size=0", "--probe_size"),
    ("--vocoder=bigvgan_v2_44khz_128band_512x", "--vocoder=bigvgan_v2_44khz_128band_512x does not take the 80 mel "
                                                "bins at hop 256 of --mel=16k; use --vocoder=griffin-lim")])
def test_bad_speed_settings_end_in_one_line(bad, named):
    assert one_line_exit([*TINY, bad]).startswith(f"error: {named}")


def test_speed_report_counts_both_cfg_branches(capsys):
    guided = bench.main(TINY + ["--threads=1"])
    parts = guided["parts"]
    assert set(parts) == {"text", "transformer", "vae", "vocoder"}
    assert parts["transformer"]["calls"] == 2 and all(p["flops"] > 0 for p in parts.values())
    assert "32 latent frames" in capsys.readouterr().out  # 1 s at 16 kHz, hop 256: ceil(62.5 / 2)
    # CFG runs the conditional and unconditional branches as one batch of two: twice the FLOPs of cfg = 1
    plain = bench.main(TINY + ["--cfg_strength=1.0", "--parts=transformer"])
    assert set(plain["parts"]) == {"transformer"}
    assert guided["parts"]["transformer"]["flops"] == 2 * plain["parts"]["transformer"]["flops"]


# -----------------------------------------------------------------------------
# --mode=eval: TTA-Bench generated and scored, on tiny published-format files with signal-level metrics

ROOT = Path(__file__).parent.parent
PROMPTS = ROOT / "tests" / "fixtures" / "tta_bench_3.json"  # prompt_0001 ... prompt_0003
IDS = ["prompt_0001", "prompt_0002", "prompt_0003"]
TINY_VOCODER = dict(num_mels=80, upsample_rates=[4, 4, 4, 4], upsample_kernel_sizes=[8, 8, 8, 8],
                    upsample_initial_channel=32, resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]],
                    resblock="1", activation="snakebeta", snake_logscale=True, use_tanh_at_final=False,
                    use_bias_at_final=False, sampling_rate=16000, hop_size=256)  # hop 256 = the 16k mel config


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Nothing may reach the network or the user's caches (subprocesses inherit this)."""
    monkeypatch.setenv("NANORESONATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """A folder laid out like the published repository with tiny files in the published formats (transformer,
    80-bin VAE, BigVGAN folder) and a 32-d BERT as the text encoder in its flan-t5-large sub-folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    from sample import PUBLISHED, VOCODER_DIR
    from transformer import MODELS, Resonate, minilm_path
    from vae import BigVGAN, MelVAE
    folder = tmp_path_factory.mktemp("weights")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder / "flan-t5-large")
    tokenizer.save_pretrained(folder / "flan-t5-large")
    net = Resonate(MODELS["tiny"](latent_dim=4, text_dim=32, text_c_dim=32, max_latent_len=64))
    with torch.no_grad():  # adaLN-Zero would make the velocity zero: give every weight a value
        for p in net.parameters():
            p.normal_(0, 0.05)
    net.set_empty_string(torch.randn(77, 32), torch.randn(32))
    torch.save(net.state_dict(), folder / PUBLISHED["grpo"])
    vae_net = MelVAE(data_dim=80, embed_dim=4, hidden_dim=16)
    vae_net.set_mel_stats(torch.full((80,), -4.0), torch.full((80,), 2.0))
    torch.save(vae_net.state_dict(), folder / PUBLISHED["vae"])
    (folder / VOCODER_DIR).mkdir()
    (folder / PUBLISHED["vocoder_config"]).write_text(json.dumps(TINY_VOCODER))
    torch.save({"generator": published_bigvgan_state(BigVGAN.from_config(TINY_VOCODER))}, folder / PUBLISHED["vocoder"])
    return folder


def eval_args(weights_dir, out, *more):
    return ["--mode=eval", f"--weights_dir={weights_dir}", f"--prompts={PROMPTS}", "--metrics=loudness,centroid",
            "--duration=1.0", "--steps=2", "--batch_size=2", "--device=cpu", f"--out_dir={out}", *more]


def run_eval(weights_dir, out, *more, metric_kwargs=None):
    """bench.main on fresh settings, as a new process would start (settings are module globals), with
    metric_kwargs set from Python as a preset would set them."""
    vars(bench).update(SETTINGS, metric_kwargs=metric_kwargs or {})
    return bench.main(eval_args(weights_dir, out, *more))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_eval_mode_sets_the_released_defaults_which_later_overrides_beat():
    bench.configure(["--duration=3", "--mode=eval"])
    assert (bench.duration, bench.batch_size, bench.seed, bench.dtype) == (3.0, 16, 42, "auto")  # --duration beats 10
    assert (bench.steps, bench.cfg_strength) == (25, 4.5)
    assert bench.dtype_name(torch.device("cpu")) == "fp32" and bench.dtype_name(torch.device("cuda")) == "bf16"
    assert bench.configure(["--steps=4"]) is None and bench.duration == 3.0  # no --mode: nothing reset


@pytest.fixture(scope="module")
def metric_kwargs(tmp_path_factory):
    """bench's metric_kwargs for tiny random versions of the paper's metrics, each from a folder in its published
    format, built as tests/test_reward.py and tests/test_msclap.py build them: Audiobox Aesthetics (checkpoint.pt of
    fixtures/aes_a.pt), MS-CLAP (CLAP_weights_2023.pth of fixtures/msclap_a.pt and a GPT-2 tokenizer) and a
    Qwen3-Omni thinker (its answers boosted to yes/no words, so AQAScore is not 0) with its tokenizer and feature
    extractor. Each loads through its scorer's published-weights path."""
    root = tmp_path_factory.mktemp("metrics")
    aes = torch.load(FIXTURES / "aes_a.pt", weights_only=True)
    (root / "aes").mkdir()
    torch.save({"state_dict": {"model." + k: v for k, v in aes["state_dict"].items()}, "model_cfg": aes["model_cfg"],
                "target_transform": aes["target_transform"]}, root / "aes" / "checkpoint.pt")
    clap = torch.load(FIXTURES / "msclap_a.pt", weights_only=True)
    (root / "clap").mkdir()
    torch.save({"model": clap["state_dict"]}, root / "clap" / "CLAP_weights_2023.pth")
    (root / "clap" / "config.json").write_text(test_msclap.gpt2_config(clap).to_json_string())
    test_msclap.write_gpt2_tokenizer(root / "clap", clap["eot_id"])
    backend = test_reward.tiny_qwen_backend()
    tokenizer = test_reward.tiny_qwen_tokenizer(backend)
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=2)  # a 2 s window
    (root / "aqa").mkdir()
    thinker = test_reward.boost_answers(test_reward.tiny_thinker("qwen3", tokenizer), tokenizer, ("yes", "no"))
    test_reward.write_published_folder(root / "aqa", "qwen3", thinker, (backend, tokenizer, features, None))
    return {"aes": {"weights_dir": str(root / "aes"), "wavlm_config": aes["wavlm_config"]},
            "clap": {"weights_dir": str(root / "clap"), "htsat": test_msclap.htsat_args(clap),
                     "d_proj": clap["clap_args"]["d_proj"]},
            "aqa": {"weights_dir": str(root / "aqa"), "max_new_tokens": 4}}  # short greedy answers: fast


def test_eval_end_to_end_with_the_papers_metrics(weights_dir, metric_kwargs, tmp_path, capsys):
    out, paper = tmp_path / "out", ["--metrics=aes,clap,aqa"]
    summary = run_eval(weights_dir, out, *paper, metric_kwargs=metric_kwargs)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i}.wav" for i in IDS] + [
        "generation.json", "scores.jsonl", "summary.json"])  # no temporary file left behind
    assert all(sf.info(out / f"{i}.wav").frames == 16000 and sf.info(out / f"{i}.wav").subtype == "PCM_16" for i in IDS)
    rows = read_jsonl(out / "scores.jsonl")
    columns = {"CE", "CU", "PC", "PQ", "clap", "aqa"}
    assert [r["id"] for r in rows] == IDS and all(set(r) == {"id", "prompt", *columns} for r in rows)
    assert all(-1 <= r["clap"] <= 1 and 0 <= r["aqa"] <= 1 for r in rows) and any(r["aqa"] > 0 for r in rows)
    assert len({r["PQ"] for r in rows}) == 3  # three prompts, three noises
    audio = torch.stack([torch.from_numpy(sf.read(out / f"{i}.wav", dtype="float32")[0]) for i in IDS])  # (3, S)
    captions = [r["prompt"] for r in rows]
    for name, key, column in (("aes", "CE", "CE"), ("clap", "score", "clap"), ("aqa", "score", "aqa")):
        direct = reward.REWARDS[name](**metric_kwargs[name], device="cpu").score_all(audio, 16000, captions)
        assert [r[column] for r in rows] == pytest.approx(direct[key].tolist(), abs=1e-5)  # the scorer on the files
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary and summary["scored"] == 3 and summary["skipped"] == {}
    assert summary["means"] == {c: pytest.approx(sum(r[c] for r in rows) / 3, abs=1e-12) for c in columns}
    printed, m = capsys.readouterr().out, summary["means"]
    assert "| system | PQ | CU | CLAPScore | AQAScore | CE | PC |" in printed
    ours = " | ".join(f"{m[c]:.3f}" for c in ("PQ", "CU", "clap", "aqa", "CE", "PC"))
    assert (f"| this run: published grpo, 3 clips | {ours} |\n"
            "| Resonate-GRPO (paper) | 6.064 | 5.328 | 0.476 | 0.737 |  |  |") in printed
    # a rerun generates nothing and rewrites no clip
    stamps = {i: (out / f"{i}.wav").stat().st_mtime_ns for i in IDS}
    assert run_eval(weights_dir, out, *paper, metric_kwargs=metric_kwargs) == summary
    assert "3 of 3 clips are in" in capsys.readouterr().out
    assert {i: (out / f"{i}.wav").stat().st_mtime_ns for i in IDS} == stamps
    # the folder scored as another system's: the same scores, nothing generated
    again = run_eval(weights_dir, tmp_path / "rescored", *paper, f"--audio_dir={out}", metric_kwargs=metric_kwargs)
    assert read_jsonl(tmp_path / "rescored" / "scores.jsonl") == rows and again["means"] == summary["means"]
    assert not list((tmp_path / "rescored").glob("*.wav"))


def test_eval_regenerates_a_lost_clip_alone_and_refuses_other_settings(weights_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_eval(weights_dir, out)
    log = capsys.readouterr().out
    assert "0 of 3 clips are in" in log and "generating 3" in log
    # a lost clip is regenerated alone (a batch of one instead of two) with the same audio: noise is per id
    before, _ = sf.read(out / "prompt_0002.wav", dtype="int16")
    (out / "prompt_0002.wav").unlink()
    run_eval(weights_dir, out)
    assert "2 of 3 clips are in" in capsys.readouterr().out
    assert abs(sf.read(out / "prompt_0002.wav", dtype="int16")[0].astype(int) - before).max() <= 1
    # resuming with settings that change the audio is refused
    with pytest.raises(SystemExit, match=r"steps=2 \(now 3\)"):
        run_eval(weights_dir, out, "--steps=3")
    # a first run that failed before any clip left only its record: the corrected command is not refused
    for clip in out.glob("*.wav"):
        clip.unlink()
    assert run_eval(weights_dir, out, "--steps=3")["scored"] == 3


def test_empty_or_nonfinite_clips_are_skipped_with_their_reason(weights_dir, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    sf.write(clips / "prompt_0001.wav", np.zeros(0, dtype="float32"), 16000)
    sf.write(clips / "prompt_0002.wav", np.full(16000, np.nan, dtype="float32"), 16000, subtype="FLOAT")
    sf.write(clips / "prompt_0003.wav", np.full(16000, 0.1, dtype="float32"), 16000)
    summary = run_eval(weights_dir, tmp_path / "out", f"--audio_dir={clips}")
    assert summary["scored"] == 1 and summary["skipped"] == {"prompt_0001": f"prompt_0001.wav in {clips}: empty",
                                                             "prompt_0002": f"prompt_0002.wav in {clips}: NaN or inf samples"}


def test_unusable_prompts_are_skipped_and_recorded(weights_dir, tmp_path):
    prompts = tmp_path / "bench.json"
    prompts.write_text(json.dumps([{"id": "p1", "prompt_text": "a dog barks"}, {"id": "p2", "prompt_text": "  "},
                                   {"id": "p3", "prompt_text": 2325}, {"id": "p4", "prompt_text": "rain"},
                                   {"id": "p5", "prompt_text": "thunder"}]))
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipped 2 entries"):  # data.read_prompts says so; bench records them
        summary = run_eval(weights_dir, out, f"--prompts={prompts}", "--limit=3", "--metrics=loudness")
    assert [r["id"] for r in read_jsonl(out / "scores.jsonl")] == ["p1"]  # p4 and p5 are past --limit
    assert summary["skipped"] == {"p2": "empty, null or non-text prompt_text", "p3": "empty, null or non-text prompt_text"}
    assert summary["scored"] == 1
    assert sorted(p.name for p in out.glob("*.wav")) == ["p1.wav"]
    # scoring a folder that lacks a clip, or holds a broken one, records those ids and scores the rest
    (out / "p5.wav").write_bytes(b"not a wav")
    with pytest.warns(UserWarning, match="skipped 2 entries"):
        rescored = run_eval(weights_dir, tmp_path / "r", f"--prompts={prompts}", f"--audio_dir={out}",
                            "--metrics=loudness")
    assert sorted(rescored["skipped"]) == ["p2", "p3", "p4", "p5"] and rescored["scored"] == 1
    vars(bench).update(SETTINGS)
    for ids in (["p1", "p1"], ["p1", "../p2"]):  # ids name the clips' files
        prompts.write_text(json.dumps([{"id": i, "prompt_text": "rain"} for i in ids]))
        assert "ids must be unique file names" in one_line_exit(eval_args(weights_dir, out, f"--prompts={prompts}"))


class LevelAndPeak(reward.Reward):
    """A scorer with several columns (as Audiobox Aesthetics has) around a "model", standing in for the real ones."""
    built_on = []

    def __init__(self, device=None, model=None):
        self.model = model
        LevelAndPeak.built_on.append(device)

    def score_all(self, audio, sample_rate, prompts, ids=None):
        audio = reward.prepare_audio(audio, sample_rate, None, prompts)
        return {"PQ": self.model(audio.pow(2).mean(-1).sqrt()), "peak": audio.abs().amax(-1)}


def test_metrics_come_from_the_registry_with_their_columns_and_kwargs(weights_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(reward.REWARDS, "levels", LevelAndPeak)  # a registry entry, as the real scorers have
    monkeypatch.setattr(LevelAndPeak, "built_on", [])
    vars(bench).update(SETTINGS)
    bench.metric_kwargs = {"levels": {"model": lambda level: 2 * level}}  # from Python: built models too
    summary = bench.main(eval_args(weights_dir, tmp_path / "out", "--metrics=levels,loudness"))
    rows = read_jsonl(tmp_path / "out" / "scores.jsonl")
    assert set(rows[0]) == {"id", "prompt", "PQ", "peak", "loudness"} and LevelAndPeak.built_on == [torch.device("cpu")]
    for row, pid in zip(rows, IDS):
        level = float((sf.read(tmp_path / "out" / f"{pid}.wav")[0] ** 2).mean() ** 0.5)
        assert row["PQ"] == pytest.approx(2 * level, rel=1e-5)  # the injected model ran
        assert row["loudness"] == pytest.approx(-abs(20 * math.log10(level) + 20), abs=1e-3)
    assert summary["means"]["PQ"] == pytest.approx(sum(r["PQ"] for r in rows) / 3)
    table = bench.results_table(summary["means"], "ours")
    assert f"| ours | {summary['means']['PQ']:.3f} | - | - | - | {summary['means']['peak']:.3f} |" in table


class OneAtATime(reward.Reward):
    """Refuses to be built while another instance is alive: the metrics must be freed one after another."""
    alive = weakref.WeakSet()

    def __init__(self):
        assert not OneAtATime.alive, "the previous metric is still in memory"
        OneAtATime.alive.add(self)

    def score(self, audio, sample_rate, prompts):
        return torch.zeros(len(prompts))


def test_each_metric_is_freed_before_the_next_is_built(weights_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(reward.REWARDS, "first", OneAtATime)
    monkeypatch.setitem(reward.REWARDS, "second", OneAtATime)
    summary = run_eval(weights_dir, tmp_path / "out", "--metrics=first,second")
    assert summary["means"] == {"first": 0.0, "second": 0.0} and not OneAtATime.alive


@pytest.mark.parametrize("bad, named", [
    ("--metrics=loudness,nope", "--metrics"), ("--metrics=loudness,loudness", "--metrics"),
    ("{preset}", "--metric_kwargs"), ("--prompts=missing.json", "--prompts"), ("--prompts={file}", "--prompts"),
    ("--duration=0", "--duration"), ("--duration=-1.0", "--duration"), ("--batch_size=0", "--batch_size"),
    ("--limit=-1", "--limit"), ("--score_batch_size=0", "--score_batch_size"), ("--weights=sft", "--weights"),
    ("--ckpt=missing.pt", "--ckpt"), ("--audio_dir=missing", "--audio_dir"), ("--out_dir={file}/sub", "--out_dir")])
def test_bad_eval_settings_stop_before_any_work_with_one_line(bad, named, weights_dir, tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "kw.py").write_text("metric_kwargs = {'clap': {}}\n")  # clap is not among --metrics
    out = tmp_path / "out"
    vars(bench).update(SETTINGS)
    bad = bad.replace("{file}", str(tmp_path / "file")).replace("{preset}", str(tmp_path / "kw.py"))
    assert one_line_exit(eval_args(weights_dir, out, bad)).startswith(f"error: {named}")
    assert not list(tmp_path.rglob("*.wav"))


def test_a_bad_setting_on_the_command_line_prints_one_line_and_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--mode=eval", "--metrics=nope"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 1 and run.stderr.startswith("error: --metrics") and run.stderr.count("\n") == 1


def test_a_failed_clip_write_leaves_no_file(tmp_path):
    """Resuming trusts that a clip on disk is whole: sample.write_wav writes it atomically."""
    from sample import write_wav
    with pytest.raises(AttributeError):
        write_wav(str(tmp_path / "x.wav"), "not audio", 16000)
    assert list(tmp_path.iterdir()) == []


def test_per_prompt_generators_make_audio_independent_of_batching(weights_dir):
    from data import seeded_generator
    from sample import generate, load_pipeline
    pipe = load_pipeline(weights_dir=weights_dir, device="cpu")
    captions, ids = ["a dog barks", "thunder", "rain"], ["a", "b", "c"]
    kw = dict(duration=1.0, steps=2, progress=False)
    together, _ = generate(captions, pipe, seed=[seeded_generator(42, i) for i in ids], batch_size=3, **kw)
    alone, _ = generate(captions[1:2], pipe, seed=[seeded_generator(42, "b")], **kw)
    torch.testing.assert_close(alone[0], together[1], atol=1e-5, rtol=0)
    assert not torch.allclose(together[0], together[1])
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(captions, pipe, seed=[1, 2], **kw)


def test_two_processes_give_the_scores_of_one(weights_dir, tmp_path):
    run_eval(weights_dir, tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "bench.py"),
           *eval_args(weights_dir, tmp_path / "two")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 process(es)" in run.stdout and run.stdout.count("wrote ") == 1  # rank 0 alone writes and prints
    one, two = read_jsonl(tmp_path / "one" / "scores.jsonl"), read_jsonl(tmp_path / "two" / "scores.jsonl")
    assert [r["id"] for r in two] == IDS and all(set(a) == set(b) for a, b in zip(one, two))
    for a, b in zip(one, two):  # rank 0 ran prompts 1 and 3 as a batch, rank 1 prompt 2: only float rounding differs
        assert {k: v for k, v in b.items() if k in ("loudness", "centroid")} == pytest.approx(
            {k: v for k, v in a.items() if k in ("loudness", "centroid")}, abs=1e-4)
