"""Offline real-data tasks for pretrain-then-fine-tune demos and benchmarks.

No pretrained weights or hub data sets can be downloaded, so every task here is
built from data that ships with the installed software:

* vision: scikit-learn's bundled ``load_digits()`` (1797 8x8 grey-scale digits);
  upright digits are the pretraining task, the same images turned by 90 degrees
  are the shifted fine-tuning task;
* text: the CPython standard library, present on every Python install; its code
  (docstrings removed) is the pretraining corpus and its docstrings (English
  prose) are the fine-tuning corpus, tokenised at character level.

All loaders are deterministic (given ``seed`` where they take one) and return
torch tensors. This module imports nothing from ``giva_fx``.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

# --------------------------------------------------------------------------- #
# Vision: scikit-learn digits
# --------------------------------------------------------------------------- #

DIGITS_CLASSES = 10


class DigitsSplit(NamedTuple):
    """Images ``(N, 1, 8, 8)`` float32 and labels ``(N,)`` int64 per split."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@lru_cache(maxsize=4)
def _digits_raw(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 80/20 split of raw pixels in [0, 16], shape (N, 8, 8)."""
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.images.astype(np.float32),
        digits.target.astype(np.int64),
        test_size=0.2,
        random_state=seed,
        stratify=digits.target,
    )
    return x_tr, x_te, y_tr, y_te


def _digits_split(seed: int, quarter_turns: int) -> DigitsSplit:
    """Rotate raw pixels and normalise with the upright training statistics.

    Using the upright statistics for every variant keeps the normalisation a
    property of the pretrained model rather than of the shifted task.
    """
    x_tr, x_te, y_tr, y_te = _digits_raw(seed)
    mean, std = float(x_tr.mean()), float(x_tr.std())

    def prep(x: np.ndarray) -> Tensor:
        x = np.rot90(x, k=quarter_turns, axes=(1, 2))
        return torch.from_numpy(np.ascontiguousarray((x - mean) / std)).unsqueeze(1)

    return DigitsSplit(prep(x_tr), torch.from_numpy(y_tr), prep(x_te), torch.from_numpy(y_te))


def digits_pretrain(seed: int = 0) -> DigitsSplit:
    """Upright digits: the pretraining task (1437 train / 360 test images)."""
    return _digits_split(seed, quarter_turns=0)


def digits_shifted(seed: int = 0, quarter_turns: int = 1) -> DigitsSplit:
    """Digits turned by ``quarter_turns`` x 90 degrees: the fine-tuning task.

    Same images, labels and train/test split as :func:`digits_pretrain`, so only
    the input distribution changes; test images are unseen in any orientation.
    A 90 degree turn keeps the strokes but moves them: upright models score
    near chance before fine-tuning, while their low-level features transfer.
    """
    return _digits_split(seed, quarter_turns=quarter_turns)


# --------------------------------------------------------------------------- #
# Text: character-level corpora from the Python standard library
# --------------------------------------------------------------------------- #

PAD_ID, UNK_ID, CLS_ID, MASK_ID = 0, 1, 2, 3
#: Fixed vocabulary: 4 special tokens, newline and printable ASCII (100 ids).
CHAR_VOCAB: tuple[str, ...] = ("<pad>", "<unk>", "<cls>", "<mask>", "\n") + tuple(
    chr(c) for c in range(32, 127)
)
VOCAB_SIZE = len(CHAR_VOCAB)
_CHAR_TO_ID = {c: i for i, c in enumerate(CHAR_VOCAB) if len(c) == 1}

#: Pure-Python stdlib modules that every CPython 3.11+ install (including
#: Debian's split ``libpython3.x-stdlib``) ships, in a fixed order.
STDLIB_FILES: tuple[str, ...] = (
    "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py",
    "codecs.py", "collections/__init__.py", "configparser.py", "contextlib.py",
    "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "doctest.py",
    "email/message.py", "email/utils.py", "enum.py", "fnmatch.py",
    "fractions.py", "ftplib.py", "functools.py", "gettext.py", "glob.py",
    "heapq.py", "http/client.py", "http/cookiejar.py", "imaplib.py",
    "inspect.py", "ipaddress.py", "json/__init__.py", "locale.py",
    "logging/__init__.py", "mailbox.py", "optparse.py", "os.py", "pathlib.py",
    "pickle.py", "platform.py", "pprint.py", "pydoc.py", "queue.py",
    "random.py", "sched.py", "selectors.py", "shlex.py", "shutil.py",
    "smtplib.py", "socket.py", "statistics.py", "string.py", "subprocess.py",
    "tarfile.py", "tempfile.py", "textwrap.py", "threading.py", "tokenize.py",
    "traceback.py", "typing.py", "unittest/case.py", "urllib/parse.py",
    "urllib/request.py", "uuid.py", "warnings.py", "weakref.py", "zipfile.py",
)  # fmt: skip

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_CHUNK = 2048  # train/val assignment unit, in characters
_VAL_EVERY = 10  # every 10th chunk goes to validation


def encode(text: str) -> Tensor:
    """Map characters to ids (tabs to 4 spaces; anything else unknown -> ``UNK_ID``)."""
    text = text.replace("\t", "    ")
    return torch.tensor([_CHAR_TO_ID.get(c, UNK_ID) for c in text], dtype=torch.long)


def decode(ids: Tensor) -> str:
    """Inverse of :func:`encode` for printing samples (specials as ``<name>``)."""
    return "".join(CHAR_VOCAB[i] for i in ids.tolist())


def _stdlib_trees() -> Iterator[ast.Module]:
    """Parsed ASTs of :data:`STDLIB_FILES`, failing loudly if one is missing."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for rel in STDLIB_FILES:
        yield ast.parse((root / rel).read_text(encoding="utf-8"))


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


@lru_cache(maxsize=1)
def _code_text(max_chars: int) -> str:
    """Stdlib code without docstrings or comments (``ast.unparse``)."""
    parts = []
    for tree in _stdlib_trees():
        for node in ast.walk(tree):
            if isinstance(node, _DOC_NODES) and node.body and _is_docstring(node.body[0]):
                node.body = node.body[1:] or [ast.Pass()]
        parts.append(ast.unparse(tree))
    return "\n\n".join(parts)[:max_chars]


@lru_cache(maxsize=1)
def _prose_text(max_chars: int) -> str:
    """Stdlib docstrings, minus doctest paragraphs: mostly English prose."""
    parts = []
    for tree in _stdlib_trees():
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, _DOC_NODES) else None
            if doc:
                parts.extend(p for p in doc.split("\n\n") if ">>>" not in p)
    return "\n\n".join(parts)[:max_chars]


