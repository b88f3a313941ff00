"""`train.py --stage=grpo` end to end on a tiny "pretrained" checkpoint: exact resume, LoRA export, and rewards
gathered across two processes."""

import importlib
import os
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import grpo
from transformer import MODELS, Resonate, load_text_encoder
from vae import VAES

PROMPTS = ["a dog barks", "rain on a tin roof", "a door slams", "birds chirping at dawn"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A train.py-style ckpt.pt with random weights: tiny transformer, tiny 16 kHz VAE, the MiniLM encoder."""
    root = tmp_path_factory.mktemp("grpo_stage")
    torch.manual_seed(0)
    vae = VAES["tiny"]()
    encoder = load_text_encoder("minilm")
    cfg = MODELS["tiny"](latent_dim=vae.embed_dim, text_dim=encoder.dim, text_c_dim=encoder.dim, latent_seq_len=12)
    net = Resonate(cfg)
    with torch.no_grad():  # adaLN-zero would make the untrained velocity exactly 0; give it some behaviour
        for p in net.parameters():
            p.normal_(0, 0.05)
    net.set_empty_string(*encoder.encode([""]))
    ckpt = {"model": net.state_dict(), "ema": None, "model_args": asdict(cfg), "text_encoder": "minilm",
            "mel": "16k", "vae_args": vae.args, "vae": vae.state_dict()}
    torch.save(ckpt, root / "ckpt.pt")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def run_grpo(root, out_dir, epochs, resume=False, lora_rank=0, micro_batch=0, checkpointing=False):
    """Run train.main for the GRPO stage in this process; reload train.py so no setting leaks between runs."""
    import train
    train = importlib.reload(train)
    train.main(["--stage=grpo", f"--init_from={root / 'ckpt.pt'}", f"--prompt_file={root / 'prompts.txt'}",
                f"--out_dir={out_dir}", "--reward=loudness", "--device=cpu", f"--grpo_epochs={epochs}",
                "--grpo_eval_interval=2", "--grpo_eval_prompts=0", "--grpo_num_steps=3", "--grpo_group_size=2",
                "--grpo_sample_batch_size=4", "--grpo_num_batches_per_epoch=2", "--grpo_grad_accum_steps=1",
                "--grpo_lr=1e-3", "--grpo_clip_range=0.5", f"--grpo_micro_batch={micro_batch}",
                f"--grpo_checkpointing={checkpointing}", f"--lora_rank={lora_rank}",
                "--lora_alpha=8.0", f"--resume={resume}"])
    return torch.load(os.path.join(out_dir, "grpo.pt"), weights_only=True)


# full fine-tuning with the memory options on (micro-batches of 2 clips, activation checkpointing), and LoRA
@pytest.mark.parametrize("options", [dict(micro_batch=2, checkpointing=True), dict(lora_rank=4)])
def test_stopped_and_resumed_run_equals_uninterrupted(pretrained, tmp_path, options):
    straight = run_grpo(pretrained, tmp_path / "straight", 4, **options)
    run_grpo(pretrained, tmp_path / "split", 2, **options)
    resumed = run_grpo(pretrained, tmp_path / "split", 4, resume=True, **options)
    assert straight["step"] == resumed["step"] == 4
    start = torch.load(pretrained / "ckpt.pt", weights_only=True)["model"]
    moved = max((straight["model"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-4, "four epochs of updates should change the weights"
    for k, v in straight["model"].items():
        assert (v - resumed["model"][k]).abs().max().item() <= 1e-6, k
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert (a["exp_avg"] - b["exp_avg"]).abs().max().item() <= 1e-6


def test_resume_with_another_lora_rank_is_refused_by_name(pretrained, tmp_path):
    run_grpo(pretrained, tmp_path, 1, lora_rank=4)
    with pytest.raises(ValueError, match="lora_rank=4"):
        run_grpo(pretrained, tmp_path, 2, resume=True, lora_rank=0)
    with pytest.raises(ValueError, match=r"lora_rank=4 \(now 8\)"):
        run_grpo(pretrained, tmp_path, 2, resume=True, lora_rank=8)


def test_resume_from_other_starting_weights_is_refused(pretrained, tmp_path):
    """A LoRA run's base and a full run's reference come from --init_from: resuming on other weights would go on
    silently from another model."""
    run_grpo(pretrained, tmp_path / "run", 1, lora_rank=4)
    other = tmp_path / "other"
    other.mkdir()
    (other / "prompts.txt").write_text((pretrained / "prompts.txt").read_text())
    ckpt = torch.load(pretrained / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "model": {k: v * 1.01 for k, v in ckpt["model"].items()}}, other / "ckpt.pt")
    with pytest.raises(ValueError, match=r"fine-tuned from other starting weights than --init_from='.*other/ckpt.pt' "
                                         r"\(fingerprints \w+ and \w+\); resume with its --init_from"):
        run_grpo(other, tmp_path / "run", 2, resume=True, lora_rank=4)
    with pytest.raises(ValueError, match="grpo.pt already holds a grpo checkpoint"):  # nor is it replaced unasked
        run_grpo(pretrained, tmp_path / "run", 2, lora_rank=4)


def test_checkpoint_rebuilds_in_sample_py(pretrained, tmp_path):
    """grpo.pt carries what sample.py needs; with LoRA its 'model' holds the adapters merged into the base."""
    from sample import load_pipeline
    state = run_grpo(pretrained, tmp_path / "lora", 1, lora_rank=4)
    assert state["lora"] and all(".lora_" in k for k in state["lora"])
    assert set(state["model"]) == set(torch.load(pretrained / "ckpt.pt", weights_only=True)["model"])
    pipe = load_pipeline(str(tmp_path / "lora" / "grpo.pt"), device="cpu")
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, state["model"][k])


def _gather_worker(rank, world_size, port, rewards, ids, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        B = len(rewards) // world_size
        mine = slice(rank * B, (rank + 1) * B)
        adv, stats = grpo.gather_advantages(rewards[mine], ids[mine], grpo.GRPOConfig(), rank)
        queue.put((rank, adv.tolist(), stats))  # a tensor's shared memory would die with this process
    finally:
        dist.destroy_process_group()


def test_groups_spanning_two_processes_get_the_single_process_advantages():
    cfg = grpo.GRPOConfig(group_size=4, sample_batch_size=4)
    ids = grpo.draw_prompt_ids(seed=1, epoch=0, batch=0, n_prompts=10, cfg=cfg, world_size=2)  # (8,)
    assert ids[:4].tolist() != sorted(ids[:4].tolist()) or set(ids[:4].tolist()) & set(ids[4:].tolist())
    rewards = torch.randn(8, generator=torch.Generator().manual_seed(0))
    expected, expected_stats = grpo.gather_advantages(rewards, ids, cfg)  # one process holds everything
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, rewards, ids, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (adv, stats)) for r, adv, stats in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    got = torch.tensor(results[0][0] + results[1][0], dtype=expected.dtype)
    assert torch.allclose(got, expected, atol=1e-6)
    assert results[1][1] == pytest.approx(expected_stats)


def test_best_of_keeps_the_candidate_the_reward_prefers():
    from reward import LoudnessReward
    from sample import best_of
    gains = torch.tensor([0.1, 0.5, 0.02, 0.3, 0.9, 0.05])  # 2 prompts x 3 candidates
    audio = gains[:, None] * torch.sin(torch.arange(1600) * 0.3)[None]  # (6, S)
    kept, scores = best_of(audio, 16000, ["a", "b"], 3, LoudnessReward(target_db=0.0))
    assert scores.shape == (2, 3)
    assert torch.equal(kept, audio[[1, 4]])  # the loudest of each group: closest to 0 dBFS
    with pytest.raises(AssertionError, match="candidates"):
        best_of(audio, 16000, ["a"], 3, LoudnessReward())


def test_sample_cli_best_of_writes_the_top_scoring_candidate(pretrained, tmp_path):
    import soundfile as sf
    import sample
    from reward import LoudnessReward
    common = [f"--ckpt={pretrained / 'ckpt.pt'}", "--device=cpu", "--duration=1", "--steps=2", "--seed=3",
              "--vocoder=griffin-lim"]
    sample.main(["a dog barks", *common, "--num_samples=3", f"--out_dir={tmp_path / 'all'}"])
    sample.main(["a dog barks", *common, "--best_of=3", "--reward=loudness:1.0", f"--out={tmp_path / 'best.wav'}"])
    candidates = torch.stack([torch.from_numpy(sf.read(tmp_path / "all" / f"a_dog_barks_{i}.wav",
                                                       dtype="float32")[0]) for i in range(3)])
    best = torch.from_numpy(sf.read(tmp_path / "best.wav", dtype="float32")[0])
    scores = LoudnessReward().score(candidates, 16000, ["a dog barks"] * 3)
    assert torch.equal(best, candidates[scores.argmax()])
