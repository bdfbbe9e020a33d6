"""Small models trained on the Python standard library's own source (there is no model hub here).

``benchmarks/train_small.py`` trains a byte-level HF ``GPTNeoXForCausalLM`` and an HF
``MambaForCausalLM`` on ``*.py`` files of ``sysconfig.get_paths()["stdlib"]`` and writes them as
safetensors files whose metadata embed the model config; the coordinator commits them under
``fxopt/models/assets/``. Random weights have flat spectra, so these are what quality
measurements (latent KV truncation, bf16 scan numerics) run on.

* :func:`load_trained` ``("gpt_neox" | "mamba")`` -> the HF model (eval mode);
  :class:`TrainedAssetMissing` (an :class:`~fxopt.FxoptError`) says how to make a missing asset;
* the data: :func:`stdlib_files` (a fixed train / held-out split by a stable hash of each file's
  path relative to the stdlib root, so it is the same rule on every Python version), the byte
  streams (:func:`byte_stream`: files joined by a 0 byte, which Python source never contains)
  and :func:`heldout_windows` / :func:`spread_windows` / :func:`bits_per_byte` /
  :func:`window_bits_per_byte` for the held-out metric.
"""
from __future__ import annotations

import hashlib
import json
import math
import sysconfig
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from ..errors import FxoptError

ASSET_DIR = Path(__file__).resolve().parent / "assets"
ASSET_FILES = {"gpt_neox": "gpt_neox_stdlib.safetensors", "mamba": "mamba_stdlib.safetensors"}
FORMAT = "fxopt-trained-v1"
SEPARATOR = 0            # the byte between files (a document boundary the models learn)
HELDOUT_MODULUS = 16     # a file is held out when its path hash is 0 modulo this (6.25 % of files)
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})


class TrainedAssetMissing(FxoptError):
    """A trained model's safetensors file is not where fxopt looks for it."""


class TrainedAssetError(FxoptError):
    """A trained model's file exists but is not an fxopt trained-model file (or is damaged)."""


# ----------------------------------------------------------------------------- data
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """``"heldout"`` or ``"train"`` for a path relative to the stdlib root (posix separators)."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % HELDOUT_MODULUS == 0 else "train"


def stdlib_files(split: str, root: Optional[Path] = None) -> list[Path]:
    """The ``*.py`` files of one split, sorted by relative path; test directories and
    site-packages are skipped."""
    if split not in ("train", "heldout"):
        raise FxoptError(f"split must be 'train' or 'heldout', got {split!r}")
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]) or not p.is_file():
            continue
        if split_of(rel.as_posix()) == split:
            out.append(rel)
    return [root / rel for rel in sorted(out, key=lambda r: r.as_posix())]


def byte_stream(split: str, root: Optional[Path] = None, max_bytes: Optional[int] = None) -> Tensor:
    """The split's files as one uint8 tensor, each file preceded by the separator byte."""
    chunks, total = [], 0
    for path in stdlib_files(split, root):
        data = bytes([SEPARATOR]) + path.read_bytes()
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    blob = b"".join(chunks)
    if max_bytes is not None:
        blob = blob[:max_bytes]
    if not blob:
        raise FxoptError(f"the {split} split of {root or stdlib_root()} holds no Python files")
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()


def windows(stream: Tensor, context: int, max_windows: Optional[int] = None) -> Tensor:
    """Non-overlapping windows ``(n, context + 1)`` int64 of a byte stream: each predicts its last
    ``context`` bytes from the ones before."""
    n = (stream.numel() - 1) // context
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise FxoptError(f"a stream of {stream.numel()} bytes has no window of {context + 1}")
    idx = torch.arange(n)[:, None] * context + torch.arange(context + 1)[None, :]
    return stream.long()[idx]


def spread_windows(stream: Tensor, context: int, count: int) -> Tensor:
    """``count`` of the stream's non-overlapping windows ``(count, context + 1)``, evenly spaced over
    the whole stream (first and last included): a sample of every part of it, where the first
    ``count`` windows would be the first few files only. Fewer when the stream has fewer windows."""
    if count < 1:
        raise FxoptError(f"count must be >= 1, got {count}")
    n = (stream.numel() - 1) // context
    if n < 1:
        raise FxoptError(f"a stream of {stream.numel()} bytes has no window of {context + 1}")
    idx = torch.linspace(0, n - 1, min(count, n), dtype=torch.float64).round().long().unique()
    return stream.long()[idx[:, None] * context + torch.arange(context + 1)[None, :]]


def heldout_windows(context: int = 512, max_windows: Optional[int] = None, root: Optional[Path] = None) -> Tensor:
    return windows(byte_stream("heldout", root), context, max_windows)


def window_bits_per_byte(logits_fn: Callable[[Tensor], Tensor], wins: Tensor, batch_size: int = 16,
                         device: Union[str, torch.device, None] = None) -> Tensor:
    """Per window (n,) fp64: the mean cross-entropy in bits of ``wins[i, 1:]`` given ``wins[i, :-1]``;
    ``logits_fn(ids)`` returns (b, L, 256) logits (any float dtype; the loss is taken in fp32). Paired
    differences of two models over the same windows give a standard error for the difference."""
    out = []
    with torch.no_grad():
        for s in range(0, wins.shape[0], batch_size):
            w = wins[s:s + batch_size]
            if device is not None:
                w = w.to(device)
            logits = logits_fn(w[:, :-1]).float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")
            out.append(nll.double().sum(1).cpu() / w[:, 1:].shape[1] / math.log(2))
    return torch.cat(out)


