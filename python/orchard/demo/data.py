"""Byte corpora for the demo: Python's standard library, or a file, folder or git repository."""

from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path

import torch

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib"}


def _text(path: Path, budget: int) -> bytes:
    """Up to budget bytes of a file, or b"" if it is binary or unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read(budget)
    except OSError:
        return b""
    return b"" if b"\0" in data[:8192] else data


def _walk(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    """Files under root in sorted order, skipping hidden, cache and installed-package folders."""
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        found += [Path(here, f) for f in sorted(files) if suffixes is None or f.endswith(suffixes)]
    return found


def source_files(data: str | None) -> tuple[str, list[Path]]:
    """A description of the corpus and its files, in a deterministic order."""
    if data is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        return f"Python standard library ({root})", _walk(root, (".py",))
    path = Path(data)
    if path.is_file():
        return str(path), [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    if (path / ".git").exists():
        names = subprocess.run(["git", "-C", str(path), "ls-files", "-z"], check=True,
                               capture_output=True).stdout.decode().split("\0")
        return f"git repository {path}", [path / n for n in sorted(names) if n]
    return f"folder {path}", _walk(path, None)


def load_corpus(data: str | None, cap: int = 3 << 20) -> tuple[str, torch.Tensor]:
    """The corpus as a uint8 tensor of at most cap bytes, files joined by newlines."""
    name, files = source_files(data)
    parts, size = [], 0
    for f in files:
        if size >= cap:
            break
        text = _text(f, cap - size)
        if text:
            parts.append(text + b"\n")
            size += len(text) + 1
    blob = b"".join(parts)[:cap]
    return name, torch.frombuffer(bytearray(blob), dtype=torch.uint8)


class Batches:
    """Deterministic random windows of a train/validation split of a byte corpus."""

    def __init__(self, corpus: torch.Tensor, seq_len: int, batch_size: int, seed: int,
                 val_fraction: float = 0.1):
        n_val = int(len(corpus) * val_fraction)
        self.train, self.val = corpus[: len(corpus) - n_val], corpus[len(corpus) - n_val:]
        if len(self.val) < seq_len + 2:
            raise ValueError(f"corpus of {len(corpus)} bytes is too small for --seq-len {seq_len}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def _get(self, part: torch.Tensor, stream: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + stream * 7919 + i)
        starts = torch.randint(len(part) - self.seq_len - 1, (self.batch_size,), generator=g)
        chunk = part[starts[:, None] + torch.arange(self.seq_len + 1)].long()
        return chunk[:, :-1], chunk[:, 1:]

    def train_batch(self, step: int):
        """Inputs and targets (B, S) for training step `step`: the same on every call."""
        return self._get(self.train, 0, step)

    def val_batch(self, i: int):
        """Inputs and targets (B, S) for validation batch i."""
        return self._get(self.val, 1, i)
