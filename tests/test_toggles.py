"""The quality toggles: MLP_LEAKY_SLOPE, LN_SCALE, VE_LAST_N/VE_DIM, LATE_QAT, EMA and SWA. Each
must really change the model; late QAT must take effect inside a compiled forward (one record's
switch was constant-folded away)."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import parts
import synth
import train_gpt as tg
from test_cli import SCRIPT_VARS

ROOT = Path(__file__).resolve().parent.parent


def tiny_gpt(**kw) -> tg.GPT:
    torch.manual_seed(0)
    model = tg.GPT(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2,
                   mlp_mult=2, max_seq_len=16, bigram_vocab_size=16, bigram_dim=8, xsa_last_n=1,
                   act_dtype=torch.float32, **kw)
    for module in model.modules():  # leave the zero init: outputs must depend on every layer
        if isinstance(module, tg.CastedLinear):
            torch.nn.init.normal_(module.weight, std=0.2)
    return model


def test_leaky_slope_zero_is_relu_squared_and_slope_changes_negative_side():
    mlp = tg.MLP(8, 2, leaky_slope=0.0)
    torch.nn.init.normal_(mlp.proj.weight)
    x = torch.randn(5, 8)
    assert torch.allclose(mlp(x), mlp.proj(torch.relu(mlp.fc(x)).square()))
    mlp.leaky_slope = 0.5
    h = mlp.fc(x)
    assert (h < 0).any()
    assert torch.allclose(mlp(x), mlp.proj(torch.where(h > 0, h, 0.5 * h).square()))


def test_ln_scale_scales_each_layers_normalized_inputs():
    plain, scaled = tiny_gpt(), tiny_gpt(ln_scale=True)
    assert [b.norm_scale for b in plain.blocks] == [1.0, 1.0, 1.0]
    assert [b.norm_scale for b in scaled.blocks] == pytest.approx([1.0, 2 ** -0.5, 3 ** -0.5])
    ids = torch.randint(0, 64, (2, 16))
    x0 = torch.randn(2, 16, 32)
    assert torch.equal(plain.blocks[0](x0, x0), scaled.blocks[0](x0, x0))  # layer 0: scale 1
    assert not torch.allclose(plain.token_nll(ids, ids), scaled.token_nll(ids, ids))


def test_value_embedding_goes_to_the_deepest_layers_and_starts_as_a_no_op():
    plain, ve = tiny_gpt(), tiny_gpt(ve_last_n=2, ve_dim=8)
    assert [b.attn.ve_scale is not None for b in ve.blocks] == [False, True, True]
    # KV width: 2 heads x 8
    assert plain.value_embed is None and ve.value_embed.proj.weight.shape == (16, 8)
    # as GPT initializes it (tiny_gpt re-inits projections)
    torch.nn.init.zeros_(ve.value_embed.proj.weight)
    ve.load_state_dict(plain.state_dict(), strict=False)
    ids, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    assert torch.equal(plain.hidden(ids), ve.hidden(ids))
    # tiny_gpt's re-init
    assert torch.count_nonzero(tiny_gpt(ve_last_n=1).value_embed.proj.weight) > 0
    fresh = tg.GPT(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2,
                   mlp_mult=2, max_seq_len=16, ve_last_n=1)
    assert torch.count_nonzero(fresh.value_embed.proj.weight) == 0
    ve.value_embed.proj.weight.data.normal_(std=0.2)
    # the table starts small (std 0.01)
    assert (ve.hidden(ids) - plain.hidden(ids)).abs().max() > 1e-4
    ve(ids, targets).backward()
    for p in (ve.value_embed.embed.weight, ve.value_embed.proj.weight, ve.blocks[1].attn.ve_scale,
              ve.blocks[2].attn.ve_scale):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_value_embedding_in_the_artifact_shape_only_when_on(monkeypatch):
    monkeypatch.delenv("VE_LAST_N", raising=False)
    # ignored while off: an artifact without value embeddings still loads
    monkeypatch.setenv("VE_DIM", "64")
    assert ("ve_last_n" not in tg.Hyperparameters(1).shape
            and "ve_dim" not in tg.Hyperparameters(1).shape)
    monkeypatch.setenv("VE_LAST_N", "2")
    shape = tg.Hyperparameters(1).shape
    assert shape["ve_last_n"] == 2 and shape["ve_dim"] == 64


def test_value_embedding_export_kinds():  # optimizers: test_model's test_each_parameter_*
    model = tiny_gpt(ve_last_n=2)
    kinds = {n: tg.export_kind(n, p) for n, p in model.named_parameters()
             if "value_embed" in n or "ve_scale" in n}
    assert kinds == {"value_embed.embed.weight": "int8", "value_embed.proj.weight": "int6",
                     "blocks.1.attn.ve_scale": "fp32", "blocks.2.attn.ve_scale": "fp32"}


def test_qat_buffers_cover_the_int6_matrices_and_stay_out_of_the_state_dict():
    model = tiny_gpt(qat=True, coda_last_n=1)
    with_qat = {n for n, m in model.named_modules()
                if isinstance(m, tg.CastedLinear) and m.qat is not None}
    int6 = {n.removesuffix(".weight") for n in parts.of_role(model, "matrix")}
    assert with_qat == int6 and "blocks.2.attn.coda_gate" not in with_qat
    assert not any("qat" in k for k in model.state_dict())
    assert all(m.qat is None for m in tiny_gpt().modules() if isinstance(m, tg.CastedLinear))


def test_qat_switch_takes_effect_in_a_compiled_forward_without_recompiling():
    model = tiny_gpt(qat=True)
    ids = torch.randint(0, 64, (2, 16))
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    compiled = torch.compile(model.token_nll, backend=counting_backend, fullgraph=True)
    off = compiled(ids, ids)
    model.set_qat(True)
    on = compiled(ids, ids)
    model.set_qat(False)
    off_again = compiled(ids, ids)
    assert len(compiles) == 1
    assert torch.equal(off, off_again) and not torch.allclose(off, on)

    # "on" is exactly the model with its matrices rounded to the int6 grid, and gradients pass
    # straight through
    reference = tiny_gpt()
    with torch.no_grad():
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            q.copy_(tg.fake_int6(p) if tg.export_kind(name, p) == "int6" else p)
    assert torch.allclose(on, reference.token_nll(ids, ids), atol=1e-5)
    model.set_qat(True)
    model(ids, ids).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if ".fc." in n)


def test_fake_int6_is_the_absmax_int6_grid():
    w = torch.randn(6, 40)
    q = tg.fake_int6(w)
    scale = w.abs().amax(dim=1, keepdim=True) / 31
    codes = q / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 31 + 1e-4
    assert ((q - w).abs() <= scale / 2 + 1e-6).all()


@pytest.mark.parametrize("floor,scale", [("0", "0.375"), ("0.2", "0.500")])
def test_late_qat_switches_on_once_during_the_warmdown(tmp_path, floor, scale):
    """LATE_QAT reads the warmdown's share left, so LR_FLOOR moves the learning rate, not the
    step."""
    data = synth.make_dataset(str(tmp_path / "data"), n_train_shards=1,
                              train_tokens_per_shard=20_000, val_docs=10)
    env = dict(os.environ, DATA_PATH=data["data_path"], TOKENIZER_PATH=data["tokenizer_path"],
               VOCAB_SIZE=str(data["vocab_size"]), NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="4",
               NUM_KV_HEADS="2", MLP_MULT="2", TRAIN_SEQ_LEN="32", EVAL_SEQ_LEN="32",
               TRAIN_BATCH_TOKENS="128", GRAD_ACCUM_STEPS="1", ITERATIONS="8",
               MAX_WALLCLOCK_SECONDS="0", WARMDOWN_ITERS="8", WARMUP_STEPS="1", EVAL_STRIDE="0",
               BIGRAM_VOCAB_SIZE="0", LATE_QAT="0.5", LN_SCALE="1", MLP_LEAKY_SLOPE="0.5",
               XSA_LAST_N="1", RUN_ID="qat", OMP_NUM_THREADS="1", LR_FLOOR=floor, TTT_ENABLED="0")
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "logs" / "qat.txt").read_text()
    # the share left, (8 - step) / 8, falls below 0.5 first at step 5; the lr scale is
    # floor + (1 - floor) x that
    assert [line for line in log.splitlines() if line.startswith("late_qat:")] == [
        f"late_qat: int6 fake quantization on from step 5 (lr scale {scale})"]
    assert "final_int6_roundtrip_exact" in log


def averaging_args(monkeypatch, **env) -> tg.Hyperparameters:
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return tg.Hyperparameters()


def test_ema_is_the_exponential_average_of_every_step(monkeypatch):
    model = torch.nn.Linear(3, 2)
    history = [p.detach().clone() for p in model.parameters()]
    average = tg.WeightAverage(model, averaging_args(monkeypatch, EMA_ENABLED=1, EMA_DECAY=0.9,
                                                     SWA_ENABLED=0))
    expected = [h.clone() for h in history]
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(step, lr_scale=1.0)
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, model.parameters())]
    assert average.apply().startswith("ema")
    assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(model.parameters(), expected))


def test_swa_averages_the_warmdown_checkpoints_and_wins_over_ema(monkeypatch):
    model = torch.nn.Linear(3, 2)
    args = averaging_args(monkeypatch, EMA_ENABLED=1, SWA_ENABLED=1, SWA_EVERY=2)
    average = tg.WeightAverage(model, args)
    sampled = []
    for step, scale in enumerate([1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2], start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        average.update(step, scale)
        if scale < 1.0 and step % 2 == 0:  # steps 4 and 6: in the warmdown, on the SWA_EVERY grid
            sampled.append([p.detach().clone() for p in model.parameters()])
    assert average.apply() == "swa(2 checkpoints)"
    for i, p in enumerate(model.parameters()):
        assert torch.allclose(p, (sampled[0][i] + sampled[1][i]) / 2)


def test_no_averaging_keeps_the_final_weights(monkeypatch):
    model = torch.nn.Linear(3, 2)
    average = tg.WeightAverage(model, averaging_args(monkeypatch, EMA_ENABLED=0, SWA_ENABLED=0))
    before = [p.detach().clone() for p in model.parameters()]
    average.update(1, 0.5)
    assert average.apply() == "final weights"
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def readme_toggles() -> list[tuple[list[str], list[str], str]]:
    """The README's toggles table: (variables of the first cell, defaults of the second, the whole
    row)."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Toggles"):].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return [(re.findall(r"`([A-Z0-9_]+)`", row.split("|")[1]),
             [d.strip().strip("`*").strip() for d in row.split("|")[2].split(",")], row)
            for row in rows]


