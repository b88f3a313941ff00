"""The tiny CPU recipe end to end, shortened: VAE, then pretraining (validation flow loss must fall), then a WAV
from sample.py. Slow (a few minutes): run with `python -m pytest -m slow`."""
import os
import re
import subprocess
import sys

import pytest
import soundfile as sf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(ROOT, 'tests', 'fixtures', 'audio', 'manifest.jsonl')


def run(*args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_tiny_recipe_trains_and_samples(tmp_path):
    common = ['config/tiny_sfx.py', f'--manifest={MANIFEST}', f'--out_dir={tmp_path}', '--batch_size=4']
    run('train.py', *common, '--stage=vae', '--max_iters=60', '--eval_interval=30')
    log = run('train.py', *common, '--stage=pretrain', '--max_iters=120', '--eval_interval=60', '--eval_batches=2')
    val = [float(x) for x in re.findall(r'val loss ([0-9.]+)', log)]
    assert len(val) == 3 and val[-1] < val[0], log
    wav = tmp_path / 'x.wav'
    run('sample.py', 'a sheep bleating', f'--ckpt={tmp_path / "ckpt.pt"}', f'--out={wav}', '--duration=2', '--steps=5')
    audio, sr = sf.read(wav)
    assert sr == 16000 and len(audio) == 32000 and abs(audio).max() > 1e-3
