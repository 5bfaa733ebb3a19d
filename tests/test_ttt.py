"""Legal score-first test-time training (test_time_train) on CPU: every target scored once, before
any training on it; the first chunk scored by the untouched model; a later chunk's tokens cannot
reach an earlier chunk's score; two ranks (gloo) agree with one process."""
import json
import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import synth
import train_gpt as tg
from test_eval_export import CPU, dataset_tokens, free_port, num_threads, tiny_gpt

L, STRIDE, N = 32, 8, 600  # window, stride, targets


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with num_threads(1):
        yield


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    ds = synth.make_dataset(str(tmp_path_factory.mktemp("ttt")), n_train_shards=1,
                            train_tokens_per_shard=1000, val_docs=10)
    tokens, sp = dataset_tokens(ds)
    assert tokens.numel() > N + 1
    return tokens[:N + 1].clone(), tg.build_byte_luts(sp, CPU)


def ttt_args(chunk=128, lr=0.05, epochs=2, freeze=0, micro_tokens=2 * L, max_seconds=0.0):
    """micro_tokens 2 L: a chunk's 3 or 4 sequences take two micro-batches, the last one padded."""
    return types.SimpleNamespace(ttt_chunk_tokens=chunk, ttt_epochs=epochs, ttt_lr=lr,
                                 ttt_momentum=0.9, ttt_freeze_blocks=freeze, ttt_grad_clip=1.0,
                                 micro_batch_tokens=micro_tokens, ttt_max_seconds=max_seconds)


def per_row(model):
    """nll_fn (with gradients when enabled) that runs one window at a time: no batch effects."""
    return lambda x, y: torch.cat([model.token_nll(x[i:i + 1], y[i:i + 1])
                                   for i in range(x.size(0))])


def tiny_gpt64():
    """tiny_gpt in float64: its float32 per-token nll then no longer carries float32 rounding of
    weights trained in another order (summed over ranks vs in one process)."""
    model = tiny_gpt().double()
    model.act_dtype = torch.float64
    return model


def run_ttt(tokens, luts, args, model=None, stride=STRIDE, rank=0, world=1, nll_fn=None,
            spent=0.0):
    model = model if model is not None else tiny_gpt()
    ev = tg.Evaluator(tokens, L, stride, luts, CPU, rank, world, batch_tokens=3 * L)
    logs = []
    result, sums = tg.test_time_train(ev, stride, model, nll_fn or per_row(model), args,
                                      logs.append, spent)
    return result, sums, logs


def chunk_edges(n, stride, chunk):
    """The rule, restated: a window belongs to the chunk of its first scored target."""
    edges = []
    for start, first in tg.plan_windows(n, min(L, n), stride):
        if not edges or (start + first) // chunk != edges[-1] // chunk:
            edges.append(start + first)
    return edges + [n]


def plain_chunk_sums(tokens, luts, stride, edges):
    """Each chunk's nll sum by the untouched model, one window at a time."""
    model, sums = tiny_gpt(), [0.0] * (len(edges) - 1)
    with torch.no_grad():
        for start, first in tg.plan_windows(tokens.numel() - 1, L, stride):
            c = max(i for i, e in enumerate(edges[:-1]) if e <= start + first)
            x, y = tokens[start:start + L][None], tokens[start + 1:start + L + 1][None]
            sums[c] += model.token_nll(x, y)[0, first:].double().sum().item()
    return sums


@pytest.mark.parametrize("chunk,stride", [(128, 8), (100, 8), (96, 32), (40, 16), (1000, 8)])
def test_every_target_scored_once_in_chunks_cut_at_window_edges(val, chunk, stride):
    """100 and 40 are not multiples of the stride, 96 and 40 not of the window: chunks still end at
    window edges; 1000 is one chunk (no training)."""
    tokens, luts = val
    edges = chunk_edges(N, stride, chunk)
    result, sums, logs = run_ttt(tokens, luts, ttt_args(chunk=chunk), stride=stride)
    plain = tg.Evaluator(tokens, L, stride, luts, CPU, 0, 1)(per_row(tiny_gpt()))
    assert result[2:] == plain[2:] and result[2] == N  # the same targets, the same bytes
    # each chunk's own targets
    assert sums[:, 1].tolist() == [b - a for a, b in zip(edges, edges[1:])]
    assert sums[:, 2].sum().item() == result[3]
    assert (logs[-1] == f"ttt_eval chunks:{len(edges) - 1} tokens:{N} "
            + logs[-1].split(f"tokens:{N} ")[1])
    # one chunk: nothing trained, the plain score
    assert (result[0] == plain[0]) == (len(edges) == 2)


