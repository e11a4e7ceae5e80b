"""Token data: where tokens come from, the validation split, and deterministic sharded batches.

Sources (``data.source``):

- ``builtin``: the Python standard library's own ``.py`` files (``sysconfig.get_paths()["stdlib"]``,
  without ``site-packages``), in a fixed order, tokenised as bytes (vocab 256). No network, no
  download; the corpus is the interpreter's, so it is the same on every rank and every run.
- ``memmap``: pre-tokenised ``numpy`` files (``uint16``/``uint32``, nanoGPT's ``train.bin`` /
  ``val.bin``), read through ``np.memmap``; nothing is loaded up front.
- ``text``: local text files (a file or a directory, by suffix), tokenised by ``data.tokenizer``.
- ``datasets``: a local ``datasets.save_to_disk`` directory (its ``train`` / ``validation`` splits).

``data.tokenizer`` is ``bytes`` or a local directory loaded with ``transformers.AutoTokenizer``
(``local_files_only``). Without ``data.val_path`` (or a ``validation`` split) the last
``val_fraction`` of the token stream is held out, so validation never sees a training token.

Batches. The training stream is cut into ``N`` non-overlapping windows of ``seq_len`` tokens.
Sample ``g`` of the run is window ``perm_e[g mod N]`` with ``e = g div N`` and ``perm_e`` a
permutation drawn from ``(seed, e)``; at step ``s`` rank ``r`` takes samples
``(s·W + r)·B … (s·W + r)·B + B − 1``. A batch is a function of (seed, step, rank) alone: ranks
never share a window within an epoch, and resuming at step ``s`` needs no loader state.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig

BYTE_VOCAB = 256
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files in a fixed, well-mixed order (by hash of the relative path)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library directory {root}: use data.source=memmap "
                                "or text with your own data")
    return sorted(files, key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())


def builtin_corpus(max_bytes: int) -> np.ndarray:
    """The first ``max_bytes`` bytes of the standard library's source (files joined by blank lines)."""
    parts, size = [], 0
    for path in stdlib_files():
        try:
            data = path.read_bytes()
        except OSError:
            continue
        parts.append(data + b"\n\n")
        size += len(data) + 2
        if size >= max_bytes:
            break
    return np.frombuffer(b"".join(parts)[:max_bytes], dtype=np.uint8)


# ----- tokenizers -----

class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256), matching the tiny presets."""

    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


class HFTokenizer:
    """A local ``transformers`` tokenizer; an end-of-sequence token separates documents if it has one."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"data.tokenizer={path!r} is not a local directory: give 'bytes' or the directory "
                                    "of a saved tokenizer (tokenizer.json / tokenizer_config.json)")
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> np.ndarray:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if self.tok.eos_token_id is not None:
            ids = ids + [self.tok.eos_token_id]
        return np.asarray(ids, dtype=np.uint32 if self.vocab_size > 65535 else np.uint16)


def make_tokenizer(name: str):
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)


def _encode_all(texts, tokenizer) -> np.ndarray:
    arrays = [tokenizer.encode(t) for t in texts]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)


# ----- sources -----

def _text_files(path: Path, suffixes: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"data.path={str(path)!r} does not exist")
    wanted = tuple(s.strip() for s in suffixes.split(",") if s.strip())
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(wanted))
    if not files:
        raise FileNotFoundError(f"no files ending in {', '.join(wanted)} under {path} (set data.suffixes)")
    return files


def _memmap(path: Path, dtype: str) -> np.ndarray:
    if path.is_dir():
        path = path / "train.bin"
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist (data.source=memmap wants a .bin file "
                                "of uint16/uint32 token ids, or a directory with train.bin)")
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


def _datasets_dir(path: str, field: str, tokenizer) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as e:
        raise ImportError("data.source=datasets needs the `datasets` package (pip install datasets)") from e
    ds = load_from_disk(path)
    if isinstance(ds, DatasetDict):
        val = next((ds[s] for s in ("validation", "valid", "test") if s in ds), None)
        if "train" not in ds:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    else:
        val = None
    if field not in ds.column_names:
        raise ValueError(f"{path}: no column {field!r} (columns: {ds.column_names}); set data.text_field")
    train = _encode_all(ds[field], tokenizer)
    return train, (_encode_all(val[field], tokenizer) if val is not None else None)


