"""Data for examples and tests: a byte-level corpus of the Python standard library's docstrings."""

from lightning_lowmem.data.corpus import VOCAB_SIZE, build_corpus, corpus_path, load_corpus
from lightning_lowmem.data.datamodule import CharTextDataModule, TokenBlocks, decode, encode

__all__ = [
    "VOCAB_SIZE",
    "CharTextDataModule",
    "TokenBlocks",
    "build_corpus",
    "corpus_path",
    "decode",
    "encode",
    "load_corpus",
]