def test_readme_toggles_table_gives_the_scripts_defaults_and_every_variable(monkeypatch):
    """Each default in the README's table is the one the script uses (a default changed in one place
    only fails here), and every variable the script reads is in the table."""
    read = SCRIPT_VARS
    for name in read:
        monkeypatch.delenv(name, raising=False)
    args = tg.Hyperparameters(1)
    rows = readme_toggles()
    documented = {name for _, _, row in rows for name in re.findall(r"`([A-Z0-9_]+)", row)}
    undocumented = read - documented - {"RANK", "WORLD_SIZE", "LOCAL_RANK"}  # torchrun's
    assert not undocumented, undocumented
    checked = 0
    for names, defaults, row in rows:
        if len(names) != len(defaults):  # prose in the defaults cell
            continue
        for name, default in zip(names, defaults):
            value = getattr(args, name.lower())
            if default == "unset":
                assert value in (None, ()), name  # () for a list of layers
            elif default == "random uuid":
                assert re.fullmatch(r"[0-9a-f-]{36}", value), name
            elif name == "GRAD_ACCUM_STEPS":
                assert ([tg.Hyperparameters(w).grad_accum_steps for w in (1, 2, 8, 16)]
                        == [8, 4, 1, 1])
            # another variable's value, or a ratio
            elif re.fullmatch(r"[A-Z_]+(`/`[A-Z_]+)?", default):
                a, _, b = default.partition("`/`")
                assert value == (getattr(args, a.lower())
                                 / (getattr(args, b.lower()) if b else 1)), name
            elif default.startswith("sigmoid("):
                assert value == 1 / (1 + math.exp(-float(default[8:-1]))), (name, value, default)
            elif re.fullmatch(r"-?[0-9.]+", default):
                assert float(value) == float(default), (name, value, default)
            else:
                assert value == default, (name, value, default)
            checked += 1
    assert checked >= 45


