"""Evaluation (window plan, Evaluator, bits-per-byte accounting) and export (quantization, size
budget, artifact file) of train_gpt.py, on CPU with data the tests generate themselves."""
import hashlib
import json
import math
import os
import re
import socket
import struct
import types
from contextlib import contextmanager

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import zstandard

import parts
import synth
import train_gpt as tg

CPU = torch.device("cpu")


# -----------------------------
# helpers
# -----------------------------


def hash_nll(x, y):
    """Deterministic fake per-token NLL that depends on every input token of the window up to and
    including the position (a rolling hash) and on the target. Values are float32 in [0.25, 10.25),
    so float64 sums of up to ~10^5 of them are exact and do not depend on the summation order."""
    h = torch.zeros(x.size(0), dtype=torch.int64)
    out = []
    for t in range(x.size(1)):
        h = (h * 1000003 + x[:, t] + 1) % 2147483647
        out.append(((h * 31 + y[:, t]) % 9973).float() / 997.3 + 0.25)
    return torch.stack(out, dim=1)


def tiny_gpt(seed=0):
    """A small real GPT in float32 whose output depends on the whole context: the output projections
    (zero at init, which would leave only the current and previous token) are randomized."""
    torch.manual_seed(seed)
    model = tg.GPT(vocab_size=synth.VOCAB_SIZE, num_layers=2, model_dim=32, num_heads=4,
                   num_kv_heads=2, mlp_mult=2, max_seq_len=64, bigram_vocab_size=64, bigram_dim=16,
                   xsa_last_n=1, coda_last_n=1, act_dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model.eval()


def row_by_row(model):
    """nll_fn that runs the model on one window at a time: its per-row output cannot depend on what
    else is in the batch, so any difference between batchings is the evaluator's."""
    @torch.no_grad()
    def nll_fn(x, y):
        return torch.cat([model.token_nll(x[i:i + 1], y[i:i + 1]) for i in range(x.size(0))])
    return nll_fn


def reference_eval(tokens, seq_len, stride, nll_fn, luts):
    """Straightforward evaluation: one window at a time from plan_windows (checked on its own
    below)."""
    n = tokens.numel() - 1
    L = min(seq_len, n)
    nll, count, nbytes = 0.0, 0, 0
    for start, first in tg.plan_windows(n, L, stride):
        x, y = tokens[start:start + L][None], tokens[start + 1:start + L + 1][None]
        nll += nll_fn(x, y)[0, first:].double().sum().item()
        count += L - first
        nbytes += int(tg.token_bytes(x[0, first:], y[0, first:], luts).sum())
    loss = nll / count
    return loss, loss / math.log(2.0) * count / nbytes, count, nbytes


def bytes_from_sp(sp, tokens):
    """Bytes of the targets tokens[1:], straight from the sentencepiece model (not from the
    LUTs)."""
    def boundary(i):
        return sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
    total = 0
    for prev, tok in zip(tokens[:-1].tolist(), tokens[1:].tolist()):
        if boundary(tok):
            continue
        if sp.is_byte(tok):
            total += 1
            continue
        piece = sp.id_to_piece(tok)
        total += (len(piece.lstrip("▁").encode()) if piece.startswith("▁")
                  else len(piece.encode()))
        total += piece.startswith("▁") and not boundary(prev)
    return total


@contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def dataset_tokens(ds):
    files = tg.find_shards(ds["data_path"], "val", 2)
    sp = spm.SentencePieceProcessor(model_file=ds["tokenizer_path"])
    return tg.load_validation_tokens(files, ds["vocab_size"]), sp


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small CPU ops run faster on one thread, and a 2-core machine shared with other jobs makes
    multi-threaded OpenMP spin: one thread keeps these tests fast and the float results
    reproducible."""
    with num_threads(1):
        yield


@pytest.fixture(scope="module")
def ds_bytes(tmp_path_factory):
    return synth.make_dataset(str(tmp_path_factory.mktemp("bf")), n_train_shards=1,
                              train_tokens_per_shard=1000, byte_fallback=True)


@pytest.fixture(scope="module")
def ds_unk(tmp_path_factory):
    return synth.make_dataset(str(tmp_path_factory.mktemp("unk")), n_train_shards=1,
                              train_tokens_per_shard=1000, byte_fallback=False)


@pytest.fixture(scope="module")
def val(ds_bytes):
    tokens, sp = dataset_tokens(ds_bytes)
    return tokens, sp, tg.build_byte_luts(sp, CPU)


# -----------------------------
# plan_windows
# -----------------------------


def check_plan(n, seq_len, stride):
    windows = tg.plan_windows(n, seq_len, stride)
    L = min(seq_len, n)
    scored = []
    for k, (start, first) in enumerate(windows):
        assert 0 <= start and start + L <= n, (n, seq_len, stride, windows)  # inside the stream
        assert 0 <= first < L, (n, seq_len, stride, windows)  # scores at least one target
        if k == 0:
            assert (start, first) == (0, 0)  # the first window scores all its targets
        else:
            # every target it scores has at least seq_len - stride tokens of left context in the
            # window
            assert first >= L - stride, (n, seq_len, stride, windows)
        scored.extend(range(start + first, start + L))
    # every target exactly once, in order (so the context of target t is
    # t - start >= min(t, L - stride))
    assert scored == list(range(n)), (n, seq_len, stride)
    expected_windows = 1 if n <= L else 1 + math.ceil((n - L) / stride)
    assert len(windows) == expected_windows, (n, seq_len, stride)  # no window more than needed
    if stride == seq_len:  # the scored spans are the plain non-overlapping chunks
        spans = [(s + f, s + L) for s, f in windows]
        assert spans == [(a, min(a + L, n)) for a in range(0, n, L)], (n, seq_len)


def test_plan_windows_scores_every_target_once_with_most_context():
    for seq_len in (1, 7, 16, 32):
        for stride in range(1, seq_len + 1):
            for n in range(1, 301):
                check_plan(n, seq_len, stride)


def test_plan_windows_record_shape():
    # The record configuration on a stream like the real one (62M targets is too slow here; the
    # logic only depends on n mod stride and n < seq_len).
    for n in (2047, 2048, 2049, 2048 + 63, 2048 + 64, 2048 + 65, 10 ** 5 + 17):
        check_plan(n, 2048, 64)
        check_plan(n, 2048, 2048)


# -----------------------------
# Evaluator
# -----------------------------

EVAL_CASES = [  # (targets, seq_len, stride, batch_tokens)
    (1000, 32, 8, 32 * 7),
    (1000, 32, 32, 32 * 3),   # plain, stream not a multiple of seq_len
    (1024, 32, 32, 32 * 5),   # plain, multiple of seq_len
    (300, 32, 1, 32 * 64),
    (1000, 32, 13, 32 * 100),  # one batch holds all 76 windows, padded to 100
    (20, 32, 8, 32),          # stream shorter than one window
    (33, 32, 32, 32),         # one full window plus one target
]


@pytest.mark.parametrize("n,seq_len,stride,batch_tokens", EVAL_CASES)
def test_evaluator_matches_reference(val, n, seq_len, stride, batch_tokens):
    tokens, sp, luts = val
    tokens = tokens[:n + 1]
    ev = tg.Evaluator(tokens, seq_len, stride, luts, CPU, 0, 1, batch_tokens=batch_tokens)
    got = ev(hash_nll)
    assert got == reference_eval(tokens, seq_len, stride, hash_nll, luts)  # exact: sums are exact
    assert got[2] == n  # every target once
    assert got[3] == bytes_from_sp(sp, tokens)


def test_plain_equals_stride_seq_len_and_literal_chunks(val):
    """stride == seq_len is the plain evaluation. On a stream that is a whole number of windows that
    is literally non-overlapping chunks; otherwise the last partial chunk is scored in a full window
    ending at the stream's end (more context than a shorter last window would give)."""
    tokens, _, luts = val
    L = 32
    for n in (1024, 1000):
        t = tokens[:n + 1]
        plain = tg.Evaluator(t, L, L, luts, CPU, 0, 1, batch_tokens=4 * L)(hash_nll)
        nll = count = 0
        for a in range(0, n, L):
            start = min(a, n - L)  # the last chunk inside a full window ending at the stream's end
            x, y = t[start:start + L][None], t[start + 1:start + L + 1][None]
            nll += hash_nll(x, y)[0, a - start:].double().sum().item()
            count += L - (a - start)
        assert count == n and plain[0] == nll / n
        if n % L == 0:  # also equal to each chunk on its own
            chunks = t[:n].view(-1, L), t[1:n + 1].view(-1, L)
            assert plain[0] == hash_nll(*chunks).double().sum().item() / n


def test_evaluator_whole_val_stream_counts(val, ds_bytes):
    """On the whole validation split: tokens = len - 1 and bytes = the documents' UTF-8 bytes."""
    tokens, sp, luts = val
    loss, bpb, n_tokens, n_bytes = tg.Evaluator(tokens, 64, 16, luts, CPU, 0, 1,
                                                batch_tokens=4096)(hash_nll)
    assert n_tokens == tokens.numel() - 1
    assert n_bytes == sum(len(d.encode("utf-8")) for d in ds_bytes["val_text"])
    assert bpb == pytest.approx(loss / math.log(2) * n_tokens / n_bytes, rel=1e-15)


@pytest.fixture(scope="module")
def gpt():
    model = tiny_gpt()
    # The test needs an nll that depends on the whole window: change only the first token.
    x = torch.randint(0, synth.VOCAB_SIZE, (1, 32), generator=torch.Generator().manual_seed(0))
    x2 = x.clone()
    x2[0, 0] = (x[0, 0] + 1) % synth.VOCAB_SIZE
    with torch.no_grad():
        assert (model.token_nll(x, x)[0, -1] - model.token_nll(x2, x)[0, -1]).abs() > 1e-4
    return model


def test_evaluator_real_model_sliding_plain_batches(val, gpt):
    tokens, sp, luts = val
    tokens = tokens[:601]
    nll_fn = row_by_row(gpt)
    L = 32
    results = {}
    for stride in (8, L):
        ref = reference_eval(tokens, L, stride, nll_fn, luts)
        for bt in (L, 3 * L, 7 * L, 100 * L):  # 3, 7, 100 windows a batch: the last batch is padded
            results[stride, bt] = tg.Evaluator(tokens, L, stride, luts, CPU, 0, 1,
                                               batch_tokens=bt)(nll_fn)
            assert results[stride, bt] == ref  # bit-identical whatever the batching
        assert ref[2] == 600 and ref[3] == bytes_from_sp(sp, tokens)
    plain, sliding = results[L, L], results[8, L]
    assert plain[2:] == sliding[2:] and plain[0] != sliding[0]  # same targets, different context


def test_evaluator_splits_windows_across_ranks(val):
    tokens, _, luts = val
    tokens = tokens[:1001]
    for L, stride in ((32, 8), (32, 32), (2000, 64)):
        plan = tg.plan_windows(1000, min(L, 1000), stride)
        for world in (1, 2, 3, 5, len(plan) + 2):  # more ranks than windows: some ranks get none
            parts = [tg.Evaluator(tokens, L, stride, luts, CPU, r, world).windows.tolist()
                     for r in range(world)]
            assert [tuple(w) for p in parts for w in p] == plan
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


# the last: 1 window, 2 ranks
DIST_CASES = [(600, 32, 8, 3 * 32), (600, 32, 32, 2 * 32), (20, 32, 8, 32)]


def _dist_worker(rank, world_size, port, tokens, luts, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        nll_fn = row_by_row(tiny_gpt())  # built and seeded in each process
        results = []
        for n, L, stride, bt in DIST_CASES:
            ev = tg.Evaluator(tokens[:n + 1], L, stride, luts, CPU, rank, world_size,
                              batch_tokens=bt)
            loss, bpb, n_tokens, n_bytes = ev(nll_fn)
            results.append([loss.hex(), bpb.hex(), n_tokens, n_bytes])
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evaluator_two_ranks_gloo_equals_one(val, tmp_path):
    tokens, _, luts = val
    tokens = tokens[:1001].clone()
    out = tmp_path / "dist.json"
    mp.spawn(_dist_worker, args=(2, free_port(), tokens, luts, str(out)), nprocs=2, join=True)
    got = json.loads(out.read_text())
    nll_fn = row_by_row(tiny_gpt())
    for (n, L, stride, bt), (loss, bpb, n_tokens, n_bytes) in zip(DIST_CASES, got):
        one = tg.Evaluator(tokens[:n + 1], L, stride, luts, CPU, 0, 1, batch_tokens=bt)(nll_fn)
        assert (n_tokens, n_bytes) == one[2:]
        assert float.fromhex(loss) == pytest.approx(one[0], rel=1e-12, abs=0)
        assert float.fromhex(bpb) == pytest.approx(one[1], rel=1e-12, abs=0)


# -----------------------------
# bits-per-byte accounting
# -----------------------------


def test_byte_luts_byte_fallback_equal_text_bytes(ds_bytes):
    """With byte fallback every character is covered, and the rule gives exactly the UTF-8 size of
    the documents: the stream is BOS doc BOS doc ...; the first token (a BOS) is never a target;
    every later BOS is a 0-byte boundary; each document's first piece follows a BOS, so the
    dummy-prefix space sentencepiece adds (and decode drops) is not counted; every other "▁" is a
    real space."""
    tokens, sp = dataset_tokens(ds_bytes)
    assert sp.is_byte(sp.piece_to_id("<0x41>"))  # the model really has byte pieces
    luts = tg.build_byte_luts(sp, CPU)
    assert (tokens[0] == sp.bos_id()
            and int((tokens == sp.bos_id()).sum()) == len(ds_bytes["val_text"]))
    used_byte_tokens = sum(sp.is_byte(t) for t in set(tokens.tolist()))
    assert used_byte_tokens > 5  # the rare words really go through byte pieces
    n = int(tg.token_bytes(tokens[:-1], tokens[1:], luts).sum())
    assert n == sum(len(doc.encode("utf-8")) for doc in ds_bytes["val_text"])
    assert n == bytes_from_sp(sp, tokens)
    # decode(encode(doc)) == doc, so this is also the decoded text's size
    assert n == sum(len(sp.decode(sp.encode(doc)).encode()) for doc in ds_bytes["val_text"])


def test_byte_luts_without_byte_fallback(ds_unk):
    """Without byte fallback, uncovered characters become <unk> (consecutive ones one token). The
    rule (the challenge's own: unk counts 0 and is a boundary) then counts the UTF-8 bytes of the
    text minus the characters under <unk>, minus the space right after each <unk> (the next piece's
    "▁" follows a boundary). Comparing with sp.decode would be wrong: <unk> decodes to " ⁇ " and
    the original characters are lost, so "the decoded text's size" is not what is counted."""
    tokens, sp = dataset_tokens(ds_unk)
    luts = tg.build_byte_luts(sp, CPU)
    unk = sp.unk_id()

    def known(c):
        return sp.piece_to_id("▁" if c == " " else c) != unk

    expected = dropped_spaces = 0
    for doc in ds_unk["val_text"]:
        expected += sum(len(c.encode()) for c in doc if known(c))
        spaces = sum(1 for i in range(1, len(doc)) if doc[i] == " " and not known(doc[i - 1]))
        expected -= spaces
        dropped_spaces += spaces
    assert int((tokens == unk).sum()) > 10 and dropped_spaces > 5  # the case really occurs
    n = int(tg.token_bytes(tokens[:-1], tokens[1:], luts).sum())
    assert n == expected
    assert n == bytes_from_sp(sp, tokens)
    assert n < sum(len(doc.encode()) for doc in ds_unk["val_text"])


def test_byte_luts_entries(ds_bytes):
    sp = spm.SentencePieceProcessor(model_file=ds_bytes["tokenizer_path"])
    base, lead, boundary = tg.build_byte_luts(sp, CPU)
    assert base.shape == lead.shape == boundary.shape == (sp.vocab_size(),)
    for i in (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()):
        assert (base[i], lead[i], boundary[i]) == (0, False, True)
    for piece, nbytes, space in (("<0x41>", 1, False), ("<0xE6>", 1, False), ("▁", 0, True),
                                 ("▁the", 3, True), ("—", 3, False)):
        i = sp.piece_to_id(piece)
        assert i != sp.unk_id(), piece
        assert (int(base[i]), bool(lead[i]), bool(boundary[i])) == (nbytes, space, False), piece


def test_token_bytes_rule_hand_made():
    # ids: 0 BOS (control), 1 <unk>, 2 a byte token, 3 "▁ab", 4 "cd", 5 "▁",
    # 6 "▁é" (é: 2 bytes)
    base = torch.tensor([0, 0, 1, 2, 2, 0, 2], dtype=torch.int16)
    lead = torch.tensor([0, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    boundary = torch.tensor([1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    luts = (base, lead, boundary)
    cases = {  # (prev, target): bytes
        (0, 3): 2, (1, 3): 2, (2, 3): 3, (4, 3): 3, (5, 3): 3,  # "▁" +1 unless after a boundary
        (0, 5): 0, (4, 5): 1, (0, 6): 2, (3, 6): 3,
        (3, 0): 0, (3, 1): 0, (0, 1): 0,  # control / unknown: 0
        (0, 2): 1, (3, 2): 1, (2, 4): 2, (0, 4): 2,  # byte tokens 1, no-space pieces their bytes
    }
    prev = torch.tensor([p for p, _ in cases])
    target = torch.tensor([t for _, t in cases])
    got = tg.token_bytes(prev, target, luts)
    assert got.tolist() == list(cases.values())
    assert got.dtype == torch.int32


# -----------------------------
# quantize_rows
# -----------------------------


def random_matrices(seed, heavy):
    g = torch.Generator().manual_seed(seed)
    rows, cols = 8 + seed % 17, 16 + 13 * (seed % 11)
    if heavy:  # student-t with 2..4 degrees of freedom: outliers, where clipping pays
        df = 2.0 + seed % 3
        z = torch.randn(rows, cols, generator=g)
        chi2 = torch.randn(rows, cols, int(df), generator=g).square().sum(-1)
        w = z / (chi2 / df).sqrt()
    else:
        w = torch.randn(rows, cols, generator=g)
    return w * 10.0 ** (seed % 5 - 3)  # magnitudes 1e-3 .. 10


def sse(w, q, s):
    return (q.double() * s.double()[:, None] - w.double()).square().sum(1)


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_quantize_rows_codes_scales_and_absmax_error(bits):
    qmax = 2 ** (bits - 1) - 1
    for seed in range(40):
        w = random_matrices(seed, heavy=seed % 2 == 1)
        for quantiles in ((1.0,), tg.CLIP_QUANTILES):
            q, s = tg.quantize_rows(w, bits, quantiles)
            assert q.dtype == torch.int8 and q.shape == w.shape
            assert s.dtype == torch.float16 and s.shape == (w.shape[0],)
            assert int(q.abs().max()) <= qmax and torch.isfinite(s).all() and (s > 0).all()
        q, s = tg.quantize_rows(w, bits)  # default: absmax
        err = (q.double() * s.double()[:, None] - w.double()).abs()
        assert (err <= s.double()[:, None] / 2 * (1 + 1e-5)).all(), (bits, seed)
        assert (q.abs().amax(1) >= qmax - 1).all()  # the absmax scale uses the whole range


def test_quantize_rows_clip_choice():
    """Per row, the clip search is never worse than absmax (which is one of the candidates), is the
    best of the candidate quantiles, and on heavy-tailed rows really helps."""
    helped = 0
    for bits in (5, 6):
        qmax = 2 ** (bits - 1) - 1
        for seed in range(40):
            w = random_matrices(seed, heavy=seed % 2 == 1)
            q0, s0 = tg.quantize_rows(w, bits, (1.0,))
            q, s = tg.quantize_rows(w, bits, tg.CLIP_QUANTILES)
            err0, err = sse(w, q0, s0), sse(w, q, s)
            assert (err <= err0 * (1 + 1e-5)).all(), (bits, seed)
            for quantile in tg.CLIP_QUANTILES:  # each candidate, recomputed in float64
                clip = (w.abs().amax(1) if quantile == 1.0
                        else torch.quantile(w.abs(), quantile, dim=1))
                sc = (clip / qmax).half()
                qc = torch.clamp(torch.round(w.double() / sc.double()[:, None]), -qmax, qmax)
                assert (err <= sse(w, qc, sc) * (1 + 1e-5)).all(), (bits, seed, quantile)
            helped += int((err < 0.9 * err0).sum())
    assert helped >= 20


def test_quantize_rows_zero_and_tiny_rows():
    w = torch.randn(4, 64)
    w[1] = 0.0
    w[2] *= 1e-9
    for bits in (5, 6, 8):
        q, s = tg.quantize_rows(w, bits, tg.CLIP_QUANTILES)
        deq = q.float() * s.float()[:, None]
        assert torch.isfinite(s).all() and int(q.abs().max()) <= 2 ** (bits - 1) - 1
        assert (deq[1] == 0).all()
        assert ((deq[2] - w[2]).abs() <= w[2].abs().max()).all()
        assert ((deq[0] - w[0]).abs() <= s[0].float()).all()


def correlated_inputs(seed, n, cols):
    """Calibration-like inputs: correlated channels of unequal energy."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.4 * torch.randn(cols, cols, generator=g)
    return (torch.randn(n, cols, generator=g) @ mix) * torch.rand(cols, generator=g).add(0.2)


def output_sse(x, w, q, s):
    return (x.double() @ (q.double() * s.double()[:, None] - w.double()).t()).square().sum()


@pytest.mark.parametrize("bits", [5, 6])
def test_gptq_lowers_the_products_error_on_its_calibration_inputs(bits):
    """GPTQ's codes, on the grid of the clip it picks, leave the product x @ w^T with at most 0.7 of
    the error of plain rounding (0.43-0.45 measured), on inputs with correlated channels; codes in
    range."""
    qmax = 2 ** (bits - 1) - 1
    for seed in range(4):
        x, w = (correlated_inputs(seed, 512, 40),
                random_matrices(seed + 2, heavy=seed % 2 == 1)[:, :40])
        q, s = tg.quantize_rows(w, bits, tg.CLIP_QUANTILES, x.t() @ x)
        q0, s0 = tg.quantize_rows(w, bits, tg.CLIP_QUANTILES)
        assert q.dtype == torch.int8 and s.dtype == torch.float16 and int(q.abs().max()) <= qmax
        assert output_sse(x, w, q, s) < 0.7 * output_sse(x, w, q0, s0), (bits, seed)
    # fewer calibration tokens than inputs: X^T X is singular, the 1% damping makes it invertible
    x = correlated_inputs(9, 24, 40)
    q, s = tg.quantize_rows(w, bits, tg.CLIP_QUANTILES, x.t() @ x)
    assert output_sse(x, w, q, s) < 0.7 * output_sse(x, w, q0, s0)


def test_gptq_with_uncorrelated_inputs_is_rounding():
    """With a diagonal Hessian (uncorrelated inputs) no error moves between columns: the codes are
    the nearest ones on the chosen row's grid, whatever the columns' order (energies all different),
    and with the absmax clip alone they equal plain rounding's."""
    for seed in range(6):
        w = random_matrices(seed, heavy=seed % 2 == 1)
        g = torch.Generator().manual_seed(seed)
        h = torch.diag(torch.rand(w.size(1), generator=g) + 0.1)
        q, s = tg.quantize_rows(w, 6, tg.CLIP_QUANTILES, h)
        assert torch.equal(q.float(), torch.clamp(torch.round(w / s.float()[:, None]), -31, 31))
        assert torch.equal(tg.quantize_rows(w, 6, (1.0,), h)[0], tg.quantize_rows(w, 6, (1.0,))[0])


def test_gptq_picks_the_clip_of_least_output_error():
    """Each row's clip is the candidate whose GPTQ codes give the least error on the calibration
    inputs."""
    x = correlated_inputs(0, 256, 32)
    w = random_matrices(3, heavy=True)[:, :32]
    h = x.t() @ x
    q, s = tg.quantize_rows(w, 6, tg.CLIP_QUANTILES, h)
    best = (x.double() @ (q.double() * s.double()[:, None] - w.double()).t()).square().sum(0)
    for quantile in tg.CLIP_QUANTILES:
        qc, sc = tg.quantize_rows(w, 6, (quantile,), h)
        per_row = (x.double()
                   @ (qc.double() * sc.double()[:, None] - w.double()).t()).square().sum(0)
        assert (best <= per_row * (1 + 1e-4)).all(), quantile


def test_gptq_dead_inputs_and_a_hessian_that_is_not_positive_definite():
    """An input channel that was always 0 (a zero row and column of the Hessian) is rounded plainly;
    a Hessian whose damped form has no Cholesky factor falls back to plain rounding for the whole
    matrix."""
    x = correlated_inputs(2, 256, 24)
    x[:, 5] = 0.0
    w = random_matrices(3, heavy=False)[:, :24]
    q, s = tg.quantize_rows(w, 6, (1.0,), x.t() @ x)
    assert q[:, 5].float().equal(torch.clamp(torch.round(w[:, 5] / s.float()), -31, 31))
    assert int(q.abs().max()) <= 31
    assert torch.equal(tg.quantize_rows(w, 6, (1.0,), -torch.eye(24))[0],
                       tg.quantize_rows(w, 6, (1.0,))[0])


def test_collect_hessians_sums_each_int6_products_inputs(tmp_path):
    """One X^T X per int6 matrix, of that product's own inputs over one step's tokens (q, k, v share
    theirs), the hooks gone afterwards; embeddings and CoDA's gate get none."""
    torch.manual_seed(0)
    model = tg.GPT(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2,
                   mlp_mult=2, max_seq_len=16, bigram_vocab_size=16, bigram_dim=8, xsa_last_n=1,
                   coda_last_n=1, ve_last_n=1, ve_dim=8, act_dtype=torch.float32)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "fineweb_train_000000.bin"
    synth.write_shard(str(path), list(np.random.default_rng(0).integers(0, 64, 200)))
    args = types.SimpleNamespace(data_order="stream", seed=0,
                                 vocab_size=64, train_batch_tokens=64, grad_accum_steps=2,
                                 train_seq_len=16, micro_batch_tokens=32, export_rule="fill")
    seen = {}
    capture = [m.register_forward_pre_hook(
                   lambda mod, inp, n=n: seen.setdefault(n, []).append(inp[0].detach()))
               for n, m in model.named_modules() if isinstance(m, tg.CastedLinear)]
    hessians, fisher, stats = tg.collect_hessians(args, model, [str(path)], 0, 1, CPU)
    assert stats["tokens"] == 64 and fisher == {}
    for hook in capture:
        hook.remove()
    assert set(hessians) == parts.of_role(model, "matrix")
    assert "blocks.1.attn.coda_gate.weight" not in hessians
    for name, h in hessians.items():
        x = torch.cat([i.flatten(0, -2) for i in seen[name.removesuffix(".weight")]])
        assert x.size(0) == 64 and torch.allclose(h, x.t() @ x, rtol=1e-5, atol=1e-5), name
    assert torch.equal(hessians["blocks.0.attn.c_q.weight"], hessians["blocks.0.attn.c_v.weight"])
    assert all(not m._forward_pre_hooks for m in model.modules()) and model.training


def test_collect_hessians_weighs_each_output_row_by_its_squared_loss_gradient(tmp_path):
    """EXPORT_RULE=fisher: per int6 matrix and output row, the squared gradient of the pieces'
    summed token losses at that row's output, summed over tokens, times the square of the gain
    folded into the row (out_scale), as autograd gives it on each piece alone; per embedding row,
    the mean squared gradient at the lookup's output summed over the tokens that read the row,
    times the tokens' count, plus for the tied head its rows' squared logit gradients (here in
    closed form: softmax minus target through the softcap) times its inputs' summed mean square;
    the Hessians are those of 'fill'; no weight's .grad is written and every hook is gone."""
    torch.manual_seed(0)
    model = tg.GPT(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2,
                   mlp_mult=2, max_seq_len=16, bigram_vocab_size=16, bigram_dim=8, xsa_last_n=1,
                   act_dtype=torch.float32)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "fineweb_train_000000.bin"
    synth.write_shard(str(path), list(np.random.default_rng(0).integers(0, 64, 200)))
    args = types.SimpleNamespace(data_order="stream", seed=0,
                                 vocab_size=64, train_batch_tokens=64, grad_accum_steps=2,
                                 train_seq_len=16, micro_batch_tokens=32, export_rule="fisher")
    hessians, fisher, stats = tg.collect_hessians(args, model, [str(path)], 0, 1, CPU)
    embeddings = parts.of_role(model, "embedding")
    assert set(hessians) == parts.of_role(model, "matrix") and stats["tokens"] == 64
    assert set(fisher) == set(hessians) | embeddings == set(hessians) | {
        "tok_emb.weight", "bigram.embed.weight"}
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(torch.equal(h, want) for h, want in zip(
        hessians.values(), tg.collect_hessians(dict_args(args, export_rule="fill"), model,
                                               [str(path)], 0, 1, CPU)[0].values()))
    want = {n: torch.zeros_like(f) for n, f in fisher.items()}
    head_rows, head_energy, cap = torch.zeros(64), 0.0, model.logit_softcap
    for xs, ys in calibration_pieces(path, args):
        weights, gained = autograd_row_weights(model, xs, ys, fisher, embeddings)
        for n in want:
            want[n] += weights[n]
        with torch.no_grad():
            h = model.hidden(xs).flatten(0, 1)
            soft = torch.tanh(h @ model.tok_emb.weight.t() / cap)
            g = (torch.softmax(cap * soft, -1) - F.one_hot(ys.flatten(), 64)) * (1 - soft ** 2)
            head_rows += g.square().sum(0)
            head_energy += float(h.square().mean(-1).sum())
    for n in embeddings:
        want[n] *= 64
    assert gained  # some matrix does fold a gain
    want["tok_emb.weight"] += head_rows * head_energy
    for n in fisher:
        assert torch.allclose(fisher[n], want[n], rtol=1e-4, atol=1e-12), n
        assert (fisher[n] > 0).all(), n


def test_collect_hessians_prices_a_matrix_a_token_runs_twice_per_use(tmp_path):
    """Depth recurrence runs block 0 twice a token: its matrices' F_r and X^T X each sum over both
    uses, so their product is twice a single use's scale; their weights are halved back onto the
    scale the embeddings' rows are priced on, and block 1's, run once, are the plain sums."""
    torch.manual_seed(0)
    model = tg.GPT(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2,
                   mlp_mult=2, max_seq_len=16, bigram_vocab_size=0, xsa_last_n=0,
                   act_dtype=torch.float32, recur_layers=(0,))
    model.recurring = True
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "fineweb_train_000000.bin"
    synth.write_shard(str(path), list(np.random.default_rng(0).integers(0, 64, 200)))
    args = types.SimpleNamespace(data_order="stream", seed=0,
                                 vocab_size=64, train_batch_tokens=32, grad_accum_steps=1,
                                 train_seq_len=16, micro_batch_tokens=32, export_rule="fisher")
    hessians, fisher, stats = tg.collect_hessians(args, model, [str(path)], 0, 1, CPU)
    raw = {n: torch.zeros_like(f) for n, f in fisher.items() if n in hessians}
    for xs, ys in calibration_pieces(path, args):
        for n, weights in autograd_row_weights(model, xs, ys, raw)[0].items():
            raw[n] += weights
    uses = {n: 2 if n.startswith("blocks.0.") else 1 for n in raw}
    assert sorted(set(uses.values())) == [1, 2]
    for n in raw:
        assert torch.allclose(fisher[n], raw[n] / uses[n], rtol=1e-4, atol=1e-12), n


def calibration_pieces(path, args):
    """The pieces collect_hessians feeds one rank: each micro-batch cut in CALIBRATION_PIECES."""
    loader = tg.DistributedTokenLoader([str(path)], 0, 1, CPU, args.data_order, args.seed)
    for _ in range(args.grad_accum_steps):
        x, y = loader.next_batch(args.micro_batch_tokens, args.train_seq_len)
        size = max(1, len(x) // tg.CALIBRATION_PIECES)
        yield from zip(x.split(size), y.split(size))


def autograd_row_weights(model, xs, ys, names, embeddings=()) -> tuple[dict, set]:
    """By autograd on one piece, per weight in names: each output row's squared gradient of the
    summed loss, summed over tokens and every use of the module, times the square of a gain folded
    into the row; for one of embeddings, each row's mean squared gradient at the lookup's output
    summed over the tokens that read it. Also the names whose module folded a gain."""
    outs = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: outs.append((n, inp, out)))
             for n, m in model.named_modules() if f"{n}.weight" in names]
    try:
        loss = model.token_nll(xs, ys).sum()
    finally:
        for hook in hooks:
            hook.remove()
    weights, gained = {n: torch.zeros_like(f) for n, f in names.items()}, set()
    for (n, inp, _), g in zip(outs, torch.autograd.grad(loss, [out for *_, out in outs])):
        name = f"{n}.weight"
        if name in embeddings:
            for i, row in enumerate(inp[0].flatten().tolist()):
                weights[name][row] += g.flatten(0, -2)[i].square().mean()
            continue
        gain = inp[1].detach().view(-1) if len(inp) > 1 and inp[1] is not None else 1.0
        weights[name] += g.square().flatten(0, -2).sum(0) * gain ** 2
        gained |= {name} if len(inp) > 1 else set()
    return weights, gained


def dict_args(args, **changes):
    return types.SimpleNamespace(**dict(vars(args), **changes))


def test_collect_hessians_leaves_out_pieces_that_would_end_past_the_deadline(tmp_path, monkeypatch):
    """With a clock, a piece runs only while twice the slowest piece so far still fits: pieces of
    300 ms against 1 s give two pieces (700 ms left after one, 400 ms after two), and their X^T X
    alone."""
    torch.manual_seed(0)
    model = tg.GPT(vocab_size=64, num_layers=1, model_dim=16, num_heads=2, num_kv_heads=1,
                   mlp_mult=2, max_seq_len=8, act_dtype=torch.float32)
    path = tmp_path / "fineweb_train_000000.bin"
    synth.write_shard(str(path), list(np.random.default_rng(0).integers(0, 64, 400)))
    args = types.SimpleNamespace(data_order="stream", seed=0,
                                 vocab_size=64, train_batch_tokens=128, grad_accum_steps=2,
                                 train_seq_len=8, micro_batch_tokens=64, export_rule="fill")
    now = [0.0]  # a fake clock in seconds: each piece takes 0.3 s of it
    monkeypatch.setattr(tg, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    hidden, seen = model.hidden, []

    def slow_hidden(ids):
        now[0] += 0.3
        seen.append(ids)
        return hidden(ids)

    monkeypatch.setattr(model, "hidden", slow_hidden)
    inputs = []
    capture = model.blocks[0].mlp.fc.register_forward_pre_hook(
        lambda mod, inp: inputs.append(inp[0].flatten(0, 1)))
    hessians, _, stats = tg.collect_hessians(args, model, [str(path)], 0, 1, CPU,
                                             time_left_ms=lambda: 1000.0 - 1000.0 * now[0])
    capture.remove()
    assert (len(seen) == 2 and stats["tokens"] == sum(ids.numel() for ids in seen) == 16
            and now[0] <= 1.0)
    assert stats["piece_ms"] == pytest.approx(300.0)
    x = torch.cat(inputs)
    assert x.size(0) == 16 and torch.allclose(hessians["blocks.0.mlp.fc.weight"], x.t() @ x,
                                              rtol=1e-5, atol=1e-5)
    assert (tg.collect_hessians(args, model, [str(path)], 0, 1, CPU)[2]["tokens"] == 128
            and len(seen) == 2 + 16)
    # a first piece that may not fit (its expected time given) is left out too: no tokens at all
    empty, _, stats = tg.collect_hessians(args, model, [str(path)], 0, 1, CPU,
                                          time_left_ms=lambda: 500.0, piece_ms=300.0)
    assert stats["tokens"] == 0 and len(seen) == 18 and not any(h.any() for h in empty.values())


def _calibration_worker(rank, world_size, port, shard, out_dir):
    """Pieces of 300 ms on both ranks; rank 0 has 10 s left, rank 1 only 1 s."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = tg.GPT(vocab_size=64, num_layers=1, model_dim=16, num_heads=2, num_kv_heads=1,
                       mlp_mult=2, max_seq_len=8, act_dtype=torch.float32)
        args = types.SimpleNamespace(data_order="stream", seed=0,
                                     vocab_size=64, train_batch_tokens=128, grad_accum_steps=2,
                                     train_seq_len=8, micro_batch_tokens=32, export_rule="fill")
        now, fed = [0.0], []
        tg.time = types.SimpleNamespace(perf_counter=lambda: now[0])
        hidden = model.hidden

        def slow_hidden(ids):
            now[0] += 0.3
            fed.append(ids.numel())
            return hidden(ids)

        model.hidden = slow_hidden
        cap = 10_000.0 if rank == 0 else 1000.0
        _, _, stats = tg.collect_hessians(args, model, [shard], rank, world_size, CPU,
                                          time_left_ms=lambda: cap - 1000.0 * now[0])
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump([len(fed), stats["tokens"]], f)


def test_collect_hessians_ranks_feed_the_same_pieces_by_the_least_time_left(tmp_path):
    """The deadline is decided on the least time left of any rank: a rank whose clock says it has
    time to spare must not feed pieces that the others wait for past their cap (rank 1: 1 s left,
    two pieces of 300 ms, as one process would decide), and both ranks feed the same number."""
    path = tmp_path / "fineweb_train_000000.bin"
    synth.write_shard(str(path), list(np.random.default_rng(0).integers(0, 64, 400)))
    mp.spawn(_calibration_worker, args=(2, free_port(), str(path), str(tmp_path)), nprocs=2,
             join=True)
    got = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert got == [[2, 16], [2, 16]], got  # 8 tokens a piece


def _fisher_worker(rank, world_size, port, shard, out_dir):
    """Both ranks read the same tokens: one process's calibration, then the two ranks'."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = tg.GPT(vocab_size=64, num_layers=1, model_dim=16, num_heads=2, num_kv_heads=1,
                       mlp_mult=2, max_seq_len=8, bigram_vocab_size=16, bigram_dim=8,
                       act_dtype=torch.float32)
        for p in model.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
        args = types.SimpleNamespace(data_order="stream", seed=0,
                                     vocab_size=64, train_batch_tokens=64, grad_accum_steps=1,
                                     train_seq_len=8, micro_batch_tokens=32, export_rule="fisher")
        loader = tg.DistributedTokenLoader
        tg.DistributedTokenLoader = lambda files, _rank, _size, *rest: loader(files, 0, 1, *rest)
        _, alone, _ = tg.collect_hessians(args, model, [shard], 0, 1, CPU)
        _, both, _ = tg.collect_hessians(args, model, [shard], rank, world_size, CPU)
    finally:
        dist.destroy_process_group()
    ratios = {n: (both[n] / alone[n]).tolist() for n in alone}
    with open(os.path.join(out_dir, f"fisher{rank}.json"), "w") as f:
        json.dump(ratios, f)


def test_collect_hessians_on_two_ranks_weighs_as_one_process_over_their_tokens(tmp_path):
    """Two ranks that read the same tokens: each matrix's row weights are twice one process's
    (a sum over twice the tokens), each embedding's four times (the tokens' count doubles as well
    as the sum, and the tied head's squared gradients and its inputs' energy are each summed over
    both ranks before their product), on both ranks alike."""
    path = tmp_path / "fineweb_train_000000.bin"
    synth.write_shard(str(path), list(np.random.default_rng(0).integers(0, 64, 400)))
    mp.spawn(_fisher_worker, args=(2, free_port(), str(path), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"fisher{rank}.json").read_text()) for rank in (0, 1)]
    assert got[0] == got[1]
    assert {"tok_emb.weight", "bigram.embed.weight", "blocks.0.mlp.fc.weight"} <= set(got[0])
    for name, ratios in got[0].items():
        want = 4.0 if name in tg.EMBEDDINGS else 2.0
        seen = [r for r in ratios if r == r]  # a bucket no token read: 0 / 0
        assert seen and all(abs(r - want) < 1e-4 for r in seen), (name, ratios[:4])


def test_gptq_export_refuses_a_matrix_without_calibration(tmp_path):
    """With GPTQ=1 every int6 matrix must have a Hessian: one that is missing (a hook that never
    fired) stops the export before anything is written, instead of silently rounding that matrix."""
    model = tg.GPT(vocab_size=64, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2,
                   mlp_mult=2, max_seq_len=16, bigram_vocab_size=0, act_dtype=torch.float32)
    shapes = {n: t.size(1) for n, t in model.state_dict().items() if tg.export_kind(n, t) == "int6"}
    hessians = {n: torch.eye(cols) for n, cols in shapes.items()}
    args = types.SimpleNamespace(artifact_limit_bytes=10 ** 9,
                                 artifact_path=str(tmp_path / "m.ptz"), shape={}, world_size=1,
                                 export_rule="fill")
    tg.export(args, model, lambda msg: None, 0, 0, hessians)
    assert (tmp_path / "m.ptz").exists()
    del hessians["blocks.0.mlp.proj.weight"]
    args.artifact_path = str(tmp_path / "n.ptz")
    with pytest.raises(RuntimeError, match="blocks.0.mlp.proj.weight"):
        tg.export(args, model, lambda msg: None, 0, 0, hessians)
    assert not (tmp_path / "n.ptz").exists()


# -----------------------------
# quantize_state
# -----------------------------


def trained_like_model(seed=0, **kw):
    """A small GPT with every matrix random (a fresh model has all-zero projections)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=256, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=3,
               max_seq_len=32, bigram_vocab_size=128, bigram_dim=16, xsa_last_n=2, coda_last_n=1)
    cfg.update(kw)
    model = tg.GPT(**cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def trained_like_state(seed=0, **kw):
    return trained_like_model(seed, **kw).state_dict()


def test_quantize_state_kinds_and_roundtrip():
    """Each tensor as its role asks (parts.py reads roles from the modules, not the names): a
    product's matrix int6, an embedding int8, CoDA's gate matrix fp16, the rest fp32; each within
    half a step of its grid (or at its clip), each float bit-exact at its precision."""
    model = trained_like_model()
    state, roles = model.state_dict(), parts.parameter_roles(model)
    packed = tg.quantize_state(state)
    assert set(packed) == set(state)
    deq = tg.dequantize_state(packed)
    for name, t in state.items():
        kind = {"matrix": "int6", "embedding": "int8", "control": "fp32"}.get(roles[name])
        if roles[name] == "coda":
            kind = "fp16" if name.endswith("coda_gate.weight") else "fp32"
        entry = packed[name]
        assert entry[0] == kind, name
        if kind.startswith("int"):
            codes, scales = entry[1:]
            qmax = 2 ** (int(kind[3:]) - 1) - 1
            assert (codes.dtype == torch.int8 and codes.shape == t.shape
                    and int(codes.abs().max()) <= qmax)
            assert scales.dtype == torch.float16 and scales.shape == (t.shape[0],)
            s = scales.float()[:, None]
            # within the clip: rounding error; outside: clipped to the clip
            inside = t.abs() <= qmax * s
            assert ((deq[name] - t).abs() <= s / 2 * (1 + 1e-5))[inside].all(), name
            assert torch.equal(deq[name][~inside], (t.sign() * qmax * s)[~inside]), name
        else:
            assert len(entry) == 2 and entry[1].dtype == (torch.float32 if kind == "fp32"
                                                          else torch.float16)
            assert torch.equal(deq[name], t.float() if kind == "fp32" else t.half().float()), name
        assert deq[name].dtype == torch.float32 and deq[name].shape == t.shape
    kinds = [v[0] for v in packed.values()]
    assert kinds.count("int6") == 4 * 6 + 1 and "int5" not in kinds


def file_bytes(packed, shape=None):
    return len(tg.ARTIFACT_MAGIC) + 32 + len(tg.serialize(packed, shape or {}))


@pytest.fixture(scope="module")
def mixed_state():
    """A 6-layer model of width 128 (37 int6 matrices, 8-row granularity far below 0.2% of the
    file), each matrix its own magnitude and some heavy-tailed: error per byte differs between
    matrices."""
    model = tg.GPT(vocab_size=256, num_layers=6, model_dim=128, num_heads=4, num_kv_heads=2,
                   mlp_mult=3, max_seq_len=32, bigram_vocab_size=128, bigram_dim=16)
    state = {}
    for i, (name, t) in enumerate(model.state_dict().items()):
        if t.ndim == 2:
            g = torch.Generator().manual_seed(i)
            t = torch.randn(t.shape, generator=g) * 0.01 * (1 + i % 7)
            if i % 3 == 0:  # outliers: clipping pays
                t = t / torch.rand(t.shape, generator=g).add(0.05).sqrt()
        state[name] = t
    full, floor = tg.quantize_state(state), tg.quantize_state(state, 0, rule="rate")  # the smallest
    return state, full, file_bytes(full), floor, file_bytes(floor)


def int_error(state, packed, hessians=None):
    """The error the export minimises: squared (Hessian-weighted) error over the int5/int6
    matrices."""
    deq, total = tg.dequantize_state(packed), 0.0
    for name, (kind, *_) in packed.items():
        if kind in ("int5", "int6"):
            d = (deq[name] - state[name].float()).double()
            h = hessians[name].double() if hessians else torch.eye(d.size(1), dtype=torch.float64)
            total += float(((d @ h) * d).sum())
    return total


def largest_saving_first(state, full, budget, hessians=None):
    """The old rule, given exact frame sizes: int6 -> int5 by largest saving until the file fits."""
    packed, saving = dict(full), {}
    for name, entry in full.items():
        if entry[0] == "int6":
            int5 = ("int5", *tg.quantize_rows(state[name], 5, tg.CLIP_QUANTILES,
                                              (hessians or {}).get(name)))
            saving[name] = (len(tg.zstd22(entry[1].numpy().tobytes()))
                            - len(tg.zstd22(int5[1].numpy().tobytes())), int5)
    for name in sorted(saving, key=lambda n: -saving[n][0]):
        if file_bytes(packed) <= budget:
            break
        packed[name] = saving[name][1]
    return packed


def all_int5(state, full):
    """Every int6 matrix at int5, each row at its clip of least error: the smallest file of
    'fill'."""
    return dict(full, **{n: ("int5", *tg.quantize_rows(state[n], 5, tg.CLIP_QUANTILES))
                         for n, v in full.items() if v[0] == "int6"})


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_fill_rule_fits_and_no_int5_matrix_could_go_back(mixed_state, where):
    """Rule 'fill' (the default): the file fits; no int5 matrix could go back to int6 and still fit
    (the slack is used); every row of both widths at its clip of least error, as without a budget;
    more int6 matrices than the dropping alone (largest saving first) leaves."""
    state, full, full_bytes, _, _ = mixed_state
    floor_bytes = file_bytes(all_int5(state, full))
    budget = floor_bytes + where * (full_bytes - floor_bytes)
    packed = tg.quantize_state(state, budget)
    assert file_bytes(packed) <= budget
    int6 = {n for n, v in packed.items() if v[0] == "int6"}
    int5 = [n for n, v in packed.items() if v[0] == "int5"]
    assert int5 and int6
    assert all(file_bytes(dict(packed, **{n: full[n]})) > budget for n in int5)
    for name in int6:
        assert all(torch.equal(a, b) for a, b in zip(packed[name][1:], full[name][1:])), name
    for name in int5:
        want = tg.quantize_rows(state[name], 5, tg.CLIP_QUANTILES)
        assert all(torch.equal(a, b) for a, b in zip(packed[name][1:], want)), name
    assert len(int6) >= sum(v[0] == "int6"
                            for v in largest_saving_first(state, full, budget).values())


def test_fill_rule_below_its_all_int5_size_takes_the_rate_rules_coarser_clips(mixed_state):
    """Where even every matrix at int5 (least-error clips) is over, 'fill' still fits if coarser
    clips can: it gives the rate rule's packing, not an over-limit file."""
    state, full, *_, rate_floor_bytes = mixed_state
    fill_floor_bytes = file_bytes(all_int5(state, full))
    assert rate_floor_bytes < 0.99 * fill_floor_bytes
    budget = (rate_floor_bytes + fill_floor_bytes) / 2
    packed = tg.quantize_state(state, budget)
    assert file_bytes(packed) <= budget
    rate = tg.quantize_state(state, budget, rule="rate")
    assert all(torch.equal(a, b) for n in packed for a, b in zip(packed[n][1:], rate[n][1:]))


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_rate_rule_fills_the_budget_with_less_error(mixed_state, where):
    """Rule 'rate': between the all-int5 and all-int6 sizes the file is within 0.2% under the
    budget, with less error than largest-saving-first at the same budget; codes in their width's
    range; embeddings and floats as without a budget."""
    state, full, full_bytes, _, floor_bytes = mixed_state
    budget = floor_bytes + where * (full_bytes - floor_bytes)
    packed = tg.quantize_state(state, budget, rule="rate")
    size = file_bytes(packed)
    assert 0.998 * budget <= size <= budget, (size, budget)
    kinds = [v[0] for v in packed.values()]
    assert (kinds.count("int6") and kinds.count("int5")
            and kinds.count("int6") + kinds.count("int5") == 37)
    old = largest_saving_first(state, full, budget)
    assert file_bytes(old) <= budget
    assert int_error(state, packed) <= int_error(state, old), where
    for name, entry in packed.items():
        if entry[0] in ("int5", "int6"):
            assert int(entry[1].abs().max()) <= 2 ** (int(entry[0][3:]) - 1) - 1, name
        else:
            assert entry[0] == full[name][0] and all(torch.equal(a, b)
                                                     for a, b in zip(entry[1:], full[name][1:]))


def test_quantize_state_with_hessians_beats_largest_saving_first():
    """Under GPTQ the currency is the product's error: the choice beats the old rule in it too."""
    state = trained_like_state(num_layers=2, xsa_last_n=0, coda_last_n=0)
    hessians = {}
    for name, t in state.items():
        if tg.export_kind(name, t) == "int6":
            x = correlated_inputs(len(hessians), 64, t.size(1)) * (1 + len(hessians) % 4)
            hessians[name] = x.t() @ x
    full = tg.quantize_state(state, hessians=hessians)
    floor = file_bytes(tg.quantize_state(state, 0, hessians))
    budget = (floor + file_bytes(full)) / 2
    packed = tg.quantize_state(state, budget, hessians, rule="rate")
    assert file_bytes(packed) <= budget
    old = largest_saving_first(state, full, budget, hessians)
    assert int_error(state, packed, hessians) <= int_error(state, old, hessians)


@pytest.fixture(scope="module")
def fisher_case():
    """A trained-like state under GPTQ, each matrix's and embedding's rows weighted unequally (over
    100x) and tensors unequally: the Fisher rule's inputs (an embedding's weight the product the
    rule takes, no Hessian), with a budget between all-int5 and all-int6."""
    state = trained_like_state(num_layers=2, xsa_last_n=0, coda_last_n=0)
    hessians, fisher = {}, {}
    for i, (name, t) in enumerate(state.items()):
        if tg.export_kind(name, t) in ("int6", "int8"):
            g = torch.Generator().manual_seed(100 + i)
            fisher[name] = 10 ** (2 * torch.rand(t.size(0), generator=g, dtype=torch.float64)
                                  + i % 3 - 1)
        if tg.export_kind(name, t) == "int6":
            x = correlated_inputs(i, 64, t.size(1))
            hessians[name] = x.t() @ x
    energy = float(hessians["blocks.0.attn.c_q.weight"].diagonal().mean())
    for name in fisher.keys() - hessians.keys():  # on the matrices' scale: F_r mean(diag H)
        fisher[name] *= energy
    full = tg.quantize_state(state, hessians=hessians)
    floor = file_bytes(tg.quantize_state(state, 0, hessians, rule="fill"))
    return state, hessians, fisher, full, 0.6 * floor + 0.4 * file_bytes(full)


def loss_estimate(state, packed, hessians, fisher):
    """What the Fisher rule minimises: the second-order loss, sum of F_r d_r^T H d_r (H = I, the
    scale in F_r, for an embedding)."""
    deq, total = tg.dequantize_state(packed), 0.0
    for name in fisher:
        d = (deq[name] - state[name].float()).double()
        h = hessians[name].double() if name in hessians else torch.eye(d.size(1)).double()
        total += float((fisher[name] * ((d @ h) * d).sum(1)).sum())
    return total


def test_fisher_rule_fills_the_budget_all_int6_at_one_price_per_bit(fisher_case):
    """Every int6 matrix stays int6, every embedding int8, and the file fits within 0.1% under the
    budget; every row's step is its least-error (an embedding's: absmax) step s_r times
    clamp(c t_r / s_r, 1, 64), t_r = (F_r e_m)^-1/2 with e_m GPTQ's energy (an embedding's
    F_r^-1/2), with one c
    for all rows of all matrices and embeddings (rows the clamp holds at s_r would want a finer
    step than c t_r); the codes are their width's and their rows' rounding to the nearest."""
    state, hessians, fisher, full, budget = fisher_case
    packed = tg.quantize_state(state, budget, hessians, rule="fisher", fisher=fisher)
    assert budget * (1 - 1e-3) <= file_bytes(packed) <= budget
    assert {n: v[0] for n, v in packed.items()} == {n: v[0] for n, v in full.items()}
    cs, held, embeddings = [], 0, [n for n in fisher if n not in hessians]
    assert embeddings
    for name in fisher:
        step, least = packed[name][2].double(), full[name][2].double()
        energy = tg.gptq_energy(hessians[name]) if name in hessians else 1.0
        t = (fisher[name] * energy).rsqrt()
        wide = step > least * 1.002  # beyond fp16's rounding of the stored scale
        cs.append(step[wide] / t[wide])
        held += int((~wide).sum())
        if name in embeddings:
            assert wide.any(), name
            want = torch.clamp(torch.round(state[name] / packed[name][2].float()[:, None]),
                               -127, 127)
            assert torch.equal(packed[name][1].float(), want), name
    cs = torch.cat(cs)
    assert len(cs) > 0.5 * sum(len(f) for f in fisher.values()) and held > 0
    assert float(cs.max() / cs.min()) < 1.002, (float(cs.min()), float(cs.max()))


def test_gptq_energy_prices_a_rows_rounding_under_gptq(fisher_case):
    """At a fine step d, GPTQ's error of a row costs d^T H d = e d^2 / 12 per weight with e the
    matrix's gptq_energy, which correlated inputs put well under mean(diag H) (plain rounding's
    price); e is mean(diag H) for uncorrelated inputs."""
    state, hessians, *_ = fisher_case
    for name in ("blocks.0.attn.c_q.weight", "blocks.0.mlp.proj.weight"):
        w, h = state[name].double(), hessians[name].double()
        step = w.abs().amax(1) / 255  # fine: each code's error uniform over a step
        codes = tg.gptq_codes(w.float(), step.float(), 255, hessians[name])
        d = codes.double() * step[:, None] - w
        priced = tg.gptq_energy(hessians[name]) * step ** 2 / 12 * w.size(1)
        ratio = ((d @ h) * d).sum(1).sum() / priced.sum()
        assert 0.9 < float(ratio) < 1.1, (name, float(ratio))
        assert tg.gptq_energy(hessians[name]) < 0.5 * h.diagonal().mean()
    diagonal = torch.diag(torch.rand(64, dtype=torch.float64) + 0.5)
    assert torch.allclose(tg.gptq_energy(diagonal), diagonal.diagonal().mean())


def test_fisher_rule_beats_fill_and_one_factor_in_the_loss_it_estimates(fisher_case):
    """At the same budget, the Fisher rule's second-order loss is well under 'fill's and under the
    rule that widens every row's step by one factor (the Fisher rule with all F_r t_r^2 = s_r^-2),
    and under its own without the embeddings' weights (their rows then int8 at the absmax step)."""
    state, hessians, fisher, full, budget = fisher_case
    fisher_packed = tg.quantize_state(state, budget, hessians, rule="fisher", fisher=fisher)
    fill = tg.quantize_state(state, budget, hessians, rule="fill")
    energy = {n: tg.gptq_energy(hessians[n]) if n in hessians else 1.0 for n in fisher}
    uniform = {n: full[n][2].double() ** -2 / energy[n] for n in fisher}  # t_r = s_r
    one_factor = tg.quantize_state(state, budget, hessians, rule="fisher", fisher=uniform)
    matrices_only = tg.quantize_state(state, budget, hessians, rule="fisher",
                                      fisher={n: fisher[n] for n in hessians})
    for n in fisher.keys() - hessians.keys():
        assert all(torch.equal(a, b) for a, b in zip(matrices_only[n][1:], full[n][1:])), n
    packings = (fisher_packed, fill, one_factor, matrices_only)
    assert max(file_bytes(p) for p in packings) <= budget
    ours = loss_estimate(state, fisher_packed, hessians, fisher)
    assert ours < 0.8 * loss_estimate(state, fill, hessians, fisher)
    assert ours < 0.8 * loss_estimate(state, one_factor, hessians, fisher)
    assert ours < 0.995 * loss_estimate(state, matrices_only, hessians, fisher)


def test_fisher_rule_without_calibration_packs_as_fill(fisher_case):
    """No Fisher weights (GPTQ=0, or no time left for the calibration), or none for a matrix:
    exactly 'fill'."""
    state, hessians, fisher, _, budget = fisher_case
    fill = tg.quantize_state(state, budget, hessians, rule="fill")
    for weights in (None, {}, {n: f for n, f in fisher.items() if n != next(iter(hessians))}):
        packed = tg.quantize_state(state, budget, hessians, rule="fisher", fisher=weights)
        assert all(packed[n][0] == v[0]
                   and all(torch.equal(a, b) for a, b in zip(packed[n][1:], v[1:]))
                   for n, v in fill.items())


@pytest.mark.parametrize("rule", tg.EXPORT_RULES)
def test_quantize_state_ample_or_impossible_budget(mixed_state, tmp_path, rule):
    """At or above the all-int6 size nothing changes; below the all-int5 size every int6 matrix is
    int5 and the file is still written, over the budget, for the run's over-limit report
    (exit 3)."""
    state, full, full_bytes, floor, floor_bytes = mixed_state
    for budget in (full_bytes, full_bytes + 1000, math.inf):
        packed = tg.quantize_state(state, budget, rule=rule)
        assert all(packed[n][0] == v[0]
                   and all(torch.equal(a, b) for a, b in zip(packed[n][1:], v[1:]))
                   for n, v in full.items()), budget
    assert floor_bytes < full_bytes
    assert ({n for n, v in floor.items() if v[0] == "int5"}
            == {n for n, v in full.items() if v[0] == "int6"})
    packed = tg.quantize_state(state, floor_bytes - 1000, rule=rule)
    assert {v[0] for v in packed.values()} == {v[0] for v in floor.values()}
    assert file_bytes(packed) > floor_bytes - 1000
    tg.write_artifact(str(tmp_path / "over.ptz"), packed, {})
    assert (tmp_path / "over.ptz").stat().st_size == file_bytes(packed)


@pytest.mark.parametrize("rule", tg.EXPORT_RULES)
def test_export_fills_the_limit_and_logs_it(mixed_state, tmp_path, rule):
    """export() budgets the limit less the code, header and shape included, by EXPORT_RULE (rate:
    within 0.2%); the log line keeps its fields and appends the budget and the file's size; the
    artifact reads back to the packed codes exactly."""
    state, full, full_bytes, _, floor_bytes = mixed_state
    model = types.SimpleNamespace(state_dict=lambda: state)
    shape = dict(SHAPE, num_layers=6)
    code = 5000
    limit = int((full_bytes + floor_bytes) / 2) + code
    args = types.SimpleNamespace(artifact_limit_bytes=limit, artifact_path=str(tmp_path / "m.ptz"),
                                 shape=shape, world_size=1, export_rule=rule)
    logged = []
    digest = tg.export(args, model, logged.append, 0, code, None)
    size = (tmp_path / "m.ptz").stat().st_size
    assert (0.998 if rule == "rate" else 0.9) * (limit - code) <= size <= limit - code
    line = next(m for m in logged if m.startswith("export:"))
    assert re.fullmatch(rf"export: int6 matrices:\d+ int5 matrices:\d+ int8 embeddings:2 "
                        rf"budget:{limit - code} bytes:{size}", line), line
    got = tg.read_artifact(args.artifact_path, shape, "ARTIFACT_PATH", digest)
    want = tg.dequantize_state(tg.quantize_state(state, limit - code, None, shape, rule=rule))
    assert all(torch.equal(got[n], want[n]) for n in want)


# -----------------------------
# artifact file
# -----------------------------

SHAPE = dict(vocab_size=256, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=3.0,
             rope_dims=0, bigram_vocab_size=128, bigram_dim=16, xsa_last_n=2, coda_last_n=1)


@pytest.fixture(scope="module")
def packed_state():
    state = trained_like_state()
    # some int5 too, so every kind is in the file
    return tg.quantize_state(state, 0.97 * file_bytes(tg.quantize_state(state)))


def test_artifact_roundtrip_exact_and_atomic(packed_state, tmp_path):
    assert {v[0] for v in packed_state.values()} == {"int5", "int6", "int8", "fp16", "fp32"}
    path = tmp_path / "model.ptz"
    path.write_bytes(b"an older artifact")
    digest = tg.write_artifact(str(path), packed_state, SHAPE)
    blob = path.read_bytes()
    assert os.listdir(tmp_path) == ["model.ptz"] and blob.startswith(tg.ARTIFACT_MAGIC)
    assert digest == hashlib.sha256(blob[len(tg.ARTIFACT_MAGIC) + 32:]).digest()
    got, want = tg.read_artifact(str(path), dict(SHAPE)), tg.dequantize_state(packed_state)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        # bit-exact
        assert torch.equal(got[name].view(torch.int32), want[name].view(torch.int32)), name
    # deterministic bytes: the same state gives the same file
    tg.write_artifact(str(tmp_path / "again.ptz"), packed_state, SHAPE)
    assert (tmp_path / "again.ptz").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("fmt", [1, 2])
def test_artifact_older_formats_still_read(packed_state, tmp_path, fmt):
    """Formats 1 (rows in their own order) and 2 (rows by scale), each tensor a zstd frame, read
    back bit for bit."""
    path = tmp_path / f"v{fmt}.ptz"
    tg.write_artifact(str(path), packed_state, SHAPE, fmt=fmt)
    assert path.read_bytes().startswith(b"PGINT6\x00" + bytes([fmt]))
    got, want = tg.read_artifact(str(path), dict(SHAPE)), tg.dequantize_state(packed_state)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_artifact_rows_in_scale_order_compress_better():
    """Format 2: rows of two spreads interleaved, told apart by their scales: stored by scale,
    zstd's blocks each see one spread, and the file is smaller than in the rows' own order."""
    g = torch.Generator().manual_seed(0)
    wide = torch.arange(512) % 2 == 1
    codes = (torch.randn(512, 512, generator=g)
             * torch.where(wide, 12.0, 1.5)[:, None]).round().clamp(-31, 31)
    packed = {"m": ("int6", codes.to(torch.int8), torch.where(wide, 0.01, 0.02).half())}
    assert len(tg.serialize(packed, {}, fmt=2)) < 0.985 * len(tg.serialize(packed, {}, fmt=1))


def test_format3_refuses_a_code_it_cannot_store():
    """Codes are -127..127 (int8's symmetric range): -128 is refused by name, not wrapped into
    another code or another class's table."""
    packed = {"m": ("int6", torch.full((4, 8), -128, dtype=torch.int8), torch.ones(4).half())}
    with pytest.raises(ValueError, match="-128"):
        tg.serialize(packed, {})


def coarse_and_fine_rows(rows=768, cols=512, seed=0):
    """int6 codes as the Fisher rule leaves them: each row's step between 1 and 64 times its
    least-error step, so some rows spread over tens of codes and many are nearly all zeros."""
    g = torch.Generator().manual_seed(seed)
    spread = 12.0 * 2.0 ** -torch.linspace(0, 6, rows)[torch.randperm(rows, generator=g)]
    codes = (torch.randn(rows, cols, generator=g) * spread[:, None]).round().clamp(-31, 31)
    return codes.to(torch.int8), (0.01 / spread).half()


@pytest.mark.parametrize("n", [1, 7, 1023, 1024, 3 * 1024 + 7, 300_001, 5_000_000])
def test_rans_decodes_exactly_what_it_encoded(n):
    """Any count of codes (one lane, a full lane, lanes with the last padded, many lanes), every
    symbol of the alphabet at the extremes, and a class whose rows hold a single symbol."""
    g = np.random.default_rng(n)
    sym = np.clip(np.rint(g.standard_normal(n) * g.choice([0.3, 4.0, 60.0], n)), -127, 127)
    sym = (sym + 127).astype(np.uint8)
    cls = g.integers(0, tg.RANS_CLASSES - 1, n).astype(np.uint8)
    sym[: n // 3] = 127  # code 0 alone
    cls[: n // 3] = tg.RANS_CLASSES - 1
    if n > 2:
        sym[-2:] = (0, 254)  # codes -127 and 127
    freq = tg.rans_tables(sym, cls)
    assert (freq.astype(np.int64).sum(1) == 1 << tg.RANS_BITS).all()
    states, words = tg.rans_encode(sym, cls, freq)
    assert len(states) == tg.rans_lanes(n)
    assert np.array_equal(tg.rans_decode(states, words, cls, freq), sym)


def test_rans_refuses_a_lane_started_off_the_encoders_state():
    """A state off by d from the one the encoder ended at decodes other codes (or the same ones
    and another end state), yet often reads exactly the stream's words: only the decoder's end,
    every lane back at the encoder's first state, tells. Each of 99 offsets is refused."""
    g = np.random.default_rng(0)
    sym = (np.clip(np.rint(g.standard_normal(2000) * 3), -127, 127) + 127).astype(np.uint8)
    cls = np.zeros(len(sym), np.uint8)
    freq = tg.rans_tables(sym, cls)
    states, words = tg.rans_encode(sym, cls, freq)
    for d in range(1, 100):
        with pytest.raises(ValueError):
            tg.rans_decode(states + np.uint32(d), words, cls, freq)


def test_rans_stream_is_as_long_as_its_tables_say():
    """An entropy coder's output is the codes' length under its model (-log2 of each code's
    frequency), give or take each lane's start and end state: nothing is lost between them."""
    codes, _ = coarse_and_fine_rows()
    sym = (codes.numpy().reshape(-1).astype(np.int16) + 127).astype(np.uint8)
    cls = np.repeat(np.arange(len(codes)) % tg.RANS_CLASSES, codes.shape[1]).astype(np.uint8)
    freq = tg.rans_tables(sym, cls)
    ideal = -np.log2(freq[cls, sym] / 2 ** tg.RANS_BITS).sum() / 8
    states, words = tg.rans_encode(sym, cls, freq)
    lanes = len(states)
    assert ideal - 2 * lanes <= words.nbytes <= ideal + 2 * lanes + 2


def test_format3_codes_coarse_rows_smaller_than_zstd():
    """The reason for format 3: zstd's Huffman spends at least a bit a code, where rows at coarse
    steps hold mostly zeros; the rANS stream, its classes and tables included, is smaller than
    format 2 on such rows (by 3.6% here)."""
    codes, scales = coarse_and_fine_rows(rows=1536)
    packed = {"m": ("int6", codes, scales)}
    assert len(tg.serialize(packed, {}, fmt=3)) < 0.975 * len(tg.serialize(packed, {}, fmt=2))


def test_format3_damaged_stream_is_an_unreadable_payload(tmp_path):
    """A payload whose checksum is good but whose rANS stream is not what was encoded (a word
    flipped, missing or added, lanes' states swapped, a class or table out of its range) is refused
    as unreadable, never decoded into other weights or a traceback."""
    codes, scales = coarse_and_fine_rows()
    payload = tg.serialize({"m": ("int6", codes, scales)}, {})
    start = 4 + int.from_bytes(payload[:4], "little")
    index = json.loads(zstandard.ZstdDecompressor().decompress(payload[4:start]))
    ends = np.cumsum([start] + index["frames"])
    tables_at, states_at, words_at = ends[-4:-1]
    table = np.frombuffer(zstandard.ZstdDecompressor().decompress(
        payload[tables_at:states_at]), np.uint16).reshape(tg.RANS_CLASSES, -1)
    short, moved = table.copy(), table.copy()
    short[np.arange(len(table)), table.argmax(1)] -= 1  # every class's sum one short
    moved[0, table[0].argmax()] -= 1  # the same sums, one code's share moved to another's
    moved[0, table[0].argmax() + 1] += 1

    def with_frame(i, data):  # frame i (of the last 4) replaced, the index's lengths with it
        parts = [payload[a:b] for a, b in zip(ends[-5:-1], ends[-4:])]
        parts[i] = data
        header = tg.zstd22(json.dumps(dict(index, frames=[*index["frames"][:-4],
                                                          *map(len, parts)])).encode())
        return (len(header).to_bytes(4, "little") + header + payload[start:ends[-5]]
                + b"".join(parts))

    words = payload[words_at:]
    states = np.frombuffer(payload[states_at:words_at], np.uint32)
    damaged = {
        "flipped_word": payload[:words_at + 10] + bytes([payload[words_at + 10] ^ 4])
        + payload[words_at + 11:],
        "missing_word": with_frame(3, words[:-2]),
        "extra_word": with_frame(3, words + b"\x00\x01"),
        "swapped_states": with_frame(2, states[::-1].tobytes()),
        "class_out_of_range": with_frame(0, tg.zstd22(bytes([tg.RANS_CLASSES]) * len(codes))),
        "tables_short": with_frame(1, tg.zstd22(short.tobytes())),
        "tables_moved": with_frame(1, tg.zstd22(moved.tobytes())),
        "state_bit": with_frame(2, (states ^ np.eye(1, len(states), 5, np.uint32)).tobytes()),
        "last_word_bit": payload[:-2] + bytes([payload[-2] ^ 1]) + payload[-1:],
    }
    assert len(states) > 1 and states[0] != states[-1]
    for name, bad in damaged.items():
        with pytest.raises(ValueError):
            tg.deserialize(bad)
        path = tmp_path / f"{name}.ptz"
        path.write_bytes(tg.ARTIFACT_MAGIC + hashlib.sha256(bad).digest() + bad)
        expect_config_error(path, {}, "unreadable")


def test_artifact_failed_write_leaves_old_file(packed_state, tmp_path):
    path = tmp_path / "model.ptz"
    tg.write_artifact(str(path), packed_state, SHAPE)
    before = path.read_bytes()
    # numpy cannot take bf16
    bad = dict(packed_state, oops=("fp16", torch.zeros(3, dtype=torch.bfloat16)))
    with pytest.raises(Exception):
        tg.write_artifact(str(path), bad, SHAPE)
    assert os.listdir(tmp_path) == ["model.ptz"] and path.read_bytes() == before


def test_artifact_failed_rename_leaves_no_temp_file(packed_state, tmp_path):
    """The file is written, the rename onto the target fails (a directory there): no temp file
    stays."""
    (tmp_path / "model.ptz").mkdir()
    with pytest.raises(OSError):
        tg.write_artifact(str(tmp_path / "model.ptz"), packed_state, SHAPE)
    assert os.listdir(tmp_path) == ["model.ptz"] and os.listdir(tmp_path / "model.ptz") == []


def expect_config_error(path, shape=SHAPE, *needles):
    with pytest.raises(tg.ConfigError) as e:
        tg.read_artifact(str(path), dict(shape))
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    for needle in needles:
        assert needle in msg
    return msg


def test_artifact_bad_files(packed_state, tmp_path):
    good = tmp_path / "good.ptz"
    tg.write_artifact(str(good), packed_state, SHAPE)
    blob = good.read_bytes()
    head = len(tg.ARTIFACT_MAGIC) + 32

    def variant(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    for cut in (len(blob) - 1, len(blob) // 2, head + 3, head, 20, len(tg.ARTIFACT_MAGIC), 3, 0):
        expect_config_error(variant(f"cut{cut}.ptz", blob[:cut]))
    for pos in (head, head + 2, head + 4, head + 100, len(blob) // 2, len(blob) - 1,
                len(tg.ARTIFACT_MAGIC) + 5):
        flipped = bytearray(blob)
        flipped[pos] ^= 0x01
        expect_config_error(variant(f"flip{pos}.ptz", bytes(flipped)), SHAPE, "corrupted")
    expect_config_error(variant("magic.ptz", b"PGINT7\x00\x01" + blob[8:]), SHAPE,
                        "not an artifact")
    expect_config_error(variant("text.ptz", b"hello\n"))
    expect_config_error(variant("trailing.ptz", blob + b"\x00"))
    # a valid checksum over a payload that is not ours, or has bytes after its last frame
    for name, payload in (("garbage", b"\x10\x00\x00\x00" + bytes(range(200))),
                          ("extra", blob[head:] + b"\x28\xb5\x2f\xfd"),
                          ("json", (2).to_bytes(4, "little") + b"{}")):
        expect_config_error(variant(f"{name}.ptz",
                                    tg.ARTIFACT_MAGIC + hashlib.sha256(payload).digest() + payload),
                            SHAPE, "unreadable")
    # a valid checksum and index whose tensors' shapes cannot be a file's: refused, never a
    # traceback
    def indexed(tensors, frames):
        index = tg.zstd22(json.dumps({"shape": SHAPE, "tensors": tensors,
                                      "frames": [len(f) for f in frames]}).encode())
        return len(index).to_bytes(4, "little") + index + b"".join(frames)

    codes, scales = tg.zstd22(bytes(12)), tg.zstd22(bytes(4))
    for name, tensor in (("rank0", ["m", "int6", []]), ("rank3", ["m", "int6", [1, 2, 6]]),
                         ("negative", ["m", "int6", [-1, 12]]),
                         ("huge", ["m", "int6", [2 ** 40, 2 ** 40]]),
                         ("fraction", ["m", "fp16", [1.5]]), ("few_scales", ["m", "int8", [3, 4]]),
                         ("kind_a_number", ["m", 5, [3, 4]]), ("kind_unknown", ["m", "int4", [3]]),
                         ("too_many_values", ["m", "int8", [2 ** 16, 2 ** 16]])):
        payload = indexed([tensor], [codes, scales])
        expect_config_error(variant(f"{name}.ptz",
                                    tg.ARTIFACT_MAGIC + hashlib.sha256(payload).digest() + payload),
                            SHAPE, "unreadable")
    # frames that declare more than the index implies (zstd would allocate what they declare):
    # an index of 2^40 bytes, a 3x4 int8 tensor's frame of 2^40 bytes
    bomb = struct.pack("<IBQ", 0xFD2FB528, 0b11100000, 1 << 40) + (1).to_bytes(3, "little")
    for name, payload in (("index_bomb", len(bomb).to_bytes(4, "little") + bomb),
                          ("frame_bomb", indexed([["m", "int8", [3, 4]]], [bomb, scales]))):
        expect_config_error(variant(f"{name}.ptz",
                                    tg.ARTIFACT_MAGIC + hashlib.sha256(payload).digest() + payload),
                            SHAPE, "unreadable")
    # an all-zero matrix codes in no words at all: a file of a few KB may declare any shape, so
    # the index's total is bounded before anything is decoded
    classes, tables = tg.zstd22(bytes(1)), np.zeros((tg.RANS_CLASSES, tg.RANS_SYMBOLS), np.uint16)
    tables[:, 127] = 1 << tg.RANS_BITS  # code 0 certain: it costs nothing
    for cols in (2 ** 20, 2 ** 31):
        lanes = tg.rans_lanes(cols)
        payload = indexed([["m", "int6", [1, cols]]],
                          [tg.zstd22(bytes(2)), classes, tg.zstd22(tables.tobytes()),
                           np.full(lanes, tg.RANS_LOW, np.uint32).tobytes(), b""])
        path = variant(f"zeros_{cols}.ptz",
                       tg.ARTIFACT_MAGIC + hashlib.sha256(payload).digest() + payload)
        if cols <= tg.ARTIFACT_MAX_VALUES:  # a real (if odd) file: it reads, all zeros
            assert not tg.deserialize(path.read_bytes()[40:])[1]["m"][1].any()
        else:
            expect_config_error(path, SHAPE, "unreadable")
    expect_config_error(tmp_path / "missing.ptz", SHAPE, "cannot read")
    expect_config_error(tmp_path, SHAPE, "cannot read")  # a directory
    # written for another model shape: names the variable and both values
    expect_config_error(good, dict(SHAPE, num_layers=5), "NUM_LAYERS=4", "NUM_LAYERS=5")
    expect_config_error(good, dict(SHAPE, mlp_mult=2.0), "MLP_MULT")
    expect_config_error(good, {k: v for k, v in SHAPE.items() if k != "coda_last_n"},
                        "CODA_LAST_N=0")
    # a key the artifact lacks is a feature it had off: value embeddings on in this run only
    expect_config_error(good, dict(SHAPE, ve_last_n=2, ve_dim=128), "VE_LAST_N=0", "VE_LAST_N=2")
    # CoDA's head norm is recorded only off its default: absent reads as rms
    expect_config_error(good, dict(SHAPE, coda_head_norm="none"), "CODA_HEAD_NORM=rms",
                        "CODA_HEAD_NORM=none")
    # the good one still reads
    assert tg.read_artifact(str(good), dict(SHAPE)).keys() == packed_state.keys()


def test_artifact_replaced_since_it_was_written_is_refused(packed_state, tmp_path):
    """A run scores only the file it wrote: another run's artifact at the same path (valid, same
    shape) is refused by its sha256."""
    path = tmp_path / "model.ptz"
    mine = tg.write_artifact(str(path), packed_state, SHAPE)
    assert (tg.read_artifact(str(path), dict(SHAPE), "ARTIFACT_PATH", mine).keys()
            == packed_state.keys())
    other = {name: (entry[0], entry[1].clone(), *entry[2:]) for name, entry in packed_state.items()}
    name = next(n for n, e in other.items() if e[0] == "fp16")
    other[name][1].add_(1.0)
    tg.write_artifact(str(path), other, SHAPE)
    with pytest.raises(tg.ConfigError, match="not the artifact this run wrote"):
        tg.read_artifact(str(path), dict(SHAPE), "ARTIFACT_PATH", mine)


def test_artifact_shape_holds_every_setting_that_changes_the_function():
    """ROPE_BASE and LOGIT_SOFTCAP change what the model computes from the same weights: an artifact
    written with another value must not load. Initialisation-only settings must not block a load."""
    base = tg.Hyperparameters().shape
    for var, value, key in (("ROPE_BASE", "500000", "rope_base"),
                            ("LOGIT_SOFTCAP", "15", "logit_softcap")):
        os.environ[var] = value
        try:
            assert tg.Hyperparameters().shape[key] != base[key], var
        finally:
            del os.environ[var]
    for var in ("QK_GAIN_INIT", "TIED_EMBED_INIT_STD", "MATRIX_LR", "TRAIN_SEQ_LEN"):
        os.environ[var] = "0.5" if var != "TRAIN_SEQ_LEN" else "1024"
        try:
            assert tg.Hyperparameters().shape == base, var
        finally:
            del os.environ[var]