def test_first_chunk_is_scored_by_the_untouched_model_and_training_changes_the_rest(val):
    tokens, luts = val
    edges = chunk_edges(N, STRIDE, 128)
    plain = plain_chunk_sums(tokens, luts, STRIDE, edges)
    _, sums, _ = run_ttt(tokens, luts, ttt_args())
    assert sums[0, 0].item() == plain[0]  # exact: float64 sums of the same float32 values
    assert all(abs(sums[c, 0].item() - plain[c]) > 1e-6 for c in range(1, len(plain)))  # it trained
    _, tiny, _ = run_ttt(tokens, luts, ttt_args(lr=1e-30))  # updates below float32 resolution
    assert tiny[:, 0].tolist() == pytest.approx(plain, rel=1e-12, abs=0)


def test_a_later_chunks_tokens_cannot_change_an_earlier_chunks_score(val):
    tokens, luts = val
    _, sums, _ = run_ttt(tokens, luts, ttt_args())
    for c in (1, 3):  # chunk c's targets are tokens[128 c + 1 : 128 (c + 1) + 1]
        changed = tokens.clone()
        changed[128 * c + 1:128 * (c + 1) + 1] = ((changed[128 * c + 1:128 * (c + 1) + 1] + 7)
                                                  % synth.VOCAB_SIZE)
        _, other, _ = run_ttt(changed, luts, ttt_args())
        assert torch.equal(other[:c], sums[:c]), c  # bit-identical: nothing of chunk c reached them
        assert other[c, 0] != sums[c, 0]


@pytest.mark.parametrize("chunk,stride", [(128, 8), (100, 8)])
def test_nothing_is_trained_on_before_it_is_scored(chunk, stride):
    """Token values are their positions, so a spy nll_fn sees which targets each call touches: every
    token a training call reads (inputs and targets) must have been scored before."""
    torch.manual_seed(0)
    model = tg.GPT(vocab_size=1024, num_layers=2, model_dim=16, num_heads=2, num_kv_heads=1,
                   mlp_mult=2, max_seq_len=L, bigram_vocab_size=0, act_dtype=torch.float32)
    tokens = torch.arange(N + 1)
    luts = (torch.ones(1024, dtype=torch.int16), torch.zeros(1024, dtype=torch.bool),
            torch.zeros(1024, dtype=torch.bool))
    calls = []
    scored = [-1]

    def spy(x, y):
        nll = per_row(model)(x, y)
        if torch.is_grad_enabled():
            calls.append((int(x.min()), int(y.max()), scored[-1]))
        else:
            # a window's last target is the last it scored (padding windows score nothing: earlier)
            scored.append(max(scored[-1], int(y.max())))
        return nll

    result, sums, _ = run_ttt(tokens, luts, ttt_args(chunk=chunk), model=model, stride=stride,
                              nll_fn=spy)
    assert result[2] == N and calls
    edges = chunk_edges(N, stride, chunk)
    # 2 micro-batches x 2 epochs x every chunk but the last
    assert len(calls) == 2 * 2 * (len(edges) - 2)
    for lo, hi, seen in calls:
        assert hi <= seen, (lo, hi, seen)  # the highest token read was scored already
        assert lo >= 0
    assert scored[-1] == N  # and the last chunk was scored after all training