def test_an_empty_value_is_the_default_for_every_variable(monkeypatch):
    """The contract: an empty value counts as unset. Every variable the script reads, set to ""
    (and to blanks), gives the same Hyperparameters as when it is not set at all."""
    read = SCRIPT_VARS - {"RANK", "WORLD_SIZE", "LOCAL_RANK", "RUN_ID"}  # RUN_ID: a fresh uuid
    for name in read | {"RUN_ID"}:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RUN_ID", "r")
    unset = vars(tg.Hyperparameters(1))
    for blank in ("", " "):
        for name in read:
            monkeypatch.setenv(name, blank)
        got = vars(tg.Hyperparameters(1))
        assert got == unset, {k: (got[k], unset[k]) for k in unset if got[k] != unset[k]}


def test_parallel_block_with_unit_gains_is_the_serial_block():
    """With residual gain 1 and every write 1 both lanes hold the serial stream, so their mean is
    the serial block's output: the lanes add nothing until their gains move."""
    serial, parallel = tiny_gpt(), tiny_gpt(parallel_last_n=2)
    parallel.load_state_dict(serial.state_dict(), strict=False)
    for block in parallel.blocks[1:]:
        block.lane_resid.data.fill_(1.0)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(parallel.hidden(ids), serial.hidden(ids), atol=1e-5)
    assert (not parallel.blocks[0].parallel and parallel.blocks[1].parallel
            and parallel.blocks[2].parallel)