def bits_per_byte(logits_fn: Callable[[Tensor], Tensor], wins: Tensor, batch_size: int = 16,
                  device: Union[str, torch.device, None] = None) -> float:
    """Mean cross-entropy in bits of ``wins[:, 1:]`` given ``wins[:, :-1]`` (every window has the same
    length, so this is the mean of :func:`window_bits_per_byte`)."""
    return float(window_bits_per_byte(logits_fn, wins, batch_size, device).mean())


def model_bits_per_byte(model, wins: Tensor, batch_size: int = 16) -> float:
    """:func:`bits_per_byte` of an HF causal LM (its ``.logits``), on the model's device."""
    device = next(model.parameters()).device
    return bits_per_byte(lambda ids: model(input_ids=ids, use_cache=False).logits, wins, batch_size, device)


# ----------------------------------------------------------------------------- files
def asset_path(family: str) -> Path:
    if family not in ASSET_FILES:
        raise FxoptError(f"unknown trained model {family!r}; choose one of {sorted(ASSET_FILES)}")
    return ASSET_DIR / ASSET_FILES[family]


def asset_available(family: str) -> bool:
    return asset_path(family).is_file()


def build(family: str, config: dict):
    """An untrained HF model of ``family`` from the config keyword arguments stored in a file."""
    import transformers

    if family == "gpt_neox":
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config))
    if family == "mamba":
        return transformers.MambaForCausalLM(transformers.MambaConfig(**config))
    raise FxoptError(f"unknown trained model family {family!r}; choose one of {sorted(ASSET_FILES)}")


def save_trained(model, family: str, config: dict, path: Union[str, Path], info: Optional[dict] = None,
                 dtype: torch.dtype = torch.float16) -> int:
    """Write ``model``'s weights (as ``dtype``) with ``config`` (the constructor keyword arguments)
    and ``info`` in the safetensors metadata; returns the file size in bytes."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "family": family, "config": json.dumps(config, sort_keys=True),
            "info": json.dumps(info or {}, sort_keys=True)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path.stat().st_size


def read_metadata(path: Union[str, Path]) -> dict:
    """``{"family", "config", "info"}`` of a trained-model file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise TrainedAssetError(f"{path} is not a readable safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise TrainedAssetError(f"{path} is not an fxopt trained-model file (metadata format {meta.get('format')!r}, "
                                f"want {FORMAT!r}); write it with benchmarks/train_small.py")
    try:
        return {"family": meta["family"], "config": json.loads(meta["config"]), "info": json.loads(meta.get("info", "{}"))}
    except (KeyError, json.JSONDecodeError) as exc:
        raise TrainedAssetError(f"{path}: damaged fxopt metadata ({exc})") from exc


def load_trained(family: str, *, path: Union[str, Path, None] = None, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device] = "cpu"):
    """The trained HF model of ``family`` (``"gpt_neox"`` or ``"mamba"``), in eval mode.

    ``path`` defaults to ``fxopt/models/assets/<family>_stdlib.safetensors``."""
    from safetensors.torch import load_file

    p = Path(path) if path is not None else asset_path(family)
    if not p.is_file():
        raise TrainedAssetMissing(
            f"trained {family} model not found at {p}: train it with "
            f"`python benchmarks/train_small.py --model {family}` (a few minutes on one GPU; writes "
            f"{ASSET_FILES.get(family, family)} to fxopt/models/assets/), or pass path=")
    meta = read_metadata(p)
    if meta["family"] != family:
        raise TrainedAssetError(f"{p} holds a {meta['family']} model, not {family}")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build(family, meta["config"])
    state = load_file(str(p))
    missing, unexpected = model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise TrainedAssetError(f"{p}: weights do not fit the {family} config (missing {missing[:4]}, "
                                f"unexpected {unexpected[:4]})")
    return model.to(device=device, dtype=dtype).eval()


def trained_info(family: str, path: Union[str, Path, None] = None) -> dict:
    """The training summary stored with a model (held-out bits per byte, steps, ...)."""
    p = Path(path) if path is not None else asset_path(family)
    if not p.is_file():
        raise TrainedAssetMissing(f"trained {family} model not found at {p}")
    return read_metadata(p)["info"]


def iter_batches(stream: Tensor, context: int, batch_size: int, generator: torch.Generator) -> Iterable[Tensor]:
    """Random training windows ``(batch, context + 1)`` from a byte stream (indices drawn on the CPU
    from ``generator``, so the sequence depends only on the seed)."""
    n = stream.numel() - context - 1
    if n < 1:
        raise FxoptError(f"a stream of {stream.numel()} bytes is shorter than one window of {context + 1}")
    ar = torch.arange(context + 1, device=stream.device)
    while True:
        start = torch.randint(0, n, (batch_size,), generator=generator).to(stream.device)
        yield stream[start[:, None] + ar[None, :]].long()
