"""data.hub_files and read_weights, the one loading path of published files: a local folder first, then the
standard Hugging Face cache (filled by an earlier download or `hf download`), and one message when neither has
them. The session runs with HF_HUB_OFFLINE=1 (conftest), as an offline machine does."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
from conftest import put_in_hf_cache

ROOT = Path(__file__).parent.parent


def test_local_folder_first_then_the_hugging_face_cache(tmp_path, hf_cache):
    cached = tmp_path / "cached"
    (cached / "sub").mkdir(parents=True)
    (cached / "sub" / "w.bin").write_bytes(b"from the cache")
    (cached / "a.bin").write_bytes(b"cache copy of a")
    put_in_hf_cache(hf_cache, "owner/repo", cached)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.bin").write_bytes(b"my copy of a")
    paths = data.hub_files("owner/repo", ["a.bin", "sub/w.bin"], weights_dir=mine)
    assert paths["a.bin"].read_bytes() == b"my copy of a"
    assert paths["sub/w.bin"].read_bytes() == b"from the cache"


def test_missing_files_are_named_in_one_message(tmp_path, hf_cache):
    with pytest.raises(data.WeightsMissing) as info:
        data.hub_files("owner/absent", ["x.pth", "sub/y.json"], weights_dir=tmp_path)
    message = str(info.value)
    assert "owner/absent" in message and "x.pth" in message and "sub/y.json" in message
    assert str(tmp_path) in message and "hf download owner/absent x.pth sub/y.json" in message
    assert isinstance(info.value, OSError)  # callers catch it with the other file errors


def test_read_weights_reads_torch_and_safetensors_and_refuses_the_rest(tmp_path):
    from safetensors.torch import save_file
    state = {"w": torch.arange(3.0)}
    torch.save(state, tmp_path / "w.pt")
    save_file(state, tmp_path / "w.safetensors")
    for name in ("w.pt", "w.safetensors"):
        assert torch.equal(data.read_weights(tmp_path / name)["w"], state["w"])
    (tmp_path / "notes.pt").write_text("not weights")
    with pytest.raises(ValueError, match="notes.pt is not a readable weights file"):
        data.read_weights(tmp_path / "notes.pt")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        data.read_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.read_weights(tmp_path / "nope.pt")
    # a pickled object beyond tensors is refused
    torch.save({"w": state["w"], "extra": Custom()}, tmp_path / "custom.pt")
    with pytest.raises(ValueError, match="custom.pt"):
        data.read_weights(tmp_path / "custom.pt")


class Custom:
    """A class a published file might pickle beside its tensors."""


def test_sample_offline_with_nothing_cached_prints_one_message(tmp_path, hf_cache):
    run = subprocess.run([sys.executable, str(ROOT / "sample.py"), "rain on a tin roof", "--device=cpu"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    for name in ("Resonate_GRPO.pth", "v1-44.pth", "bigvgan_v2_44khz_128band_512x/config.json",
                 "bigvgan_v2_44khz_128band_512x/bigvgan_generator.pt", "AndreasXi/Resonate", "--weights_dir",
                 "google/flan-t5-large"):
        assert name in run.stderr, name


def test_a_weights_dir_that_is_not_a_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="--weights_dir .*nope is not a folder"):
        data.hub_files("owner/repo", ["a.bin"], weights_dir=tmp_path / "nope")
