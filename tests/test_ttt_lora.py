"""Per-document LoRA TTT (TTT_MODE=lora, doc_test_time_train) on CPU: documents cut at BOS; every
target scored once, by the window ending with its chunk; a token cannot change any score before it;
each document adapts alone (the rows a batch has, the ranks, never change a score); the time limit
scores the rest untrained."""
import json
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg
from test_eval_export import CPU, free_port, num_threads, tiny_gpt
from test_ttt import L, N, tiny_gpt64, val  # noqa: F401 (val: the fixture)

BOS = 1  # synth's tokenizer; each synthetic validation document starts with it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with num_threads(1):
        yield


def lora_args(lr=0.01, chunk=8, batch=3, rank=4, max_seconds=0.0):
    return types.SimpleNamespace(ttt_lora_lr=lr, ttt_lora_chunk=chunk, ttt_lora_batch=batch,
                                 ttt_lora_rank=rank, ttt_max_seconds=max_seconds)


def run_lora(tokens, luts, args, model=None, bos=BOS, rank=0, world=1):
    model = model if model is not None else tiny_gpt()
    ev = tg.Evaluator(tokens, L, L, luts, CPU, rank, world)
    logs = []
    result, nll_at = tg.doc_test_time_train(ev, model, model.token_nll, args, logs.append, bos)
    return result, nll_at, logs


def documents(tokens):
    starts = tg.document_starts(tokens, BOS, tokens.numel() - 1)
    return list(zip(starts, starts[1:] + [tokens.numel() - 1]))


def test_documents_run_from_each_bos_to_the_next():
    tokens = torch.tensor([5, 1, 7, 8, 1, 9, 9, 1])  # 7 targets; the last token is a BOS
    assert tg.document_starts(tokens, BOS, 7) == [0, 1, 4]
    # a leading BOS: one start
    assert tg.document_starts(torch.tensor([1, 7, 1, 8]), BOS, 3) == [0, 2]
    assert tg.document_starts(tokens, -1, 7) == [0]  # a tokenizer without BOS: one document


def test_the_validation_documents_partition_the_targets(val):
    """Each document's first target reads its BOS and its last predicts the next document's BOS."""
    tokens, _ = val
    docs = documents(tokens)
    assert len(docs) > 3 and docs[0][0] == 0 and docs[-1][1] == N
    assert all(e == s for (_, e), (s, _) in zip(docs, docs[1:]))
    assert all(tokens[s] == BOS for s, _ in docs) and all(tokens[e] == BOS for _, e in docs[:-1])
    assert all(BOS not in tokens[s + 1:e].tolist() for s, e in docs)


@pytest.mark.parametrize("chunk", [8, 16, 32])
def test_one_document_untrained_scores_as_the_sliding_window_of_stride_chunk(val, chunk):
    """No BOS, updates below float32 resolution: the chunks' windows are the sliding evaluator's of
    stride chunk (when it divides the window), so the same targets, bytes and loss."""
    tokens, luts = val
    model = tiny_gpt()
    result, _, logs = run_lora(tokens, luts, lora_args(lr=1e-30, chunk=chunk), model, bos=-1)
    plain = tg.Evaluator(tokens, L, chunk, luts, CPU, 0, 1)(model.token_nll)
    assert result[2:] == plain[2:] and result[2] == N
    assert result[:2] == pytest.approx(plain[:2], rel=1e-12, abs=0)
    assert (logs[-1].startswith(f"ttt_eval chunks:{-(-N // chunk)} tokens:{N} time:")
            and " docs:1 " in logs[-1])


def test_every_target_is_scored_once_and_each_documents_first_chunk_untouched(val):
    tokens, luts = val
    result, nll_at, _ = run_lora(tokens, luts, lora_args())
    _, untrained, _ = run_lora(tokens, luts, lora_args(lr=1e-30))
    plain = tg.Evaluator(tokens, L, L, luts, CPU, 0, 1)(tiny_gpt().token_nll)
    assert result[2:] == plain[2:]  # the same targets and bytes as every other evaluation
    assert torch.all(nll_at > 0)  # none missed (a target scored twice would fail the count check)
    for s, e in documents(tokens):  # the first chunk: fresh adapters, B = 0
        assert torch.equal(nll_at[s:s + 8], untrained[s:s + 8])
        if e - s > 16:
            assert not torch.equal(nll_at[s + 8:e], untrained[s + 8:e])  # the later chunks: adapted
    assert (result[0] < plain[0] + 0.5
            and result[0] != pytest.approx(untrained.double().mean().item()))


@pytest.mark.parametrize("p", [100, 333, 517])
def test_a_token_cannot_change_any_score_before_it(val, p):
    """Token p changed (p in the middle of a chunk): every target before the one predicting it keeps
    its nll to the bit, so no chunk was trained on before it was scored (training first would move
    the scores of the chunk's earlier targets) and no document saw a later one; the document's later
    targets move."""
    tokens, luts = val
    _, nll_at, _ = run_lora(tokens, luts, lora_args(lr=0.05))
    changed = tokens.clone()
    changed[p] = (changed[p] + 7) % 64 + 4  # an ordinary token: the documents stay the same
    _, other, _ = run_lora(changed, luts, lora_args(lr=0.05))
    assert torch.equal(other[:p - 1], nll_at[:p - 1])
    end = next(e for s, e in documents(tokens) if s <= p - 1 < e)
    assert not torch.equal(other[p - 1:end], nll_at[p - 1:end])


