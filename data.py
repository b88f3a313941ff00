"""Data: caption manifests, audio loading and resampling, the training dataset, settings, devices, published weights.
A manifest is JSONL, one {"audio_id": "x", "audio_path": "audio/x.flac", "caption": "a dog barking", ...} a line."""

import ast
import difflib
import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import soundfile
import torch

# -----------------------------------------------------------------------------
# manifests


def read_manifest(path):
    """Rows of a JSONL manifest, audio_path resolved against its folder, audio_id defaulting to the file's stem. Raises
    FileNotFoundError; ValueError naming the file and line for an empty or non-UTF-8 file or a malformed row."""
    path, text = _read_text(path, "manifest", "pass the path of a .jsonl caption manifest")
    root = os.path.dirname(os.path.abspath(path))
    rows = [_parse_manifest_line(line, path, n) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not rows:
        raise ValueError(f"manifest {path} is empty; add one JSON object a line for each clip")
    for row in rows:
        row["audio_path"] = os.path.normpath(os.path.join(root, os.path.expanduser(row["audio_path"])))
        row.setdefault("audio_id", Path(row["audio_path"]).stem)
    return rows


def read_prompts(path, split=None, keep_unusable=False):
    """[(id, prompt)] of a text file (id None), a TTA-Bench JSON (an empty or non-text prompt_text warns, then is
    dropped, or kept as (id, None) with keep_unusable) or a manifest's `split` ("train": all but "val"). Raises
    FileNotFoundError; ValueError naming the file and the fault."""
    fix = "give a text file, a TTA-Bench .json or a .jsonl manifest"
    if os.fspath(path).endswith(".jsonl"):
        rows = [r for r in read_manifest(_existing_file(path, "prompts file", fix)) if split is None or
                r.get("split") == split or (split == "train" and r.get("split") != "val")]
        return [(r["audio_id"], r["caption"].strip()) for r in rows]
    path, text = _read_text(path, "prompts file", fix)
    if not path.endswith(".json"):
        return [(None, line.strip()) for line in text.splitlines() if line.strip()]
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"prompts file {path} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if not isinstance(entries, list) or not all(isinstance(x, dict) and "prompt_text" in x for x in entries):
        raise ValueError(f'{path}: expected a JSON list of {{"id": ..., "prompt_text": ...}} as in TTA-Bench')
    entries = [(str(x.get("id", i)), x["prompt_text"].strip() if isinstance(x["prompt_text"], str) else "")
               for i, x in enumerate(entries)]
    skipped = sorted(pid for pid, p in entries if not p)
    if skipped:  # TTA-Bench's fairness set has an empty prompt (id 2325)
        warnings.warn(f"{path}: skipped {len(skipped)} entries whose prompt_text is empty, null or not text: "
                      f"{', '.join(skipped[:20])}{' ...' if len(skipped) > 20 else ''}", stacklevel=2)
    return [(pid, p or None) for pid, p in entries if p or keep_unusable]


def _existing_file(path, what, fix, error=FileNotFoundError):
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        kind = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise error(f"{what} {path} {kind}; {fix}")
    return path


def _read_text(path, what, fix):
    path = _existing_file(path, what, fix)
    try:
        return path, Path(path).read_text(encoding="utf-8-sig")  # -sig: a byte-order mark some editors write is dropped
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         "re-save it as UTF-8") from None


def _parse_manifest_line(line, path, lineno):
    try:
        row = json.loads(line)
        problem = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
    except json.JSONDecodeError as e:
        row, problem = {}, f"not valid JSON ({e.msg})"
    for key in ("audio_path", "caption"):
        if problem is None and (not isinstance(row.get(key), str) or not row[key].strip()):
            problem = f"key '{key}' " + ("is missing" if key not in row else
                                         f"must be a non-empty string, got {row[key]!r}")
    if problem:
        raise ValueError(f'{path}, line {lineno}: {problem}; each line must be one JSON object such as '
                         '{"audio_id": "x", "audio_path": "audio/x.flac", "caption": "a dog barking", "duration": 4.2}')
    return row


