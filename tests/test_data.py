"""The DATA section of train_gpt.py: the memory-mapped token stream against a plain reading of the
concatenated shards, the shards read before the clock, and how the shards are found."""
import os
import re

import numpy as np
import pytest
import torch

import synth
import train_gpt as tg

CPU = torch.device("cpu")


def write_shards(folder, sizes, rng, vocab=500) -> list[np.ndarray]:
    """Train shards of the given token counts (0 allowed) in folder; returns their tokens."""
    os.makedirs(folder, exist_ok=True)
    shards = [rng.integers(0, vocab, n) for n in sizes]
    for i, tokens in enumerate(shards):
        synth.write_shard(os.path.join(folder, f"fineweb_train_{i:06d}.bin"), tokens)
    return shards


def reference_span(stream: np.ndarray, start: int, n: int) -> np.ndarray:
    """n tokens of the stream repeated forever, from position start."""
    return stream[(start + np.arange(n)) % len(stream)]


@pytest.mark.parametrize("seed", range(6))
def test_loader_batches_are_the_plain_streams_slices(tmp_path, seed):
    """Micro-step k on rank r of W is the plain stream's tokens [k*W*s + r*s, k*W*s + (r+1)*s),
    s = tokens + 1, the stream being the shards concatenated and repeated: across shard boundaries,
    empty shards, spans longer than a shard, the wrap-around, and several world sizes."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([0, 1, 7, 50, 333, 1000], size=rng.integers(1, 6)).tolist()
    if sum(sizes) == 0:
        sizes.append(13)
    stream = np.concatenate(write_shards(tmp_path, sizes, rng))
    files = tg.find_shards(str(tmp_path), "train", 1)
    for world in (1, 2, 3, 8):
        seq_len = int(rng.choice([1, 4, 16]))
        local = seq_len * int(rng.integers(1, 20))
        span = local + 1
        steps = 3 * len(stream) // (span * world) + 3  # the stream wraps around at least twice
        for rank in range(world):
            loader = tg.DistributedTokenLoader(files, rank, world, CPU, "stream", 0)
            for k in range(steps):
                x, y = loader.next_batch(local, seq_len)
                expected = reference_span(stream, k * world * span + rank * span, span)
                assert x.dtype == y.dtype == torch.int64
                assert x.shape == y.shape == (local // seq_len, seq_len)
                np.testing.assert_array_equal(x.flatten().numpy(), expected[:-1])
                np.testing.assert_array_equal(y.flatten().numpy(), expected[1:])


def position_loaders(files, sizes, world, order, seed) -> list:
    """Each rank's loader, its shards swapped for their tokens' positions in the stream, so a batch
    says where it read."""
    starts = np.cumsum([0] + sizes)
    loaders = [tg.DistributedTokenLoader(files, r, world, CPU, order, seed) for r in range(world)]
    for loader in loaders:
        loader.shards = [np.arange(a, b) for a, b in zip(starts, starts[1:])]
    return loaders


@pytest.mark.parametrize("seed", range(6))
def test_strided_order_reads_every_block_once_a_lap_and_each_rank_its_share(tmp_path, seed):
    """DATA_ORDER=strided: each row of a batch is a block of the plain stream (x its tokens
    [b*L, b*L + L), y the same shifted by one), never one across the stream's end; over a lap of
    the N = (tokens - 1) // L blocks the ranks' rows are every block exactly once, whatever the
    world size and rows per rank; the next lap is every block once again, in another order; and the
    order is the seed's alone."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([0, 1, 7, 50, 333, 1000], size=rng.integers(1, 6)).tolist() + [40]
    stream = np.concatenate(write_shards(tmp_path, sizes, rng))
    files = tg.find_shards(str(tmp_path), "train", 1)
    seq_len = int(rng.choice([1, 4, 16]))
    num_blocks = (len(stream) - 1) // seq_len
    laps = {}
    for world in (1, 2, 3, 8):
        rows = int(rng.integers(1, 6))
        calls = -(-2 * num_blocks // (world * rows))  # two laps at least
        real = [tg.DistributedTokenLoader(files, r, world, CPU, "strided", seed)
                for r in range(world)]
        read = []  # the global batches' blocks in order: call by call, rank by rank
        for _ in range(calls):
            for loader, where in zip(real, position_loaders(files, sizes, world, "strided", seed)):
                where.calls = loader.calls
                (x, y), (px, py) = loader.next_batch(rows * seq_len, seq_len), where.next_batch(
                    rows * seq_len, seq_len)
                assert (x.shape == y.shape == (rows, seq_len) and x.is_contiguous()
                        and y.is_contiguous())
                assert (px[:, 0] % seq_len == 0).all()
                np.testing.assert_array_equal(px.numpy(), px[:, :1].numpy() + np.arange(seq_len))
                np.testing.assert_array_equal(py.numpy(), px.numpy() + 1)
                np.testing.assert_array_equal(x.numpy(), stream[px.numpy()])
                np.testing.assert_array_equal(y.numpy(), stream[py.numpy()])
                read += (px[:, 0] // seq_len).tolist()
        first, second = read[:num_blocks], read[num_blocks:2 * num_blocks]
        assert sorted(first) == sorted(second) == list(range(num_blocks))
        if num_blocks >= 8:
            assert first != second
        laps[world] = first
    assert len(set(map(tuple, laps.values()))) == 1  # the seed's order, whatever the world
    where = position_loaders(files, sizes, 1, "strided", seed + 1)[0]
    other = [int(where.next_batch(seq_len, seq_len)[0][0, 0]) // seq_len for _ in range(num_blocks)]
    assert sorted(other) == list(range(num_blocks)) and (num_blocks < 8 or other != laps[1])


@pytest.mark.parametrize("order", tg.DATA_ORDERS)
@pytest.mark.parametrize("seed", range(4))
def test_read_before_clock_covers_what_warmup_and_calibration_read(tmp_path, monkeypatch, seed,
                                                                   order):
    """The pieces read_before_clock lists (checked before the warm-up) are exactly the tokens the
    ranks' loaders read in the warm-up's steps (or the one step of GPTQ's calibration when there is
    no warm-up), a shard's pieces in order and apart: none left unchecked, none checked unread."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([0, 100, 2000, 10_000], size=rng.integers(2, 7)).tolist() + [500]
    write_shards(tmp_path, sizes, rng)
    starts = np.cumsum([0] + sizes)
    files = tg.find_shards(str(tmp_path), "train", 1)
    world, accum, seq_len = int(rng.choice([1, 2, 8])), int(rng.choice([1, 2])), 8
    warmup = int(rng.choice([0, 1, 3, 20]))
    batch = world * accum * seq_len * int(rng.integers(1, 40))
    config = dict(TRAIN_BATCH_TOKENS=batch, GRAD_ACCUM_STEPS=accum, TRAIN_SEQ_LEN=seq_len,
                  WARMUP_STEPS=warmup, DATA_ORDER=order, SEED=seed)
    for name, value in config.items():
        monkeypatch.setenv(name, str(value))
    args = tg.Hyperparameters(world)
    read = set()
    for loader in position_loaders(files, sizes, world, order, seed):
        for _ in range(max(warmup, 1) * accum):
            x, y = loader.next_batch(args.micro_batch_tokens, seq_len)
            positions = np.union1d(x.numpy(), y.numpy())
            shard = np.searchsorted(starts, positions, side="right") - 1
            read |= set(zip(shard.tolist(), (positions - starts[shard]).tolist()))
    listed = tg.read_before_clock(args, files)
    assert {(files.index(f), j) for f, a, b in listed for j in range(a, b)} == read
    keys = [(files.index(f), a, b) for f, a, b in listed]
    assert keys == sorted(keys) and all(i != j or b < c
                                        for (i, _, b), (j, c, _) in zip(keys, keys[1:]))


def test_find_shards_lists_a_folder_named_with_glob_characters(tmp_path):
    """DATA_PATH=.../data[1] is a name, not a pattern: as one it found the shards of .../data1."""
    rng = np.random.default_rng(0)
    write_shards(tmp_path / "data[1]", [10, 20], rng)
    write_shards(tmp_path / "data1", [30, 40, 50], rng)
    (tmp_path / "data[1]" / "fineweb_train_x.bin.tmp").write_bytes(b"")  # not a shard's name
    files = tg.find_shards(str(tmp_path / "data[1]"), "train", 1)
    assert files == [str(tmp_path / "data[1]" / f"fineweb_train_{i:06d}.bin") for i in range(2)]


def test_load_shard_checks_ids_only_when_asked(tmp_path):
    path = str(tmp_path / "fineweb_train_000000.bin")
    synth.write_shard(path, [1, 2, 700, 3])
    with pytest.raises(tg.ConfigError, match=r"\.bin: token id 700 is outside VOCAB_SIZE=512"):
        tg.load_shard(path, 512)
    assert tg.load_shard(path).tolist() == [1, 2, 700, 3]  # the loader's reading: no scan
    assert tg.load_shard(path, 701).tolist() == [1, 2, 700, 3]
    synth.write_shard(path, [])
    assert len(tg.load_shard(path, 512)) == 0


def test_a_later_shard_that_fails_in_the_scan_is_one_config_error_after_the_reduce(tmp_path,
                                                                                   monkeypatch):
    """The background scan of the later shards must not raise in its thread: a rank whose read
    fails would skip the all-reduce the other ranks wait in. It reports the shard as bad, and wait()
    turns the failure into one ConfigError naming the shard."""
    files = [str(tmp_path / f"fineweb_train_{i:06d}.bin") for i in range(3)]
    write_shards(tmp_path, [4000, 4000, 4000], np.random.default_rng(0))
    monkeypatch.setenv("TRAIN_BATCH_TOKENS", "256")
    monkeypatch.setenv("GRAD_ACCUM_STEPS", "1")
    monkeypatch.setenv("TRAIN_SEQ_LEN", "64")
    monkeypatch.setenv("WARMUP_STEPS", "1")
    monkeypatch.setenv("VOCAB_SIZE", "512")
    monkeypatch.setenv("DATA_ORDER", "stream")  # the warm-up reads shard 0 alone
    args = tg.Hyperparameters(1)
    assert tg.read_before_clock(args, files) == [(files[0], 0, 257)]
    real = np.memmap

    def failing(path, *a, **kw):  # root reads past permissions: the read itself fails
        if path == files[2]:
            raise PermissionError(13, "Permission denied")
        return real(path, *a, **kw)
    monkeypatch.setattr(tg.np, "memmap", failing)
    wait = tg.check_train_ids(args, files, 0, 1, CPU)
    with pytest.raises(tg.ConfigError,
                       match="^" + re.escape(f"{files[2]}: cannot read it (Permission denied)")):
        wait()
