"""bench.py: settings parsing and the speed report's structure and FLOP counts (no wall-clock assertions)."""

import pytest
import torch

import bench

SETTINGS = {k: v for k, v in vars(bench).items() if not k.startswith("_") and isinstance(v, (int, float, str))}
TINY = ["--size=tiny", "--vae=tiny", "--vocoder=tiny", "--mel=16k", "--text_encoder=t5-tiny-random",
        "--duration=1.0", "--steps=2", "--repeats=1", "--probe_size=64", "--device=cpu"]


@pytest.fixture(autouse=True)
def restore_settings():
    threads = torch.get_num_threads()
    yield
    vars(bench).update(SETTINGS)
    torch.set_num_threads(threads)


def test_configure_overrides_and_rejects():
    bench.configure(["--duration=3", "--dtype=bf16", "--steps=10"])
    assert (bench.duration, bench.dtype, bench.steps) == (3.0, "bf16", 10) and isinstance(bench.duration, float)
    for bad in (["--nope=1"], ["--steps=ten"], ["duration=3"], ["--configure=1"]):
        with pytest.raises(SystemExit):
            bench.configure(bad)


@pytest.mark.parametrize("bad", ["--dtype=int8", "--device=nonsense", "--mode=nope", "--size=huge", "--vocoder=x"])
def test_bad_dtype_device_or_mode_exits_with_a_message(bad, capsys):
    with pytest.raises(SystemExit, match=bad.split("=")[0]):
        bench.main([bad, "--parts=text"])


def test_speed_report_counts_both_cfg_branches():
    bench.configure(TINY + ["--threads=1"])
    guided = bench.main([])
    parts = guided["parts"]
    assert set(parts) == {"text", "transformer", "vae", "vocoder"}
    assert parts["transformer"]["calls"] == 2 and all(p["flops"] > 0 for p in parts.values())
    # CFG runs the conditional and unconditional branches as one batch of two: twice the FLOPs of cfg = 1
    bench.configure(["--cfg=1.0", "--parts=transformer"])
    plain = bench.main([])
    assert guided["parts"]["transformer"]["flops"] == 2 * plain["parts"]["transformer"]["flops"]
    with pytest.raises(SystemExit):
        bench.main(["--parts=foo"])
    with pytest.raises(SystemExit):
        bench.main(["--mode=nope"])