def test_a_time_limit_already_reached_scores_every_chunk_untrained(val):
    """TTT_MAX_SECONDS: once the rest could no longer be scored in time, training stops and every
    later chunk is still scored, once, by the last weights; a limit reached at the first chunk gives
    the plain score."""
    tokens, luts = val
    edges = chunk_edges(N, STRIDE, 128)
    result, sums, logs = run_ttt(tokens, luts, ttt_args(max_seconds=1e-9))
    assert sums[:, 0].tolist() == plain_chunk_sums(tokens, luts, STRIDE, edges)
    assert result[2] == N and sums[:, 1].tolist() == [b - a for a, b in zip(edges, edges[1:])]
    assert [line.split(" at ")[:2] for line in logs if "stopped" in line] == [
        ["ttt_eval: training stopped", f"chunk 1/{len(edges) - 1} (0 trained)"]], logs
    _, free, logs = run_ttt(tokens, luts, ttt_args(max_seconds=1e6))  # far away: as without a limit
    assert (torch.equal(free, run_ttt(tokens, luts, ttt_args())[1])
            and not [x for x in logs if "stopped" in x])


def test_the_evaluations_time_before_ttt_counts_against_the_limit(val):
    """TTT_MAX_SECONDS bounds the evaluation, not TTT alone: 1,000 s spent before TTT against a
    1,000 s limit stops training at the first chunk, as a limit already reached does, and the stop
    line gives the evaluation's time; the same limit with nothing spent trains on every chunk."""
    tokens, luts = val
    _, sums, logs = run_ttt(tokens, luts, ttt_args(max_seconds=1000.0), spent=1000.0)
    assert torch.equal(sums, run_ttt(tokens, luts, ttt_args(max_seconds=1e-9))[1])
    stop = [line for line in logs if "stopped" in line]
    assert len(stop) == 1 and "chunk 1/" in stop[0], logs
    assert 1000.0 <= float(stop[0].split(" at ")[2].split("s ")[0]) < 1100.0
    _, free, logs = run_ttt(tokens, luts, ttt_args(max_seconds=1000.0), spent=0.0)
    assert not [line for line in logs if "stopped" in line]
    assert torch.equal(free, run_ttt(tokens, luts, ttt_args())[1])


def test_the_first_chunks_compiling_is_not_taken_for_the_rate(val):
    """A first scoring call 3 s slow (as compiling makes it) would project 3 s for each of the 4
    chunks left, over a 10 s limit; the rates come from the chunks after it, so TTT trains on every
    chunk."""
    tokens, luts = val
    model, calls = tiny_gpt(), []

    def slow_first(x, y):
        if not calls and not torch.is_grad_enabled():
            time.sleep(3)
        calls.append(1)
        return per_row(model)(x, y)
    _, sums, logs = run_ttt(tokens, luts, ttt_args(max_seconds=10.0), model, nll_fn=slow_first)
    assert not [line for line in logs if "stopped" in line], logs
    assert torch.equal(sums, run_ttt(tokens, luts, ttt_args())[1])


def test_frozen_blocks_keep_their_weights(val):
    tokens, luts = val
    model = tiny_gpt()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_ttt(tokens, luts, ttt_args(freeze=1), model=model)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == name.startswith("blocks.0."), name
        assert p.requires_grad and p.grad is None  # left as found
    assert not torch.equal(model.tok_emb.weight, before["tok_emb.weight"])


def test_micro_batches_and_their_padding_do_not_change_the_result(val):
    """A chunk of 96 targets trains on 3 sequences: in 3 micro-batches of 1, in 2 of 2 (one a
    zero-weight padding row) or in 1 of 3, the same step (float64: to summation order)."""
    tokens, luts = val
    runs = [run_ttt(tokens, luts, ttt_args(chunk=96, micro_tokens=k * L), tiny_gpt64())[1]
            for k in (1, 2, 3)]
    for other in runs[1:]:
        assert other.flatten().tolist() == pytest.approx(runs[0].flatten().tolist(), rel=1e-12,
                                                         abs=0)


DIST_CASES = [dict(chunk=128), dict(chunk=96, freeze=1)]  # 96: 3 sequences a chunk, 1 and 2 a rank


def _dist_worker(rank, world_size, port, tokens, luts, out_path):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        out = []
        for case in DIST_CASES:
            result, sums, _ = run_ttt(tokens, luts, ttt_args(**case), tiny_gpt64(), rank=rank,
                                      world=world_size)
            out.append([list(result[:2]), result[2:], sums.tolist()])
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(out, f)


