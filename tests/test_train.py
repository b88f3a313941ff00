"""train.py: a run stopped and resumed equals an uninterrupted one; 2-process DDP equals one process with the
doubled batch; checkpoints are written atomically; bad settings are refused with a clear message."""
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(ROOT, 'tests', 'fixtures', 'audio', 'manifest.jsonl')  # 2 good train clips, 4 bad, 1 val
TINY = ['--mel=16k', '--vae=tiny', '--model=tiny', '--text_encoder=minilm', '--clip_seconds=0.5', '--device=cpu',
        '--warmup_iters=2', '--eval_batches=1', '--latent_stat_batches=1', '--log_interval=1', f'--manifest={MANIFEST}']


def run_in_process(args, crash_after_step=None):
    """Run train.main on a freshly imported train.py; optionally die right after the checkpoint of a step."""
    import train
    train = importlib.reload(train)  # fresh module globals: settings do not leak between runs
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
    assert_same(one, two, atol=1e-5)
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
        f.write(b'partial bytes')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError, match='disk full'):
        train.save_checkpoint({'step': 2, 'w': torch.zeros(3)}, path)
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['step'] == 1 and torch.equal(ckpt['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['ckpt.pt']  # no temporary file left behind


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
    data.configure(vars(train), args)
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
    ('config/does_not_exist.py', 'not found'),
    ('--stage=bogus', "--stage='bogus' is not one of: vae, pretrain, grpo"),
    ('--mel=8k', 'is not one of: 16k, 44k'),
    ('--dtype=fp16', 'is not one of: fp32, bf16'),
    ('--batch_size=0', 'must be at least 1'),
    ('--clip_seconds=0', '--clip_seconds must be above 0'),
    ('--ema_decay=1', '--ema_decay must be in [0, 1)'),
    ('--cfg_dropout=1.5', '--cfg_dropout must be in [0, 1]'),
])
def test_bad_settings_are_refused_by_name(arg, message):
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        configure([arg])


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