def _split_stream(text: str) -> tuple[Tensor, Tensor]:
    """Interleaved split: every 10th 2 KB chunk is validation (same distribution)."""
    ids = encode(text)
    chunks = list(ids.split(_CHUNK))
    val = [c for i, c in enumerate(chunks) if i % _VAL_EVERY == _VAL_EVERY - 1]
    train = [c for i, c in enumerate(chunks) if i % _VAL_EVERY != _VAL_EVERY - 1]
    return torch.cat(train), torch.cat(val)


def char_corpus_pretrain(max_chars: int = 600_000) -> tuple[Tensor, Tensor]:
    """Python code of the stdlib as (train, val) id streams: the pretraining corpus."""
    return _split_stream(_code_text(max_chars))


def char_corpus_finetune(max_chars: int = 300_000) -> tuple[Tensor, Tensor]:
    """English docstring prose of the stdlib as (train, val) id streams: the shifted corpus."""
    return _split_stream(_prose_text(max_chars))


def char_batches(
    stream: Tensor, batch: int, seq_len: int, generator: torch.Generator
) -> Iterator[dict[str, Tensor]]:
    """Endless random windows of ``stream`` as causal-LM batches.

    ``labels`` equal ``input_ids``; Hugging Face causal LMs shift them internally.
    """
    while True:
        starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=generator)
        ids = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
        yield {"input_ids": ids, "labels": ids.clone()}


def char_classification(
    seq_len: int = 64, n_train: int = 4000, n_test: int = 1000, seed: int = 0
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Is a character window Python code (label 0) or docstring prose (label 1)?

    Windows of ``seq_len - 1`` characters are prefixed with ``CLS_ID`` (BERT
    pools the first token). Train windows come from the train streams of both
    corpora, test windows from their validation streams; classes are balanced.
    """
    gen = torch.Generator().manual_seed(seed)
    (code_tr, code_va), (prose_tr, prose_va) = char_corpus_pretrain(), char_corpus_finetune()

    def sample(code: Tensor, prose: Tensor, n: int) -> dict[str, Tensor]:
        windows, labels = [], []
        for label, stream in enumerate((code, prose)):
            starts = torch.randint(0, len(stream) - seq_len + 1, (n // 2,), generator=gen)
            windows += [stream[s : s + seq_len - 1] for s in starts.tolist()]
            labels += [label] * (n // 2)
        ids = torch.stack(windows)
        ids = torch.cat([torch.full((len(ids), 1), CLS_ID), ids], dim=1)
        perm = torch.randperm(len(ids), generator=gen)
        return {"input_ids": ids[perm], "labels": torch.tensor(labels)[perm]}

    return sample(code_tr, prose_tr, n_train), sample(code_va, prose_va, n_test)