def test_parallel_lanes_route_only_through_their_writes():
    """Attention writes into the MLP's lane by lane_write[0][1] alone: at 0 the MLP's input (and so
    the MLP lane's output) ignores the attention; at its init of 1 it does not."""
    model = tiny_gpt(parallel_last_n=1)
    block, x0 = model.blocks[2], torch.randn(2, 16, 32)
    x = torch.randn(2, 2, 16, 32)

    def mlp_lane_change():
        before = block(x, x0)[1]
        with torch.no_grad():
            block.attn.c_v.weight.mul_(3.0)
        after = block(x, x0)[1]
        with torch.no_grad():
            block.attn.c_v.weight.div_(3.0)
        return (after - before).abs().max().item()

    assert mlp_lane_change() > 1e-3
    block.lane_write.data[0, 1] = 0.0
    assert mlp_lane_change() == 0.0


def test_parallel_lanes_in_the_artifact_shape_only_when_on_and_stored_fp32(monkeypatch):
    monkeypatch.delenv("PARALLEL_LAST_N", raising=False)
    assert "parallel_last_n" not in tg.Hyperparameters(1).shape
    monkeypatch.setenv("PARALLEL_LAST_N", "4")
    assert tg.Hyperparameters(1).shape["parallel_last_n"] == 4
    model = tiny_gpt(parallel_last_n=2)
    lanes = {n for n, _ in model.named_parameters() if "lane_" in n}
    assert len(lanes) == 4 and lanes <= parts.of_role(model, "control")
    assert {tg.export_kind(n, p) for n, p in model.named_parameters() if n in lanes} == {"fp32"}