# -----------------------------------------------------------------------------
# resampling: Hann-windowed sinc interpolation, as torchaudio.functional.resample with its defaults

RESAMPLE_ZEROS = 6  # sinc zero crossings on each side of the kernel centre (torchaudio's lowpass_filter_width)
RESAMPLE_ROLLOFF = 0.99  # low-pass cutoff as a fraction of the lower Nyquist (torchaudio's rolloff)
_MAX_BANK_TAPS = 1 << 20  # a larger polyphase bank (near-coprime rates, 44101 -> 16000) is evaluated per output


def resample(wave, orig_sr, new_sr):
    """`wave` (..., S) float at orig_sr -> (..., ceil(S * new_sr / orig_sr)) at new_sr, same dtype (`wave` itself at
    equal rates), as torchaudio.functional.resample with its defaults, the released metrics' resampler (windowed
    sinc: J. O. Smith, "Digital Audio Resampling"). Raises ValueError for non-positive or non-integer rates."""
    if not all(int(sr) == sr > 0 for sr in (orig_sr, new_sr)):
        raise ValueError(f"orig_sr, new_sr must be positive integer numbers of Hz, got {orig_sr!r}, {new_sr!r}")
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    if orig == new:
        return wave
    *lead, S = wave.shape
    half = math.ceil(RESAMPLE_ZEROS * orig / (RESAMPLE_ROLLOFF * min(orig, new)))  # kernel half-width, input samples
    n_out = -(-S * new // orig)  # ceil
    x = wave.reshape(-1, S).to(torch.promote_types(wave.dtype, torch.float32))  # (B, S)
    if new * (orig + 2 * half) <= _MAX_BANK_TAPS:  # polyphase: output block q, phase j = bank[j] on its inputs
        offsets = torch.arange(-half, orig + half, device=x.device)  # block q reads inputs q * orig + offsets
        bank = _sinc_kernel(offsets, torch.arange(new, device=x.device)[:, None], orig, new, x.dtype)[:, None]
        y = torch.nn.functional.conv1d(torch.nn.functional.pad(x[:, None], (half, half + orig)), bank, stride=orig)
        y = y.transpose(1, 2).reshape(x.shape[0], -1)[:, :n_out]  # (B, new, Q) -> interleaved (B, n_out)
    else:  # output n from the 2 half + 2 inputs around n * orig / new, in chunks of outputs
        taps = torch.arange(-half, half + 2, device=x.device)
        chunk = max(1, (1 << 22) // (x.shape[0] * taps.numel()))  # bounds the (B, N, taps) gather
        padded = torch.nn.functional.pad(x, (half, half + 1))
        out = []
        for n in torch.arange(n_out, device=x.device)[:, None].split(chunk):  # (N, 1)
            i = n * orig // new + taps  # (N, taps) input indices, -half ... S + half
            weights = _sinc_kernel(i - n // new * orig, n % new, orig, new, x.dtype)
            out.append((padded[:, i + half] * weights).sum(-1))  # (B, N)
        y = torch.cat(out, dim=-1)
    return y.to(wave.dtype).reshape(*lead, n_out)


def _sinc_kernel(offset, phase, orig, new, dtype):
    # weight of input block_start + offset for the output `phase` of a block of orig inputs and new outputs
    fc = RESAMPLE_ROLLOFF * min(orig, new)
    u = ((offset.to(dtype) / orig - phase.to(dtype) / new) * fc).clamp(-RESAMPLE_ZEROS, RESAMPLE_ZEROS)
    return torch.sinc(u) * torch.cos(u * (math.pi / (2 * RESAMPLE_ZEROS))) ** 2 * (fc / orig)


# -----------------------------------------------------------------------------
# audio loading

SILENCE_PEAK = 1e-4  # a file whose peak |amplitude| is below this (-80 dBFS) is treated as silent, i.e. unusable
LOUD_PEAK = 100.0  # +40 dBFS: a float file this far outside [-1, 1] holds garbage (from 1e19 on, power overflows)


class AudioError(ValueError):
    """An audio file that cannot serve as training data: missing, unreadable, empty, silent or not audio."""


def load_audio(path, sample_rate):
    """A file libsndfile reads -> (S,) float32 mono at `sample_rate` Hz: the channels' mean, or the loudest channel
    where they cancel. Raises AudioError naming the file (missing, undecodable, empty, non-finite, silent, too loud)."""
    path = _existing_file(path, "audio file", "fix its audio_path in the manifest or restore the file", AudioError)
    try:
        data, sr = soundfile.read(path, dtype="float32", always_2d=True)  # (S, C)
    except Exception as e:  # libsndfile, format and memory errors alike: this file cannot be used
        raise AudioError(f"audio file {path} could not be decoded ({e}); re-encode it as wav or flac") from None
    finite = np.isfinite(data)
    if data.size and finite.all():
        mono = data.mean(axis=1)  # (S,)
        peak, channel_peaks = float(np.abs(mono).max()), np.abs(data).max(axis=0)  # (C,)
        if peak < 0.1 * channel_peaks.max():  # channels in antiphase cancel out (-20 dB or more): keep the loudest
            mono, peak = data[:, channel_peaks.argmax()], float(channel_peaks.max())
    problem = ("holds no samples" if not data.size else
               f"holds {finite.size - finite.sum()} NaN or infinite samples (re-export it)" if not finite.all() else
               f"is silent (peak {peak:.1e} < {SILENCE_PEAK:.0e})" if peak < SILENCE_PEAK else
               f"peaks at {peak:.3g}, far outside [-1, 1] (not audio)" if peak > LOUD_PEAK else "")
    if problem:
        raise AudioError(f"audio file {path} {problem}; drop it from the manifest")
    try:
        return resample(torch.from_numpy(np.ascontiguousarray(mono)), sr, sample_rate)
    except Exception as e:  # an odd rate must cost one file, never the run
        raise AudioError(f"audio file {path} at {sr} Hz could not be resampled to {sample_rate} Hz ({e}); "
                         "re-encode it at a common rate such as 44100 or 48000 Hz") from None


def crop_or_pad(wave, num_samples, start=0.0):
    """(S,) -> (num_samples,): the window at fraction `start` in [0, 1) of the valid start range, or zero-padded."""
    assert wave.dim() == 1 and num_samples >= 1, (tuple(wave.shape), num_samples)
    S = wave.shape[0]
    if S >= num_samples:
        first = min(int(float(start) * (S - num_samples + 1)), S - num_samples)
        return wave[first:first + num_samples]
    return torch.nn.functional.pad(wave, (0, num_samples - S))


# -----------------------------------------------------------------------------
# dataset


class AudioCaptionDataset:
    """Manifest rows as clips of clip_seconds, decoded audio cached; a bad file warns once, the next row stands in."""

    def __init__(self, rows, sample_rate, clip_seconds):
        self.rows, self.sample_rate, self.num_samples = rows, int(sample_rate), round(clip_seconds * sample_rate)
        assert rows and self.num_samples >= 1, (len(rows), clip_seconds, sample_rate)
        self._audio = {}  # audio_path -> (S,) tensor
        self._bad = {}  # audio_path -> reason; remembered so a bad file is tried and reported only once
        self._skipped = set()  # row indices found bad during the current epoch

    def __len__(self):
        return len(self.rows)

    def get_batch(self, indices, starts=None):
        """(B, num_samples) float32 audio, B captions of rows `indices` cropped at fractions starts[b]; ValueError if
        no row is readable."""
        audio = torch.zeros(len(indices), self.num_samples)  # (B, S)
        captions = []
        for b, i in enumerate(indices):
            i, wave = self._next_readable(int(i))
            audio[b] = crop_or_pad(wave, self.num_samples, 0.0 if starts is None else starts[b])
            captions.append(self.rows[i]["caption"])
        return audio, captions

    def paths(self, indices):
        """The audio files that `get_batch(indices)` reads."""
        return [self.rows[self._next_readable(int(i))[0]]["audio_path"] for i in indices]

    def _next_readable(self, i):
        for j in range(i, i + len(self.rows)):  # wrapping, so a batch depends on `indices` alone, on every rank
            j %= len(self.rows)
            path = self.rows[j]["audio_path"]
            if path not in self._audio and path not in self._bad:
                try:
                    self._audio[path] = load_audio(path, self.sample_rate)
                except AudioError as e:
                    self._bad[path] = str(e)
                    warnings.warn(f"skipping bad audio file: {e}", stacklevel=3)
            if path in self._audio:
                return j, self._audio[path]
            self._skipped.add(j)
        raise ValueError(f"no readable audio file among the {len(self.rows)} rows of the manifest (e.g. "
                         f"{next(iter(self._bad.values()))}); check the audio_path entries (relative paths are "
                         "resolved against the manifest's folder)")

    def end_epoch_report(self, merge=None):
        """"skipped K of N files: names" for the epoch now ending, bad rows merged over DDP ranks by `merge`."""
        skipped, self._skipped = merge(self._skipped) if merge else self._skipped, set()
        names = ", ".join(sorted(os.path.basename(self.rows[i]["audio_path"]) for i in skipped))
        return f"skipped {len(skipped)} of {len(self)} files" + (f": {names}" if names else "")


# -----------------------------------------------------------------------------
# settings of train.py and bench.py: module globals, config/*.py presets, --key=value (nanoGPT's configurator)


def setting_names(namespace):
    """A script's settings: its globals holding a bool, int, float, str or tuple, except _private and UPPER_CASE."""
    return [k for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper() and isinstance(v, (bool, int, float, str, tuple))]


def configure(namespace, argv):
    """Apply config/*.py presets, then --key=value overrides (also applied first, for presets to branch on), to a
    script's globals(). Raises ValueError naming an unknown or mistyped setting, FileNotFoundError for a preset."""
    overrides = dict(_parse_setting(arg, namespace) for arg in argv if arg.startswith("--"))
    namespace.update(overrides)
    for path in (arg for arg in argv if not arg.startswith("--")):
        path = _existing_file(path, "config file", "settings are --key=value, presets config/*.py")
        print(f"config: {path}")
        exec(Path(path).read_text(), namespace)
    namespace.update(overrides)


def _parse_setting(arg, namespace):
    key, eq, text = arg[2:].partition("=")
    if not eq:
        raise ValueError(f"settings are --key=value, got {arg!r}")
    if key not in setting_names(namespace):
        close = difflib.get_close_matches(key, setting_names(namespace), n=3)
        hint = f"did you mean {', '.join('--' + c for c in close)}?" if close else "see the globals of the script"
        raise ValueError(f"unknown setting --{key}; {hint}")
    default = namespace[key]
    if isinstance(default, str):
        return key, text  # --out_dir=2024 is the folder '2024'
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        value = text  # not a literal: refused below
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if type(value) is not type(default):
        raise ValueError(f"--{key} expects {type(default).__name__} (like {default!r}), got {text!r}")
    return key, value


# -----------------------------------------------------------------------------
# devices and precisions, for every script and model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype names, every script


def pick_device(name='auto'):
    """'auto' -> cuda if available, else mps, else cpu. Raises ValueError naming --device if it is not available."""
    available = {'cuda': torch.cuda.is_available(), 'mps': torch.backends.mps.is_available(), 'cpu': True}
    if name == 'auto':
        return torch.device(next(d for d, ok in available.items() if ok))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device {name!r} is not a device name; use auto, cuda, cuda:N, mps or cpu') from None
    if not available.get(device.type, False):
        raise ValueError(f'--device {name!r} is not available on this machine; use --device=auto')
    return device


def init_distributed(device='auto'):
    """(rank, world_size, device): under torchrun the process group (NCCL on CUDA, one GPU a process, else gloo)."""
    dev = pick_device(device)
    if int(os.environ.get('RANK', -1)) == -1:
        return 0, 1, dev
    if dev.type == 'cuda':
        dev = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(dev)
    torch.distributed.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), dev


def is_distributed() -> bool:
    """True inside a torch.distributed process group (torchrun)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """`x` (same shape on every process) concatenated over processes in rank order; x itself in one process."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj) -> list:
    """Every process's picklable `obj`, in rank order ([obj] in one process)."""
    if not is_distributed():
        return [obj]
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts


CPUINFO = "/proc/cpuinfo"  # Linux: the CPU's feature flags


def warn_if_slow_bf16(device, dtype):
    """Warn that bf16 on a CPU without native bf16 (e.g. AVX2 only) runs ~15-50x slower than fp32."""
    if dtype != "bf16" or pick_device(device).type != "cpu" or not os.path.exists(CPUINFO):
        return
    if not set(Path(CPUINFO).read_text().split()) & {"avx512_bf16", "amx_bf16", "bf16"}:  # x86 AVX-512/AMX, Arm
        warnings.warn("this CPU has no native bf16: --dtype=bf16 runs far slower than --dtype=fp32 here", stacklevel=2)


def write_atomic(path, write):
    """Call write(tmp) on a temporary file beside `path`, flush it to disk, then rename it over `path`: the file is
    complete or absent, even after a crash. tmp keeps the extension (soundfile reads the format from it)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable(folder, flag):
    """Create `folder` if needed and check it is writable. Raises ValueError naming the setting `flag`."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        why = "it is a file" if os.path.isfile(folder) else e.strerror or str(e)
        raise ValueError(f"{flag} {folder!r} is not a writable folder ({why}); choose another {flag}") from None


def seeded_generator(*keys) -> torch.Generator:
    """CPU torch.Generator seeded by a stable hash of `keys` (ints, strings): the same stream on every machine."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# -----------------------------------------------------------------------------
# published weights: a local folder, else the standard Hugging Face cache (huggingface_hub downloads into it)


class WeightsMissing(FileNotFoundError):
    """Published files neither in the given folder nor in the Hugging Face cache, and not downloadable."""


def hub_files(repo_id, filenames, weights_dir=None):
    """{filename: Path} of files of Hugging Face repository `repo_id`: weights_dir/filename, else the cache, else a
    download (until one fails offline). Raises WeightsMissing naming every missing file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    if weights_dir and not os.path.isdir(os.path.expanduser(weights_dir)):
        raise ValueError(f"--weights_dir {weights_dir} is not a folder; give the folder holding the published files")
    paths, missing, offline = {}, [], False
    for name in filenames:
        local = Path(weights_dir).expanduser() / name if weights_dir else None
        if local is not None and local.is_file():
            paths[name] = local
            continue
        for cache_only in (True,) if offline else (True, False):  # the cache first: a cached file needs no network
            try:
                paths[name] = Path(hf_hub_download(repo_id, name, local_files_only=cache_only))
                break
            except OSError as e:  # HfHubHTTPError and LocalEntryNotFoundError are OSErrors
                offline = offline or (not cache_only and isinstance(e, LocalEntryNotFoundError))
        else:
            missing.append(name)
    if missing:
        where = f"the folder {weights_dir}" if weights_dir else "a folder given as --weights_dir"
        raise WeightsMissing(f"files of https://huggingface.co/{repo_id} are not on this machine and could not be "
                             f"downloaded; fetch them where you have access:\n    hf download {repo_id} "
                             f"{' '.join(missing)}\nand put them in {where} (keeping sub-folders), or run it here "
                             "to fill the Hugging Face cache (HF_TOKEN for gated copies, HF_ENDPOINT for a mirror)")
    return paths


def read_weights(path):
    """The dict in a .safetensors or torch file (weights_only: no code runs). Raises FileNotFoundError, ValueError."""
    path = _existing_file(path, "weights file", "give the path of a .pt/.pth or .safetensors file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and safetensors errors alike: not a weights file
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line),
                      "not a PyTorch (.pt/.pth) or safetensors checkpoint")  # never torch's weights_only=False advice
        raise ValueError(f"{path} is not a readable weights file: {detail}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a checkpoint or state dict")
    return state