@pytest.mark.parametrize("batch", [1, 2, 5, 16])
def test_each_document_adapts_alone_whatever_the_rows(val, batch):
    """One row (documents one after another, adapters reset between them), or several at once, or
    more rows than documents: each target's nll is the same (float64 model: to summation order)."""
    tokens, luts = val
    _, ref, _ = run_lora(tokens, luts, lora_args(batch=3), tiny_gpt64())
    _, got, _ = run_lora(tokens, luts, lora_args(batch=batch), tiny_gpt64())
    assert got.tolist() == pytest.approx(ref.tolist(), rel=1e-6, abs=0)


def test_a_long_document_adapts_in_pieces_each_from_a_fresh_start(val, monkeypatch):
    """A stream without BOS is one document of 600 targets: in pieces of 48, each piece's first
    chunk scores as untrained and its later ones are adapted, and the rows take the pieces at once,
    so the steps are a piece's chunks, not the document's."""
    tokens, luts = val
    monkeypatch.setattr(tg, "LORA_PIECE_TARGETS", 48)
    args = lora_args(lr=0.05, batch=16)
    _, nll_at, logs = run_lora(tokens, luts, args, bos=-1)
    _, untrained, _ = run_lora(tokens, luts, lora_args(lr=1e-30, batch=16), bos=-1)
    for s in range(0, N, 48):
        assert torch.equal(nll_at[s:s + 8], untrained[s:s + 8]), s
        assert not torch.equal(nll_at[s + 8:s + 48], untrained[s + 8:s + 48]), s
    assert " docs:13 steps:6" in logs[-1], logs[-1]  # 600 = 12 x 48 + 24: 13 pieces of <= 6 chunks
    few = lora_args(lr=0.05, batch=4)  # rows taken again: each piece still starts fresh
    _, again, logs = run_lora(tokens, luts, few, bos=-1)
    assert " docs:13 steps:21" in logs[-1], logs[-1]  # three rounds of 6 steps, then 3 chunks
    assert again.tolist() == pytest.approx(nll_at.tolist(), rel=1e-4, abs=1e-6)
    monkeypatch.setattr(tg, "LORA_PIECE_TARGETS", 10**9)  # one piece: one row, a step a chunk
    assert " docs:1 steps:75" in run_lora(tokens, luts, args, bos=-1)[2][-1]


def test_pieces_start_at_each_document_start(val, monkeypatch):
    """With BOS documents, pieces of 24 targets are counted from each document's start."""
    tokens, luts = val
    monkeypatch.setattr(tg, "LORA_PIECE_TARGETS", 24)
    _, nll_at, logs = run_lora(tokens, luts, lora_args(lr=0.05, batch=16))
    _, untrained, _ = run_lora(tokens, luts, lora_args(lr=1e-30, batch=16))
    pieces = [p for s, e in documents(tokens) for p in range(s, e, 24)]
    assert f" docs:{len(pieces)} " in logs[-1] and len(pieces) > len(documents(tokens))
    for s, e in zip(pieces, pieces[1:] + [N]):
        assert torch.equal(nll_at[s:s + 8], untrained[s:s + 8]), s
        if e - s > 8:
            assert not torch.equal(nll_at[s + 8:e], untrained[s + 8:e]), s


def test_the_model_is_left_as_found(val):
    tokens, luts = val
    model = tiny_gpt()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_lora(tokens, luts, lora_args(), model)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad and p.grad is None, name
    assert model.head_lora is None and all(getattr(m, "lora", None) is None
                                           for m in model.modules())


def test_a_time_limit_reached_at_once_scores_every_document_untrained(val):
    tokens, luts = val
    result, nll_at, logs = run_lora(tokens, luts, lora_args(max_seconds=1e-9))
    untrained = run_lora(tokens, luts, lora_args(lr=1e-30))
    assert result[2:] == untrained[0][2:] and torch.equal(nll_at, untrained[1])
    assert [line.split(" at ")[:2] for line in logs if "stopped" in line] == [
        ["ttt_eval: training stopped", "step 1 (3 of 7 documents started)"]], logs
    _, free, logs = run_lora(tokens, luts, lora_args(max_seconds=1e6))
    assert (torch.equal(free, run_lora(tokens, luts, lora_args())[1])
            and not [x for x in logs if "stopped" in x])


def _dist_worker(rank, world_size, port, tokens, luts, out_path):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result, nll_at, _ = run_lora(tokens, luts, lora_args(), tiny_gpt64(), rank=rank,
                                     world=world_size)
        dist.all_reduce(nll_at)  # each rank holds its own documents' targets, zero elsewhere
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump([list(result), nll_at.tolist()], f)