def test_muon_row_norm_makes_the_update_blind_to_each_rows_scale():
    """MuonEq-R: scaling a row of the gradient changes nothing (it is normalized away before
    Newton-Schulz); plain Muon's update does change."""
    g = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    rows = torch.linspace(0.1, 10.0, 24)[:, None]

    def update(grad, row_norm):
        p = torch.nn.Parameter(torch.zeros(24, 16))
        p.grad = grad.clone()
        tg.Muon([p], lr=0.1, momentum=0.0, nesterov=False, row_norm=row_norm).step()
        return p.detach()

    assert torch.allclose(update(g, True), update(g * rows, True), atol=1e-5)
    assert not torch.allclose(update(g, False), update(g * rows, False), atol=1e-3)


@pytest.mark.parametrize("cap", [0.0, 600.0])
def test_lr_floor_ends_the_warmdown_at_the_floor(monkeypatch, cap):
    monkeypatch.setenv("ITERATIONS", "100")
    monkeypatch.setenv("WARMDOWN_ITERS", "40")
    monkeypatch.setenv("MAX_WALLCLOCK_SECONDS", str(cap))
    monkeypatch.setenv("LR_FLOOR", "0.25")
    args = tg.Hyperparameters(1)
    budget = 100_000.0  # under the cap: 1 s a step, 100 steps
    scales = [tg.lr_scale(args, s, 1000.0 * s, budget) for s in range(101)]
    assert scales[:61] == [1.0] * 61 and scales[100] == 0.25
    assert scales[80] == pytest.approx(0.25 + 0.75 * 0.5)
    assert all(a >= b for a, b in zip(scales, scales[1:]))


def test_coda_variants_in_the_artifact_shape_only_when_on_and_off_default(monkeypatch):
    """CODA_NOISE_HEADS and CODA_HEAD_NORM change the model only with CoDA on and off their
    defaults: only then are they recorded, so artifacts written before they existed still load;
    build_model gets them through the shape."""
    for name in ("CODA_LAST_N", "CODA_ENABLED", "CODA_NOISE_HEADS", "CODA_HEAD_NORM", "NUM_HEADS",
                 "NUM_KV_HEADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CODA_NOISE_HEADS", "1")
    monkeypatch.setenv("CODA_HEAD_NORM", "none")
    assert not {"coda_noise_heads", "coda_head_norm"} & set(tg.Hyperparameters(1).shape)  # CoDA off
    monkeypatch.setenv("CODA_LAST_N", "2")
    monkeypatch.setenv("CODA_NOISE_HEADS", "2")  # the default at 8 heads over 4
    monkeypatch.setenv("CODA_HEAD_NORM", "rms")
    assert not {"coda_noise_heads", "coda_head_norm"} & set(tg.Hyperparameters(1).shape)
    monkeypatch.setenv("CODA_NOISE_HEADS", "1")
    monkeypatch.setenv("CODA_HEAD_NORM", "learned")
    args = tg.Hyperparameters(1)
    assert args.shape["coda_noise_heads"] == 1 and args.shape["coda_head_norm"] == "learned"
    for name, value in dict(NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2,
                            XSA_LAST_N=1).items():
        monkeypatch.setenv(name, str(value))
    attn = tg.build_model(tg.Hyperparameters(1), torch.device("cpu")).blocks[1].attn
    assert attn.coda_theta.shape == (2, 4) and attn.coda_norm.shape == (8,)


