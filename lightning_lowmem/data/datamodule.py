"""``CharTextDataModule``: next-byte prediction on the stdlib docstring corpus.

Tokens are the text's UTF-8 bytes (:func:`encode`, :func:`decode`): a vocabulary of 256 ids and no
tokenizer to download.

The corpus (see :mod:`lightning_lowmem.data.corpus`) is split once: the first 90% of its bytes train,
the last 10% validate. Each split is cut into windows of ``block_size + 1`` bytes, one every ``block_size``;
a window gives the input ``x = window[:-1]`` and the target ``y = window[1:]``. Training windows are
shuffled by a generator seeded with ``seed``, so two runs with the same seed see the same batches.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_lowmem.data.corpus import VOCAB_SIZE, load_corpus


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a ``torch.uint8`` tensor of token ids in ``[0, 256)``."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def decode(tokens: torch.Tensor | list[int]) -> str:
    """Text from byte tokens; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
    values = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
    return bytes(values).decode("utf-8", errors="replace")


class TokenBlocks(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``(x, y)`` windows of a 1-D token tensor, one every ``block_size`` tokens, ``y`` shifted by one.

    Args:
        tokens: 1-D tensor of token ids.
        block_size: length of ``x`` and ``y``.

    Raises:
        ValueError: if ``tokens`` is shorter than one window of ``block_size + 1`` tokens.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        if tokens.numel() < block_size + 1:
            raise ValueError(
                f"Cannot cut windows of block_size={block_size} from {tokens.numel()} tokens; "
                f"use a block_size below {tokens.numel()}."
            )
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.block_size
        window = self.tokens[start : start + self.block_size + 1].long()
        return window[:-1], window[1:]


class CharTextDataModule(L.LightningDataModule):
    """Byte-level language modelling on the Python standard library's docstrings (about 1.2 MB).

    Args:
        block_size: tokens per training sequence.
        batch_size: sequences per batch, for training and validation.
        val_fraction: the fraction of the corpus, taken from its end, held out for validation.
        seed: seeds the shuffling of the training windows.
        cache_dir: folder of the corpus cache file; ``~/.cache/lightning_lowmem`` when ``None``.

    Raises:
        ValueError: for a non-positive ``block_size`` or ``batch_size``, a ``val_fraction`` outside
            ``(0, 1)``, or (in ``setup``) a ``block_size`` too long for the validation split.

    Example::

        >>> datamodule = CharTextDataModule(block_size=128, batch_size=32)
        >>> trainer.fit(model, datamodule=datamodule)
    """

    vocab_size = VOCAB_SIZE

    def __init__(
        self,
        block_size: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        seed: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
        self.save_hyperparameters()
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.cache_dir = cache_dir
        self.train_set: TokenBlocks | None = None
        self.val_set: TokenBlocks | None = None

    def prepare_data(self) -> None:
        """Build the corpus cache file (once, on one process)."""
        load_corpus(self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load the corpus and split it into training and validation windows."""
        if self.train_set is not None:
            return
        tokens = encode(load_corpus(self.cache_dir))
        n_train = int(tokens.numel() * (1.0 - self.val_fraction))
        self.train_set = TokenBlocks(tokens[:n_train], self.block_size)
        self.val_set = TokenBlocks(tokens[n_train:], self.block_size)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, the order fixed by ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        # The data is one in-memory tensor: worker processes would only add start-up time.
        return DataLoader(self._dataset("train"), batch_size=self.batch_size, shuffle=True, generator=generator,
                          num_workers=0, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in corpus order."""
        return DataLoader(self._dataset("val"), batch_size=self.batch_size, shuffle=False, num_workers=0)

    def _dataset(self, split: str) -> TokenBlocks:
        dataset = self.train_set if split == "train" else self.val_set
        if dataset is None:
            raise RuntimeError(f"CharTextDataModule.setup() must run before the {split} dataloader is requested.")
        return dataset
