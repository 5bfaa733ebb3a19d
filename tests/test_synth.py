"""Checks of the synthetic data generator itself, so other tests can trust what it builds."""
import os
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import synth

SMALL = dict(n_train_shards=2, train_tokens_per_shard=20_000, val_docs=60)


def read_shard(path):
    header = np.fromfile(path, dtype="<i4", count=synth.HEADER_INTS)
    return header, np.fromfile(path, dtype="<u2", offset=4 * synth.HEADER_INTS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synth.make_dataset(str(tmp_path_factory.mktemp("synth")), seed=0, **SMALL)


def test_shard_header_and_size(dataset):
    names = sorted(os.listdir(dataset["data_path"]))
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                     "fineweb_val_000000.bin", "tok.model"]
    for name in names[:3]:
        path = os.path.join(dataset["data_path"], name)
        header, tokens = read_shard(path)
        assert list(header[:3]) == [20240520, 1, tokens.size] and not header[3:].any()
        assert os.path.getsize(path) == 4 * 256 + 2 * tokens.size
        if "train" in name:
            assert tokens.size == SMALL["train_tokens_per_shard"]


def test_tokens_fit_vocab(dataset):
    sp = spm.SentencePieceProcessor(model_file=dataset["tokenizer_path"])
    assert sp.vocab_size() == dataset["vocab_size"] and sp.bos_id() == 1
    for name in os.listdir(dataset["data_path"]):
        if name.endswith(".bin"):
            assert read_shard(os.path.join(dataset["data_path"], name))[1].max() < sp.vocab_size()


def test_val_shard_decodes_to_val_text(dataset):
    sp = spm.SentencePieceProcessor(model_file=dataset["tokenizer_path"])
    tokens = read_shard(os.path.join(dataset["data_path"], "fineweb_val_000000.bin"))[1]
    assert tokens[0] == sp.bos_id()
    docs = np.split(tokens, np.flatnonzero(tokens == sp.bos_id())[1:])
    assert [sp.decode(doc[1:].tolist()) for doc in docs] == dataset["val_text"]
    assert any(sp.is_byte(int(t)) for t in tokens), "rare characters should use byte fallback"


def test_deterministic(dataset, tmp_path):
    def files(path):
        return {p.name: p.read_bytes() for p in Path(path).iterdir()}
    same = synth.make_dataset(str(tmp_path / "same"), seed=0, **SMALL)
    assert files(same["data_path"]) == files(dataset["data_path"])
    assert synth.make_text(5, seed=1) == synth.make_text(5, seed=1) != synth.make_text(5, seed=2)


def test_without_byte_fallback_rare_chars_are_unk(tmp_path):
    # The challenge's own tokenizer has no byte pieces: uncovered characters become <unk>.
    sp = spm.SentencePieceProcessor(
        model_file=synth.train_tokenizer(synth.make_text(2000, seed=0), str(tmp_path),
                                         byte_fallback=False))
    tokens = sp.encode(" ".join(synth.RARE))
    assert sp.unk_id() == 3 and sp.unk_id() in tokens
    assert not any(sp.is_byte(t) for t in range(sp.vocab_size()))