@pytest.mark.parametrize("env,message", [
    (dict(CODA_NOISE_HEADS="3"),
     "CODA_NOISE_HEADS=3: expected a divisor of NUM_HEADS/NUM_KV_HEADS=2"),
    (dict(CODA_NOISE_HEADS="0"), "CODA_NOISE_HEADS=0: expected a divisor"),
    (dict(CODA_NOISE_HEADS="-2"), "CODA_NOISE_HEADS=-2: expected a divisor"),
    (dict(CODA_NOISE_HEADS="one"), "CODA_NOISE_HEADS='one': expected an integer"),
    (dict(CODA_HEAD_NORM="RMS"), "CODA_HEAD_NORM='RMS': expected rms, learned, none"),
    (dict(CODA_HEAD_NORM="layer"), "CODA_HEAD_NORM='layer': expected rms, learned, none"),
    (dict(CODA_LAMBDA_INIT="0"), r"CODA_LAMBDA_INIT=0.0: expected a number in \(0, 1\)"),
    (dict(CODA_LAMBDA_INIT="1"), r"CODA_LAMBDA_INIT=1.0: expected a number in \(0, 1\)"),
    (dict(CODA_LAMBDA_INIT="-0.5"), r"CODA_LAMBDA_INIT=-0.5: expected a number in \(0, 1\)"),
    (dict(CODA_LAMBDA_INIT="nan"), "CODA_LAMBDA_INIT='nan': expected a finite number"),
    (dict(CODA_LR="-0.01"), "CODA_LR=-0.01: expected >= 0"),
    (dict(CODA_STATS="2"), "CODA_STATS=2: expected 0 or 1"),
])
def test_coda_variants_refuse_bad_values(monkeypatch, env, message):
    assert_refused(monkeypatch, ("NUM_HEADS", "NUM_KV_HEADS", "CODA_NOISE_HEADS", "CODA_HEAD_NORM",
                                 "CODA_LAMBDA_INIT", "CODA_LR", "CODA_STATS"), env, message)


def assert_refused(monkeypatch, cleared, env, message):
    """Hyperparameters with the names in cleared unset and env set raises ConfigError starting with
    message."""
    for name in cleared:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(tg.ConfigError, match=f"^{message}"):
        tg.Hyperparameters(1)


def test_recurrence_is_the_unrolled_model_with_its_blocks_shared():
    """RECUR_LAYERS=1,2 on 5 layers runs blocks 0,1,2,1,2,3,4: the same as a 7-layer model holding
    copies of those blocks, whose one extra skip (the middle pair) is 0; the skips pair blocks 0-4
    and 1-3 either way. The shared block's gradient is the sum of its two copies'; with recurrence
    off it is the 5-layer model."""
    def model(num_layers, **kw):
        torch.manual_seed(0)
        m = tg.GPT(vocab_size=64, num_layers=num_layers, model_dim=32, num_heads=4, num_kv_heads=2,
                   mlp_mult=2, max_seq_len=16, bigram_vocab_size=16, bigram_dim=8, xsa_last_n=2,
                   act_dtype=torch.float32, **kw)
        for module in m.modules():
            if isinstance(module, tg.CastedLinear):
                torch.nn.init.normal_(module.weight, std=0.2)
        with torch.no_grad():
            # the skips' pairing shows only when the weights differ
            m.skip_weights.normal_(1.0, 0.3)
        return m

    shared, unrolled, plain = model(5, recur_layers=(1, 2)), model(7), model(5)
    order = [0, 1, 2, 1, 2, 3, 4]
    assert shared.recur_order == order and shared.recurring
    plain.load_state_dict(shared.state_dict())
    with torch.no_grad():
        for v, i in enumerate(order):
            unrolled.blocks[v].load_state_dict(shared.blocks[i].state_dict())
        for name in ("tok_emb", "bigram", "smear"):
            getattr(unrolled, name).load_state_dict(getattr(shared, name).state_dict())
        unrolled.skip_weights.copy_(torch.cat((shared.skip_weights, torch.zeros(1, 32))))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss_shared, loss_unrolled = shared(ids, ids), unrolled(ids, ids)
    assert torch.allclose(loss_shared, loss_unrolled, atol=1e-6)
    loss_shared.backward()
    loss_unrolled.backward()
    for name, p in shared.blocks[1].named_parameters():
        copies = sum(dict(unrolled.blocks[v].named_parameters())[name].grad for v in (1, 3))
        assert torch.allclose(p.grad, copies, atol=1e-6), name
    shared.recurring = False
    assert torch.equal(shared(ids, ids), plain(ids, ids))
    assert not torch.allclose(plain(ids, ids), loss_unrolled)