def load_tokens(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """``(train_tokens, val_tokens, tokenizer_vocab)`` for a data config (0 vocab: unknown, memmap)."""
    if cfg.source != "builtin" and not cfg.path:
        raise ValueError(f"data.source={cfg.source} needs data.path")
    tokenizer = make_tokenizer(cfg.tokenizer) if cfg.source in ("builtin", "text", "datasets") else None
    if cfg.source == "builtin":
        if cfg.tokenizer != "bytes":
            raise ValueError("the built-in corpus is byte-tokenised: leave data.tokenizer=bytes")
        tokens, val = builtin_corpus(cfg.max_bytes), None
    elif cfg.source == "memmap":
        tokens = _memmap(Path(cfg.path), cfg.dtype)
        val = _memmap(Path(cfg.val_path), cfg.dtype) if cfg.val_path else None
        if val is None and Path(cfg.path).is_dir() and (Path(cfg.path) / "val.bin").is_file():
            val = _memmap(Path(cfg.path) / "val.bin", cfg.dtype)
    elif cfg.source == "text":
        tokens = _encode_all((p.read_text(errors="replace") for p in _text_files(Path(cfg.path), cfg.suffixes)),
                             tokenizer)
        val = (_encode_all((p.read_text(errors="replace") for p in _text_files(Path(cfg.val_path), cfg.suffixes)),
                           tokenizer) if cfg.val_path else None)
    else:
        tokens, val = _datasets_dir(cfg.path, cfg.text_field, tokenizer)
    if val is None:
        n_val = int(len(tokens) * cfg.val_fraction)
        tokens, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    return tokens, val, tokenizer.vocab_size if tokenizer else 0


@dataclass
class TokenData:
    """Deterministic batches over train/val token streams (see the module docstring).

    Args:
        train (np.ndarray): training token ids, 1-D.
        val (np.ndarray): held-out token ids, 1-D.
        seq_len (int): tokens per sequence.
        batch_size (int): sequences per rank per step.
        world_size (int): data-parallel ranks.
        seed (int): data order.
        vocab_size (int): ids must be below this (0: unchecked).
    """

    train: np.ndarray
    val: np.ndarray
    seq_len: int
    batch_size: int
    world_size: int
    seed: int = 0
    vocab_size: int = 0

    def __post_init__(self):
        self.n_train = len(self.train) // self.seq_len
        self.n_val = len(self.val) // self.seq_len
        per_step = self.batch_size * self.world_size
        if self.n_train < per_step:
            raise ValueError(f"the training split has {len(self.train)} tokens = {self.n_train} sequences of "
                             f"{self.seq_len}, fewer than one step needs (batch_size {self.batch_size} x world "
                             f"{self.world_size}); use more data or a smaller data.seq_len / data.batch_size")
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.world_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.n_train))
        return self._perm[1]

    def train_windows(self, step: int, rank: int) -> np.ndarray:
        """Indices of the training windows rank ``rank`` reads at ``step``."""
        start = (step * self.world_size + rank) * self.batch_size
        out = np.empty(self.batch_size, dtype=np.int64)
        for j, g in enumerate(range(start, start + self.batch_size)):
            out[j] = self._permutation(g // self.n_train)[g % self.n_train]
        return out

    def train_batch(self, step: int, rank: int) -> torch.Tensor:
        """``[batch_size, seq_len]`` int64 token ids for (step, rank)."""
        return self._gather(self.train, self.train_windows(step, rank), "training")

    def val_batches(self, rank: int, batches: int) -> list[torch.Tensor]:
        """This rank's share of ``batches × batch_size × world`` validation windows, spread evenly
        over the whole validation split (the first windows would all come from one or two documents)."""
        per_rank_batch = self.batch_size * self.world_size
        if self.n_val < per_rank_batch:
            raise ValueError(f"the validation split has {len(self.val)} tokens = {self.n_val} sequences of "
                             f"{self.seq_len}, fewer than one batch per rank; raise data.val_fraction, give "
                             "data.val_path, or set train.eval_every=0")
        usable = min(batches * per_rank_batch, self.n_val) // per_rank_batch * per_rank_batch
        windows = np.arange(usable) * self.n_val // usable  # evenly spaced, distinct since usable <= n_val
        mine = windows[rank::self.world_size]
        return [self._gather(self.val, mine[i:i + self.batch_size], "validation")
                for i in range(0, len(mine), self.batch_size)]

    def _gather(self, stream: np.ndarray, windows: np.ndarray, split: str) -> torch.Tensor:
        rows = np.stack([np.asarray(stream[w * self.seq_len:(w + 1) * self.seq_len]) for w in windows])
        if self.vocab_size and rows.max() >= self.vocab_size:
            raise ValueError(f"{split} data holds token id {int(rows.max())} but the model's vocabulary has "
                             f"{self.vocab_size} entries: use the matching tokenizer / data.dtype, or set "
                             f"model.config.vocab_size")
        return torch.from_numpy(rows.astype(np.int64))


__all__ = ["TokenData", "load_tokens", "builtin_corpus", "stdlib_files", "ByteTokenizer", "BYTE_VOCAB"]