def test_two_ranks_gloo_equal_one_process(val, tmp_path):
    """The ranks take every other document, longest first: the same targets, bytes and per-target
    nll."""
    tokens, luts = val
    out = tmp_path / "lora.json"
    mp.spawn(_dist_worker, args=(2, free_port(), tokens, luts, str(out)), nprocs=2, join=True)
    result, nll_at = json.loads(out.read_text())
    one, one_at, _ = run_lora(tokens, luts, lora_args(), tiny_gpt64())
    assert tuple(result[2:]) == one[2:]
    assert result[:2] == pytest.approx(list(one[:2]), rel=1e-9, abs=0)
    assert nll_at == pytest.approx(one_at.tolist(), rel=1e-6, abs=0)


def fake_clock(monkeypatch):
    """TTT's clock advanced 0.5 s by each forward (through the returned nll_fn) and each training
    step."""
    clock, model = [0.0], tiny_gpt()
    monkeypatch.setattr(tg, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real_step = tg.DocAdapters.step

    def step(self, train, lr):
        clock[0] += 0.5
        real_step(self, train, lr)
    monkeypatch.setattr(tg.DocAdapters, "step", step)

    def ticking(x, y):
        clock[0] += 0.5
        return model.token_nll(x, y)
    return clock, model, ticking


def test_a_time_limit_reached_midway_trains_until_the_rest_only_fits_scored(val, monkeypatch):
    """A clock of 0.5 s a forward and 0.5 s a training step: training goes on while one more trained
    step plus the rest scored fits the limit, so a limit below the full run's time stops midway, not
    at once, and the run ends within a step of it; documents begun after the stop score as
    untrained."""
    tokens, luts = val
    clock, model, ticking = fake_clock(monkeypatch)

    def run(**kw):
        clock[0], logs = 0.0, []
        ev = tg.Evaluator(tokens, L, L, luts, CPU, 0, 1)
        result, nll_at = tg.doc_test_time_train(ev, model, ticking, lora_args(batch=2, **kw),
                                                logs.append, BOS)
        return result, nll_at, logs
    result, full, logs = run()
    steps = int(logs[-1].split("steps:")[1])
    _, untrained, _ = run(lr=1e-30)
    limit = 0.75 * steps
    got, at, logs = run(max_seconds=limit)
    stop = [line for line in logs if "stopped" in line]
    assert len(stop) == 1 and got[2:] == result[2:]
    stop_step = int(stop[0].split("at step ")[1].split(" ")[0])
    assert steps // 3 < stop_step < steps  # midway: the old projection stopped at step 3
    assert clock[0] <= limit + 1
    docs = documents(tokens)
    assert not torch.equal(at, full) and not torch.equal(at, untrained)
    assert any(torch.equal(at[s:e], untrained[s:e]) for s, e in docs)  # begun after the stop


def test_the_evaluations_time_before_ttt_counts_against_the_limit(val, monkeypatch):
    """TTT_MAX_SECONDS bounds the evaluation, not TTT alone: with 100 s spent before TTT and the
    limit 100 s higher, TTT stops at the same step with the same scores as with nothing spent, and
    its stop line gives the evaluation's time, the 100 s included."""
    tokens, luts = val
    clock, model, ticking = fake_clock(monkeypatch)

    def run(limit, spent):
        clock[0], logs = 0.0, []
        ev = tg.Evaluator(tokens, L, L, luts, CPU, 0, 1)
        result, nll_at = tg.doc_test_time_train(ev, model, ticking,
                                                lora_args(batch=2, max_seconds=limit),
                                                logs.append, BOS, spent)
        return result, nll_at, [line for line in logs if "stopped" in line], logs
    steps = int(run(0.0, 0.0)[3][-1].split("steps:")[1])
    result, nll_at, stop, _ = run(0.75 * steps, 0.0)
    later, later_at, later_stop, _ = run(0.75 * steps + 100.0, 100.0)
    assert len(stop) == len(later_stop) == 1
    assert later[:2] == result[:2] and torch.equal(later_at, nll_at)
    at = [float(line.split(") at ")[1].split("s ")[0]) for line in (stop[0], later_stop[0])]
    assert stop[0].split(") at ")[0] == later_stop[0].split(") at ")[0]  # the same step
    assert at[1] == pytest.approx(at[0] + 100.0)
    assert run(0.75 * steps, 100.0)[2] != stop  # the same limit with 100 s spent stops earlier


def test_the_time_limit_projects_a_long_piece_not_only_the_even_share(val, monkeypatch):
    """One document of 75 chunks and 16 rows: the rest is the piece's own chunks, not 1/16 of them.
    The same clock; projecting only the even share would train on past the limit and end 9 s over
    it."""
    tokens, luts = val
    clock, model, ticking = fake_clock(monkeypatch)
    logs = []
    ev = tg.Evaluator(tokens, L, L, luts, CPU, 0, 1)
    tg.doc_test_time_train(ev, model, ticking, lora_args(batch=16, max_seconds=56.0), logs.append,
                           -1)
    assert " docs:1 steps:75" in logs[-1] and [line for line in logs if "stopped" in line]
    assert 50.0 <= clock[0] <= 57.0