def test_recurrence_switch_takes_effect_inside_a_compiled_forward():
    """Training turns recurrence on in the middle of a compiled run: the compiled forward must
    follow the flag (recompile), not keep the graph traced first."""
    model = tiny_gpt(recur_layers=(1,))
    compiled = torch.compile(model, backend="eager", dynamic=False)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for on in (False, True, False):
        model.recurring = on
        assert torch.equal(compiled(ids, ids), model(ids, ids)), on
    model.recurring = False
    off = model(ids, ids)
    model.recurring = True
    assert not torch.allclose(off, model(ids, ids))


def test_recurrence_in_the_artifact_shape_only_when_on(monkeypatch):
    monkeypatch.delenv("RECUR_LAYERS", raising=False)
    monkeypatch.delenv("PARALLEL_LAST_N", raising=False)
    assert "recur_layers" not in tg.Hyperparameters(1).shape
    monkeypatch.setenv("RECUR_LAYERS", "4,5")
    assert tg.Hyperparameters(1).shape["recur_layers"] == [4, 5]
    monkeypatch.setenv("PARALLEL_LAST_N", "6")  # lanes from layer 5
    with pytest.raises(tg.ConfigError,
                       match=r"^RECUR_LAYERS=4,5: expected all below or all within the parallel"):
        tg.Hyperparameters(1)
    monkeypatch.setenv("PARALLEL_LAST_N", "7")
    assert tg.Hyperparameters(1).recur_layers == (4, 5)


@pytest.mark.parametrize("env,message", [
    (dict(RECUR_LAYERS="4,6"), "RECUR_LAYERS=4,6: expected consecutive ascending layers in 0..10"),
    (dict(RECUR_LAYERS="5,4"), "RECUR_LAYERS=5,4: expected consecutive ascending layers"),
    (dict(RECUR_LAYERS="10,11"),
     "RECUR_LAYERS=10,11: expected consecutive ascending layers in 0..10"),
    (dict(RECUR_LAYERS="-1"), "RECUR_LAYERS=-1: expected consecutive"),
    (dict(RECUR_LAYERS="4;5"), "RECUR_LAYERS='4;5': expected layer indices separated by commas"),
    (dict(RECUR_LAYERS="4,"), "RECUR_LAYERS='4,': expected layer indices separated by commas"),
    (dict(RECUR_LAYERS="4", RECUR_START="1"), r"RECUR_START=1.0: expected a number in \[0, 1\)"),
    (dict(RECUR_LAYERS="4", RECUR_START="-0.1"),
     r"RECUR_START=-0.1: expected a number in \[0, 1\)"),
    (dict(RECUR_LAYERS="4", WARMUP_STEPS="1"),
     "WARMUP_STEPS=1: with RECUR_LAYERS the warm-up compiles two graphs"),
])
def test_recurrence_refuses_bad_values(monkeypatch, env, message):
    assert_refused(monkeypatch, ("NUM_LAYERS", "PARALLEL_LAST_N", "RECUR_LAYERS", "RECUR_START",
                                 "WARMUP_STEPS"), env, message)


@pytest.mark.parametrize("steps", ["0", "2"])
def test_recurrence_takes_no_warm_up_or_one_that_reaches_both_graphs(monkeypatch, steps):
    """WARMUP_STEPS=1 alone is refused with recurrence: 0 compiles nothing early, 2 one step per
    graph."""
    monkeypatch.setenv("RECUR_LAYERS", "4,5")
    monkeypatch.setenv("WARMUP_STEPS", steps)
    monkeypatch.delenv("NUM_LAYERS", raising=False)
    monkeypatch.delenv("PARALLEL_LAST_N", raising=False)
    assert tg.Hyperparameters(1).warmup_steps == int(steps)
