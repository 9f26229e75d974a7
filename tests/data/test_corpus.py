"""Tests of the stdlib docstring corpus and its datamodule."""

import sys

import pytest
import torch

from lightning_lowmem.data import VOCAB_SIZE, CharTextDataModule, TokenBlocks, corpus_path, decode, encode, load_corpus
from lightning_lowmem.data.corpus import build_corpus


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus_cache")


@pytest.fixture(scope="module")
def text(cache_dir):
    return load_corpus(cache_dir)


def test_corpus_is_nontrivial_english(text):
    n_bytes = len(text.encode("utf-8"))
    assert 1_000_000 <= n_bytes <= 3_000_000, n_bytes
    for phrase in ("Return a ", "the ", "argument", "If the", "dictionary"):
        assert phrase in text
    assert text.count("\n\n") > 3000  # thousands of separate docstrings


def test_corpus_is_cached(cache_dir, text):
    path = corpus_path(cache_dir)
    assert path.is_file() and path.read_text(encoding="utf-8") == text
    assert load_corpus(cache_dir) == text


def test_corpus_does_not_depend_on_the_calling_process(text, tmp_path):
    # pytest replaces sys.unraisablehook in this process; the corpus is built in a fresh interpreter.
    assert sys.unraisablehook is not sys.__unraisablehook__
    assert "Handle an unraisable exception." in text
    assert "Handle an unraisable exception." not in build_corpus(("sys",))  # what an in-process build sees
    assert load_corpus(tmp_path) == text  # a second, independent build


def test_unimportable_module_is_skipped():
    assert build_corpus(("json", "no_such_module_xyz")) == build_corpus(("json",))
    assert "JSON" in build_corpus(("json",))


def test_encode_decode_round_trip():
    tokens = encode("héllo")
    assert tokens.dtype == torch.uint8 and tokens.tolist() == list("héllo".encode())
    assert decode(tokens) == "héllo"
    assert decode(tokens[:2]) == "h\ufffd"  # a cut multi-byte character


def test_token_blocks_are_shifted_windows():
    blocks = TokenBlocks(torch.arange(10, dtype=torch.uint8), block_size=3)
    assert len(blocks) == 3
    x, y = blocks[1]
    assert x.tolist() == [3, 4, 5] and y.tolist() == [4, 5, 6] and x.dtype == torch.long
    with pytest.raises(ValueError, match="block_size=10 from 10 tokens"):
        TokenBlocks(torch.arange(10), block_size=10)


def test_datamodule_split_and_batches(cache_dir, text):
    dm = CharTextDataModule(block_size=32, batch_size=8, cache_dir=cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    n = len(text.encode("utf-8"))
    train_tokens, val_tokens = dm.train_set.tokens, dm.val_set.tokens
    assert train_tokens.numel() + val_tokens.numel() == n
    assert abs(val_tokens.numel() / n - 0.1) < 1e-3
    assert torch.equal(torch.cat([train_tokens, val_tokens]), encode(text))  # validation = the last 10%
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < VOCAB_SIZE
    xv, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(xv[0], val_tokens[:32].long())


def test_training_order_is_seeded(cache_dir):
    def first_batches(seed):
        dm = CharTextDataModule(block_size=16, batch_size=4, seed=seed, cache_dir=cache_dir)
        dm.setup("fit")
        loader = iter(dm.train_dataloader())
        return [next(loader)[0] for _ in range(3)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 0}, "block_size must be a positive int, got 0"),
        ({"batch_size": -1}, "batch_size must be a positive int, got -1"),
        ({"val_fraction": 1.0}, "val_fraction must be in \\(0, 1\\), got 1.0"),
        ({"val_fraction": float("nan")}, "val_fraction must be in \\(0, 1\\), got nan"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CharTextDataModule(**kwargs)
