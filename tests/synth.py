"""Synthetic stand-in for the challenge data, generated deterministically from a seed.

English-like documents, a small sentencepiece BPE tokenizer and challenge-format shards
(fineweb_train_*.bin, fineweb_val_*.bin), so that tests and the CPU demo need no download.

    python tests/synth.py OUT_DIR    # builds the default dataset, prints the export line
"""
import io
import os
import random
import shlex
import sys
from itertools import chain, islice

import numpy as np
import sentencepiece as spm

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
# Byte fallback needs 256 byte pieces + 4 specials + every covered character (~60 here)
# before the first merge; 512 leaves room for ~190 merges and keeps the model tiny.
VOCAB_SIZE = 512
TOKENIZER_DOCS = 2000  # enough text for the merges; training stays well under a second

WORDS = """the of and to in a is that for it as was with be by on not he this are or his
from at which but have an they you were her she there been one all we their has would when
if so no will more can who out about some up said what its them time into only other new
than could these two may first then do any like my now over such our man me even most made
after also did many before must well back through years much where your way down should
because each just those people how too little state good very make world still own see men
work long here get both between life being under never day same another know while last
might us great old year off come since against go came right used take three don't it's
isn't""".split()
NAMES = "London Mary Google Monday March Paris Alice Bob Python Europe Tuesday".split()
# Rare enough to fall outside character_coverage, so they are encoded as byte pieces.
# All are stable under the tokenizer's NFKC normalization, so decoding gives them back.
RARE = ["café", "naïve", "Zürich", "résumé", "São Paulo",
        "東京", "Ελλάδα", "🙂", "🚀"]


def _number(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return str(rng.randint(1900, 2024))
    if kind == 1:
        return f"{rng.randint(0, 99)}.{rng.randint(0, 9)}"
    if kind == 2:
        return f"{rng.randint(1, 99)}%"
    return f"{rng.randint(1, 9)},{rng.randint(0, 999):03d}"


def _sentence(rng: random.Random) -> str:
    words = []
    for _ in range(rng.randint(4, 14)):
        r = rng.random()
        words.append(_number(rng) if r < 0.06 else rng.choice(NAMES) if r < 0.12
                     else rng.choice(WORDS))
    if rng.random() < 0.1:
        words.insert(rng.randrange(len(words) + 1), rng.choice(RARE))
    if rng.random() < 0.3:
        words[rng.randrange(len(words) - 1)] += ","
    if rng.random() < 0.05:
        words.insert(rng.randrange(1, len(words)), "—")
    words[0] = words[0][0].upper() + words[0][1:]
    return " ".join(words) + rng.choice(".....!?")


def _documents(rng: random.Random):
    # Single spaces and no newlines: the tokenizer's normalizer would collapse anything else,
    # and the tests rely on decode(encode(doc)) == doc.
    while True:
        yield " ".join(_sentence(rng) for _ in range(rng.randint(2, 6)))


def make_text(n_docs: int, seed: int) -> list[str]:
    return list(islice(_documents(random.Random(seed)), n_docs))


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def train_tokenizer(texts, out_dir: str, vocab_size: int = VOCAB_SIZE,
                    byte_fallback: bool = True) -> str:
    """Train a BPE model like the challenge's (same special ids, split digits, NFKC) into
    out_dir/tok.model and return its path. byte_fallback=False gives the challenge tokenizer's
    own behaviour, where uncovered characters become <unk>."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, character_coverage=0.995, byte_fallback=byte_fallback,
        split_digits=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        num_threads=1, minloglevel=2)  # one thread keeps training deterministic; 2 = quiet
    path = os.path.join(out_dir, "tok.model")
    _write_atomic(path, model.getvalue())
    return path


def write_shard(path: str, tokens) -> None:
    """Challenge shard: 256 little-endian int32 (magic, version, token count, zeros), then uint16
    tokens."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 16):
        raise ValueError(f"{path}: tokens must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    _write_atomic(path, header.tobytes() + tokens.astype("<u2").tobytes())


def _token_stream(sp: spm.SentencePieceProcessor, docs):
    # Each document starts with BOS, as in the challenge's shards.
    for doc in docs:
        yield sp.bos_id()
        yield from sp.encode(doc)


def make_dataset(out_dir: str, n_train_shards: int = 2, train_tokens_per_shard: int = 200_000,
                 val_docs: int = 350, seed: int = 0, vocab_size: int = VOCAB_SIZE,
                 byte_fallback: bool = True) -> dict:
    """Write out_dir/{tok.model, fineweb_train_00000i.bin, fineweb_val_000000.bin}.

    Train shards hold exactly train_tokens_per_shard tokens each, cut from one document stream
    (a document may continue into the next shard); the val shard holds val_docs whole documents
    (about 85 tokens each), returned as val_text."""
    os.makedirs(out_dir, exist_ok=True)
    train_docs = _documents(random.Random(f"train/{seed}"))
    head = list(islice(train_docs, TOKENIZER_DOCS))
    tokenizer_path = train_tokenizer(head, out_dir, vocab_size, byte_fallback)
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)

    tokens = _token_stream(sp, chain(head, train_docs))
    for i in range(n_train_shards):
        shard = np.fromiter(islice(tokens, train_tokens_per_shard), np.uint16,
                            train_tokens_per_shard)
        write_shard(os.path.join(out_dir, f"fineweb_train_{i:06d}.bin"), shard)

    val_text = list(islice(_documents(random.Random(f"val/{seed}")), val_docs))
    write_shard(os.path.join(out_dir, "fineweb_val_000000.bin"), list(_token_stream(sp, val_text)))
    return dict(data_path=out_dir, tokenizer_path=tokenizer_path, vocab_size=vocab_size,
                val_text=val_text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/synth.py OUT_DIR")
    ds = make_dataset(os.path.abspath(sys.argv[1]))
    print(f"export DATA_PATH={shlex.quote(ds['data_path'])} "
          f"TOKENIZER_PATH={shlex.quote(ds['tokenizer_path'])} VOCAB_SIZE={ds['vocab_size']}")
