"""Shared test fixtures."""
import os
import shutil
import tempfile
from pathlib import Path

# No test reaches the network or the user's Hugging Face cache: set before huggingface_hub reads them at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="nanoresonate_hf_home_")
os.environ.pop("HF_TOKEN", None)

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def hf_cache(monkeypatch, tmp_path):
    """A fresh, empty Hugging Face cache for one test (and the subprocesses it starts)."""
    import huggingface_hub.constants
    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_hf_cache(cache, repo_id, folder, revision="0" * 40):
    """Lay the files of `folder` out as huggingface_hub's cache holds a downloaded repository (refs/main ->
    snapshots/<revision>/...), as if `hf download repo_id` had run on this machine."""
    repo = Path(cache, "models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(folder, repo / "snapshots" / revision, dirs_exist_ok=True)
    return repo


def published_bigvgan_state(model):
    """A BigVGAN's state dict as bigvgan_generator.pt holds it, in its key order: each conv's bias, then weight_g =
    ||w|| (over all dims but the first) and weight_v = w (torch.nn.utils.weight_norm's names)."""
    out = {}
    for name, m in model.named_modules():
        tensors = dict(m.named_parameters(recurse=False)) | dict(m.named_buffers(recurse=False))
        if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            w = tensors.pop("weight")
            tensors.update(weight_g=torch.linalg.vector_norm(w, dim=list(range(1, w.ndim)), keepdim=True), weight_v=w)
        out.update({f"{name}.{k}": t.detach() for k, t in tensors.items()})
    return out


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests run many small ops: on a busy 2-core CPU a second intra-op thread mostly waits for a core, which made
    some test files 10-80x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fx():
    """fixtures/transformer_a.pt: the released transformer's tiny config, weights, inputs and outputs."""
    return torch.load(FIXTURES / "transformer_a.pt", weights_only=True)


@pytest.fixture(scope="module")
def model(fx):
    """The released tiny transformer of transformer_a.pt, loaded strictly into ours."""
    from transformer import Resonate, ResonateConfig, load_released_state_dict
    m = Resonate(ResonateConfig(**fx["config"])).eval()
    load_released_state_dict(m, fx["state_dict"])
    return m