def _late_rank_worker(rank, world_size, port, tokens, luts, out_path):
    """Rank 1's clock runs 10^6 times fast: its limit of 1000 s passes at once, rank 0's never."""
    import datetime
    import os
    import time
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank == 1:
        real = time.perf_counter
        tg.time = types.SimpleNamespace(**{**vars(time), "perf_counter": lambda: 1e6 * real()})
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        _, sums, logs = run_ttt(tokens, luts, ttt_args(max_seconds=1000.0), tiny_gpt64(), rank=rank,
                                world=world_size)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump([sums.tolist(), logs], f)


def test_ranks_stop_training_at_the_same_chunk_when_their_clocks_differ(val, tmp_path):
    """The limit is judged by the slowest rank's clock: a rank stopping alone would leave the other
    waiting in the gradient's all-reduce (here: a 60 s gloo timeout) or train the ranks apart."""
    tokens, luts = val
    out = tmp_path / "late.json"
    mp.spawn(_late_rank_worker, args=(2, free_port(), tokens, luts, str(out)), nprocs=2, join=True)
    sums, logs = json.loads(out.read_text())
    assert [line.split(" at ")[:2] for line in logs if "stopped" in line] == [
        ["ttt_eval: training stopped", f"chunk 1/{len(sums)} (0 trained)"]], logs
    _, one, _ = run_ttt(tokens, luts, ttt_args(max_seconds=1e-9), tiny_gpt64())
    assert [s[1:] for s in sums] == one[:, 1:].tolist()
    assert [s[0] for s in sums] == pytest.approx(one[:, 0].tolist(), rel=1e-12, abs=0)


def test_two_ranks_gloo_equal_one_process(val, tmp_path):
    """The same targets, bytes and chunk sums (to 1e-12: the gradient is summed over ranks in
    another order than in one process; in float32 that moved the trained chunks' sums by up to
    3.5e-6, the float32 model's own precision, so the model runs in float64 here)."""
    tokens, luts = val
    out = tmp_path / "ttt.json"
    mp.spawn(_dist_worker, args=(2, free_port(), tokens, luts, str(out)), nprocs=2, join=True)
    for case, (scores, counts, sums) in zip(DIST_CASES, json.loads(out.read_text())):
        result, one, _ = run_ttt(tokens, luts, ttt_args(**case), tiny_gpt64())
        assert tuple(counts) == result[2:]
        assert sums[0] == one[0].tolist()
        assert [s[1:] for s in sums] == one[:, 1:].tolist()
        assert [s[0] for s in sums] == pytest.approx(one[:, 0].tolist(), rel=1e-12, abs=0)
        assert scores == pytest.approx(list(result[:2]), rel=1e-12, abs=0)


def test_final_evaluation_hands_ttt_the_time_since_training_ended(tmp_path):
    """The run starts the evaluation's clock when the training loop ends: the evaluations before
    TTT (and the export) are spent out of TTT_MAX_SECONDS, and evaluation_time reports the whole.
    Without a start (LOAD_ARTIFACT) the clock starts with the evaluation."""
    model, calls, logs = tiny_gpt(), [], []
    artifact = tmp_path / "a.ptz"
    artifact.write_bytes(b"x" * 10)

    def evaluate(stride=None, ttt=False, spent=0.0):
        calls.append((stride, ttt, spent))
        return 1.0, 1.5, 10, 20
    args = types.SimpleNamespace(eval_stride=STRIDE, ttt_enabled=True)
    weights = model.state_dict()
    result = tg.final_evaluation(args, model, evaluate, str(artifact), weights, 5, logs.append,
                                 t_eval=time.perf_counter() - 100.0)
    assert [c[:2] for c in calls] == [(None, False), (STRIDE, False), (STRIDE, True)]
    assert 100.0 <= calls[-1][2] < 110.0 and result["score"] == "legal_ttt_exact"
    reported = [line for line in logs if line.startswith("evaluation_time:")]
    assert len(reported) == 1 and 100.0 <= float(reported[0][16:-1]) < 110.0, logs
    calls.clear()
    tg.final_evaluation(args, model, evaluate, str(artifact), weights, 5, logs.append)
    assert 0.0 <= calls[-1][2] < 10.0
