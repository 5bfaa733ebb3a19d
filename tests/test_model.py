"""Model and Muon checks on CPU: shapes and gradients, XSA, CoDA, RoPE, the FlashAttention-3 branch
(through a stand-in), Newton-Schulz, Muon against torch.optim.Muon and across three gloo ranks, its
plan by cost, what trains, stores, rounds and calibrates each parameter, the agreed clock. float32
throughout, plus bf16 (the GPU dtype) where rounding is the point, and float64 where two paths must
agree exactly."""
import math
import os
import socket
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import parts
import synth
import train_gpt as tg

DIM, HEADS, HEAD_DIM, VOCAB, SEQ = 32, 4, 8, 64, 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tensors this small gain nothing from threads, and spinning threads crawl on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt(num_kv_heads=2, rope_dims=0, xsa_last_n=0, coda_last_n=0, seed=0, num_layers=2):
    torch.manual_seed(seed)
    return tg.GPT(vocab_size=VOCAB, num_layers=num_layers, model_dim=DIM, num_heads=HEADS,
                  num_kv_heads=num_kv_heads, mlp_mult=2, max_seq_len=SEQ, rope_dims=rope_dims,
                  bigram_vocab_size=16, bigram_dim=8, xsa_last_n=xsa_last_n,
                  coda_last_n=coda_last_n, act_dtype=torch.float32)


@torch.no_grad()
def perturb(module, std=0.05):
    # Zero-initialized projections and embeddings would make upstream gradients exactly zero.
    for p in module.parameters():
        p.add_(torch.randn_like(p) * std)


def tokens(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (batch, SEQ), generator=g),
            torch.randint(0, VOCAB, (batch, SEQ), generator=g))


# -----------------------------
# GPT: shapes, gradients, causality
# -----------------------------

@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("xsa_last_n", [0, 2])
@pytest.mark.parametrize("coda_last_n,rope_dims", [(0, 0), (2, 0), (2, 4)])
def test_gpt_forward_backward(num_kv_heads, xsa_last_n, coda_last_n, rope_dims):
    model = tiny_gpt(num_kv_heads, rope_dims, xsa_last_n, coda_last_n)
    assert [b.attn.xsa for b in model.blocks] == [xsa_last_n >= 2, xsa_last_n >= 1]
    assert [b.attn.coda for b in model.blocks] == [coda_last_n >= 2, coda_last_n >= 1]
    ids, targets = tokens()
    with torch.no_grad():  # logits start near 0 (tied embedding std 0.005): loss ~ ln(vocab)
        assert abs(model(ids, targets).item() - math.log(VOCAB)) < 0.05
    perturb(model)
    nll = model.token_nll(ids, targets)
    assert nll.shape == (2, SEQ) and nll.dtype == torch.float32
    loss = model(ids, targets)
    assert torch.isfinite(loss) and torch.allclose(loss, nll.mean())
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    assert any("coda_theta" in n for n in names) == bool(coda_last_n)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_one_layer_model_has_no_parameter_without_gradient():
    """With one layer there are no U-Net skips; an empty skip_weights parameter got no gradient,
    which DDP refuses on its second step ("Expected to have finished reduction in the prior
    iteration")."""
    model = tiny_gpt(num_layers=1)
    perturb(model)
    model(*tokens()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []



@pytest.mark.parametrize("qat", [False, True])
@pytest.mark.parametrize("gain_shape", [(6,), ()])
def test_output_gain_folded_into_the_weight_equals_gain_after_the_product(qat, gain_shape):
    """CastedLinear(x, s) computes x @ (s W)^T: the value and every gradient (x, W, s) equal
    s * (x @ W^T), int6 fake quantization on or off."""
    torch.manual_seed(0)
    lin = tg.CastedLinear(5, 6, bias=False).double()
    if qat:
        lin.enable_qat()
        lin.qat.fill_(1.0)
    s = (torch.rand(gain_shape, dtype=torch.float64) + 0.5).requires_grad_()
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 6, dtype=torch.float64)
    folded = lin(x, s)
    folded_grads = torch.autograd.grad((folded * r).sum(), (x, lin.weight, s))
    after = s * lin(x)
    after_grads = torch.autograd.grad((after * r).sum(), (x, lin.weight, s))
    assert torch.allclose(folded, after, rtol=1e-12, atol=1e-12)
    for a, b in zip(folded_grads, after_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("xsa,coda", [(False, False), (True, False), (True, True)])
def test_block_applies_each_gain_to_its_own_branch(xsa, coda):
    """The block's attn_scale and mlp_scale, folded into the two output products, give the block the
    value and the gradients of the plain form x + attn_scale * attn(.) then + mlp_scale * mlp(.)."""
    model = tiny_gpt(xsa_last_n=int(xsa), coda_last_n=int(coda)).double()
    perturb(model)
    block = model.blocks[1]
    with torch.no_grad():
        block.attn_scale.uniform_(0.2, 1.8)
        block.mlp_scale.uniform_(0.2, 1.8)
    x, x0, r = (torch.randn(2, SEQ, DIM, dtype=torch.float64) for _ in range(3))
    params = list(block.parameters())

    def plain():
        h = block.resid_mix[0] * x + block.resid_mix[1] * x0
        h = h + block.attn_scale * block.attn(F.rms_norm(h, (DIM,)) * block.norm_scale)
        return h + block.mlp_scale * block.mlp(F.rms_norm(h, (DIM,)) * block.norm_scale)

    out, ref = block(x, x0), plain()
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad((out * r).sum(), params)
    ref_grads = torch.autograd.grad((ref * r).sum(), params)
    for (name, _), a, b in zip(block.named_parameters(), grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name
def test_gpt_is_causal():
    """Changing token t must not change any earlier position's loss (attention, SmearGate,
    BigramHash)."""
    model = tiny_gpt(num_kv_heads=2, rope_dims=4, xsa_last_n=2, coda_last_n=2)
    perturb(model)
    ids, targets = tokens()
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % VOCAB
    with torch.no_grad():
        a, b = model.token_nll(ids, targets), model.token_nll(changed, targets)
    assert torch.equal(a[:, :10], b[:, :10])
    assert (a[:, 10:] - b[:, 10:]).abs().amax() > 1e-4


# -----------------------------
# Attention: XSA and CoDA
# -----------------------------

def make_attention(num_kv_heads, xsa, coda, rope_dims=0, seed=0, value_embed=False, noise_heads=0,
                   norm="rms"):
    """A CausalSelfAttention whose output is taken before `proj`, with non-trivial gains, angles,
    gate and norm."""
    torch.manual_seed(seed)
    rotary = tg.Rotary(HEAD_DIM, rope_dims, 10000.0, SEQ)
    attn = tg.CausalSelfAttention(DIM, HEADS, num_kv_heads, rotary, 1.5, xsa=xsa, coda=coda,
                                  value_embed=value_embed, coda_noise_heads=noise_heads,
                                  coda_head_norm=norm)
    attn.proj = OutputBeforeProj()
    with torch.no_grad():
        attn.q_gain.uniform_(0.5, 2.0)
        if value_embed:
            attn.ve_scale.fill_(0.7)
        if coda:
            attn.coda_theta.uniform_(-math.pi, math.pi)
            attn.coda_gate.weight.normal_(0, 0.5)
            attn.coda_gate.bias.normal_(0, 0.5)
            if attn.coda_norm is not None:
                attn.coda_norm.uniform_(0.5, 1.5)
    return attn


class OutputBeforeProj(nn.Module):
    """Stands in for the attention's output product (CastedLinear(y, out_scale)): returns y."""

    def forward(self, y, out_scale=None):
        assert out_scale is None
        return y


def heads(y):
    return y.view(*y.shape[:2], HEADS, HEAD_DIM)


def project_out_own_value(y, v, group):
    v_hat = F.normalize(v, dim=-1).repeat_interleave(group, dim=2)
    return y - (y * v_hat).sum(-1, keepdim=True) * v_hat


def reference_attention(attn, x):
    """CoDA written the plain way: two SDPA calls (signal and noise queries against the same K, V),
    XSA on each stream, then signal - sigmoid(gate(x)) * noise per head, before CoDA's head norm.
    Returns [B, T, H, D]."""
    signal, noise, lam = reference_streams(attn, x)
    return signal if noise is None else signal - lam * noise


def reference_streams(attn, x):
    """(signal, the noise each signal head subtracts, lambda [B, T, H, 1]); noise and lambda None
    without CoDA. A noise head's query is the mean of the n signal queries it serves (consecutive
    heads of one KV group), computed here head by head, then turned by its angles (noise_queries, on
    as many heads as it has angles)."""
    B, T, _ = x.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = F.rms_norm(attn.c_q(x).view(B, T, H, D), (D,))
    k = F.rms_norm(attn.c_k(x).view(B, T, Hkv, D), (D,))
    v = attn.c_v(x).view(B, T, Hkv, D)
    q = attn.rotary(q) * attn.q_gain[:, None]
    k = attn.rotary(k)

    def sdpa(queries):
        y = F.scaled_dot_product_attention(queries.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True).transpose(1, 2)
        return project_out_own_value(y, v, H // Hkv) if attn.xsa else y

    y = sdpa(q)
    if not attn.coda:
        return y, None, None
    serves = H // attn.coda_theta.size(0)
    means = torch.stack([q[:, :, m * serves:(m + 1) * serves].mean(2) for m in range(H // serves)],
                        dim=2)
    noise_q = attn.noise_queries(means)
    noise = F.scaled_dot_product_attention(noise_q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True).transpose(1, 2)
    if attn.xsa:
        noise = project_out_own_value(noise, v, noise_q.size(2) // Hkv)
    return y, noise.repeat_interleave(serves, dim=2), torch.sigmoid(attn.coda_gate(x))[..., None]


def head_norm(attn, combined):
    """CoDA's head norm written out: RMSNorm, times the learned weight, or nothing."""
    if attn.coda_head_norm == "none":
        return combined
    y = combined / (combined.pow(2).mean(-1, keepdim=True)
                    .add(torch.finfo(combined.dtype).eps).sqrt())
    return y if attn.coda_norm is None else y * attn.coda_norm


def own_value_dots(attn, x, ve=None, value=None):
    """Per token and head: (output before proj) . (normalized value of the head's own KV head). The
    value is the one the layer used (its value embedding ve included) unless `value` is given."""
    with torch.no_grad():
        y = heads(attn(x, ve)).float()
        if value is None:
            value = attn.c_v(x) if ve is None else attn.c_v(x) + attn.ve_scale * ve
        v = value.float().view(*x.shape[:2], attn.num_kv_heads, HEAD_DIM)
    v_hat = F.normalize(v, dim=-1).repeat_interleave(HEADS // attn.num_kv_heads, dim=2)
    return y, (y * v_hat).sum(-1)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("coda", [False, True])
def test_xsa_output_orthogonal_to_own_value(num_kv_heads, coda):
    """Token 0 attends only to itself, so XSA leaves exactly 0 there; with CoDA its RMSNorm then
    scales the rounding residue (mostly along v_hat) up by 1/sqrt(eps): token 0 is checked for size
    instead."""
    x = torch.randn(2, 12, DIM)
    for xsa in (True, False):
        y, dots = own_value_dots(make_attention(num_kv_heads, xsa=xsa, coda=coda), x)
        if xsa:
            assert dots[:, 1:].abs().max() < 1e-5
            assert y[:, 0].abs().max() < (1e-2 if coda else 1e-5)
        else:  # the property is not automatic: without XSA the outputs lean on their own values
            assert dots.abs().max() > 0.1


def test_xsa_removes_the_value_the_layer_used_embedding_included():
    attn = make_attention(2, xsa=True, coda=False, value_embed=True)
    x, ve = torch.randn(2, 12, DIM), torch.randn(2, 12, 2 * HEAD_DIM)
    _, dots = own_value_dots(attn, x, ve)
    assert dots.abs().max() < 1e-5
    _, dots_without = own_value_dots(attn, x, ve, value=attn.c_v(x))  # the embedding is not ignored
    assert dots_without[:, 1:].abs().max() > 0.05


def test_xsa_with_coda_in_bf16():
    """In bf16 (training dtype) XSA's projection would leave ~2^-8 of y along v_hat, and CoDA's
    RMSNorm (eps 0.0078 for bf16) scaled that back up: at token 0 the output was ~+-v_hat with RMS
    0.4-1 where exact arithmetic gives 0. XSA and the CoDA combination now run in fp32."""
    attn = make_attention(2, xsa=True, coda=True)
    y, dots = own_value_dots(attn, torch.randn(2, 12, DIM, dtype=torch.bfloat16))
    cos = dots / y.norm(dim=-1).clamp_min(1e-12)
    assert y[:, 0].pow(2).mean(-1).sqrt().max() < 0.05
    assert cos[:, 1:].abs().max() < 0.05


# The GPU kernels (Triton, run by its interpreter here: tests/conftest.py) against
# exclusive_reference in float64. Row counts that are not multiples of XSA_ROWS, head sizes that are
# not powers of 2, and a zero value (whose unit vector is 0 in both) exercise the masks.
@pytest.mark.parametrize("shape", [(2, 37, 2, 2, 64), (1, 5, 1, 4, 48), (3, 11, 4, 1, 16),
                                   (1, 3, 2, 8, 8)])
def test_xsa_kernels_match_reference_float32(shape):
    torch.manual_seed(0)
    y, v = torch.randn(shape), torch.randn(shape[:3] + shape[4:])
    v[0, 0, 0] = 0
    y, v = y.requires_grad_(), v.requires_grad_()
    out = tg.xsa_kernel(y, v)
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (y, v), grad))
    y64, v64 = y.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    ref = tg.exclusive_reference(y64, v64)
    want = (ref, *torch.autograd.grad(ref, (y64, v64), grad.double()))
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert (a.double() - b).abs().max() < 1e-5 * b.abs().max()
    v_hat = F.normalize(v.detach(), dim=-1).unsqueeze(3)
    assert (out * v_hat).sum(-1).abs().max() < 1e-5  # orthogonal to the own value, in every head


def test_xsa_kernels_in_bf16_round_the_fp32_result():
    """bf16 in, bf16 out, fp32 inside: the output is the reference's fp32 result rounded once, to
    within one bf16 step (Triton's interpreter stores bf16 by truncation where the GPU rounds to
    nearest; tools/bench_xsa.py measures the GPU's error), and the gradients come back in their
    inputs' dtypes."""
    torch.manual_seed(0)
    y = torch.randn(2, 40, 2, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 40, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    out = tg.xsa_kernel(y, v)
    want = tg.exclusive_reference(y, v)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - want).abs() <= want.abs() * 2 ** -7).all()
    grad_y, grad_v = torch.autograd.grad(out, (y, v), torch.ones_like(out))
    assert grad_y.dtype == grad_v.dtype == torch.bfloat16


# (KV heads, noise heads per KV group): every divisor of the group size at HEADS=4.
NOISE_SPLITS = [(4, 1), (2, 1), (2, 2), (1, 1), (1, 2), (1, 4)]


@pytest.mark.parametrize("num_kv_heads,noise_heads", NOISE_SPLITS)
@pytest.mark.parametrize("xsa", [False, True])
@pytest.mark.parametrize("rope_dims", [0, 4])
@pytest.mark.parametrize("norm", tg.CODA_HEAD_NORMS)
def test_coda_one_call_equals_two_calls(num_kv_heads, noise_heads, xsa, rope_dims, norm):
    """The module stacks signal and noise queries into one attention call; each stacked head must
    still read its own KV head (stacking along H instead of the group axis would pair them wrongly).
    It also combines the streams before XSA, which the reference applies to each: equal in exact
    arithmetic, but the two orders round differently and RMSNorm scales that up by 1/RMS of its
    input, so differences are compared at the scale of that input. With XSA, token 0 (attending only
    to itself) is RMSNorm of rounding residue in both forms, so it is checked for size only. Without
    a norm the outputs are compared as they are; the learned norm's weight is divided out."""
    attn = make_attention(num_kv_heads, xsa=xsa, coda=True, rope_dims=rope_dims,
                          noise_heads=noise_heads, norm=norm)
    assert attn.coda_theta.shape == (num_kv_heads * noise_heads, HEAD_DIM // 2)
    x = torch.randn(2, 12, DIM)
    with torch.no_grad():
        got, combined = heads(attn(x)), reference_attention(attn, x)
        want = head_norm(attn, combined)
        if norm == "learned":
            got, want = got / attn.coda_norm, want / attn.coda_norm
    rms_in = combined.pow(2).mean(-1, keepdim=True).sqrt() if norm != "none" else torch.ones(())
    first = 1 if xsa and norm != "none" else 0
    assert ((got - want) * rms_in)[:, first:].abs().max() < 1e-5
    if xsa and norm != "none":
        assert got[:, 0].abs().max() < 1e-2
    lam = torch.sigmoid(attn.coda_gate(x))
    # the gate is far from its init, so noise matters here
    assert lam.min() < 0.3 and lam.max() > 0.7


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_coda_at_init_is_nearly_normalized_signal(num_kv_heads):
    """At init (gate weight 0, bias -6) lambda = sigmoid(-6) ~ 0.0025, so CoDA ~ RMSNorm(signal)."""
    attn = tiny_gpt(num_kv_heads, coda_last_n=1).blocks[-1].attn
    assert attn.coda and torch.all(attn.coda_gate.weight == 0)
    assert torch.allclose(attn.coda_theta, torch.full_like(attn.coda_theta, math.pi / 2))
    attn.proj = OutputBeforeProj()
    x = torch.randn(2, 12, DIM)
    with torch.no_grad():
        got = heads(attn(x))
        attn.coda = False
        signal = reference_attention(attn, x)
    diff = (got - F.rms_norm(signal, (HEAD_DIM,))).abs().max()
    assert 0 < diff < 0.02


@pytest.mark.parametrize("rope_dims", [0, 4])
@pytest.mark.parametrize("num_kv_heads,noise_heads", [(2, 2), (2, 1), (1, 2), (1, 1)])
def test_noise_rotation_commutes_with_rope(rope_dims, num_kv_heads, noise_heads):
    """The noise query of a RoPE-rotated query is the rotated noise query, also when one noise query
    serves several heads (the mean of queries at one position is rotated like each of them)."""
    attn = make_attention(num_kv_heads, xsa=False, coda=True, rope_dims=rope_dims,
                          noise_heads=noise_heads)
    q = torch.randn(2, SEQ, HEADS, HEAD_DIM)
    with torch.no_grad():
        a = attn.rotary(attn.noise_queries(q))
        b = attn.noise_queries(attn.rotary(q))
    assert a.shape == (2, SEQ, num_kv_heads * noise_heads, HEAD_DIM) and (a - b).abs().max() < 1e-5
    means = q.view(2, SEQ, num_kv_heads * noise_heads, -1, HEAD_DIM).mean(3)
    assert (a - attn.rotary(means)).abs().max() > 0.1  # the rotation does something


def test_cos_sin_op_equals_torch_value_and_gradient():
    """CoDA's angle goes through cos_sin, an op with its own fake and backward: registration
    (opcheck), the gradient's formula (gradcheck), and value and gradient traced by torch.compile
    without a graph break."""
    theta = (torch.rand(4, 6, dtype=torch.float64) * 8 - 4).requires_grad_()
    torch.library.opcheck(tg.cos_sin, (theta,))
    assert torch.autograd.gradcheck(tg.cos_sin, (theta,))
    w = torch.randn(2, 4, 6, dtype=torch.float64)
    plain = torch.stack((theta.cos(), theta.sin()))
    want = torch.autograd.grad((plain * w).sum(), theta)[0]
    out = torch.compile(tg.cos_sin, backend="aot_eager", fullgraph=True)(theta)
    assert torch.equal(out, plain)
    assert torch.allclose(torch.autograd.grad((out * w).sum(), theta)[0], want, rtol=0, atol=1e-12)


def test_noise_rotation_pairs_half_split_planes():
    """With ROPE_DIMS=4 of 8: RoPE planes (0,2), (1,3) use angles 0, 1; the rest (4,6), (5,7)
    use 2, 3."""
    attn = make_attention(1, xsa=False, coda=True, rope_dims=4)
    for pair, (i, j) in enumerate([(0, 2), (1, 3), (4, 6), (5, 7)]):
        with torch.no_grad():
            attn.coda_theta.zero_()
            attn.coda_theta[:, pair] = math.pi / 2
            q = torch.zeros(1, 1, HEADS, HEAD_DIM)
            q[..., i] = 1.0
            expected = torch.zeros_like(q)
            expected[..., j] = -1.0  # (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin)
            assert (attn.noise_queries(q) - expected).abs().max() < 1e-6, (i, j)


@pytest.mark.parametrize("num_kv_heads,noise_heads,xsa,norm", [
    (2, 2, True, "rms"), (2, 1, False, "learned"), (1, 2, True, "none"), (1, 1, True, "learned"),
    (2, 1, True, "rms")])
def test_coda_gradients_match_finite_differences(num_kv_heads, noise_heads, xsa, norm, monkeypatch):
    """float64 gradcheck of the layer's output against its input and every CoDA parameter (angles,
    gate, learned norm), for each noise-head split and head norm. With XSA token 0's output is the
    norm of rounding residue (it attends only to itself), so outputs from token 1 on are checked.
    The layer's `.float()` (fp32 for bf16 activations) is kept from rounding float64 down, or finite
    differences would see fp32 steps."""
    monkeypatch.setattr(torch.Tensor, "float",
                        lambda t: t if t.dtype == torch.float64 else t.to(torch.float32))
    attn = make_attention(num_kv_heads, xsa=xsa, coda=True, rope_dims=4, noise_heads=noise_heads,
                          norm=norm).double()
    names = [n for n, _ in attn.named_parameters() if n.startswith("coda_")]
    assert ("coda_norm" in names) == (norm == "learned")
    x = torch.randn(1, 5, DIM, dtype=torch.float64, requires_grad=True)

    def layer(x, *params):
        return torch.func.functional_call(attn, dict(zip(names, params)), (x,))[:, 1:]

    params = [attn.get_parameter(n).detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(layer, (x, *params))


def test_coda_lambda_init_sets_the_gate_and_default_bias_is_minus_six(monkeypatch):
    """CODA_LAMBDA_INIT=0.3: lambda is 0.3 on every token and head at the start (the gate's weight
    is 0); by default the bias is exactly -6, as before the variable existed."""
    _, model = full_model(monkeypatch)
    assert torch.all(model.blocks[1].attn.coda_gate.bias == -6.0)
    _, model = full_model(monkeypatch, CODA_LAMBDA_INIT=0.3)
    ids = tokens()[0]
    (layer, stats), = tg.coda_stats(model, ids)
    assert layer == 1 and stats["lambda_mean"] == pytest.approx(0.3, abs=1e-6)
    assert stats["lambda_max"] == pytest.approx(0.3, abs=1e-6)
    assert stats["theta_dev_mean"] == stats["theta_dev_max"] == 0


@pytest.mark.parametrize("noise_heads", [0, 1])
def test_coda_stats_equal_an_independent_reference(noise_heads):
    """Two CoDA layers (the deeper one with XSA) off their init: coda_stats' lambda, angle
    deviations and RMS of the norm's input and of the signal alone equal the plain two-call
    computation on each layer's input (captured by a hook); the model's output does not change and
    the capture is switched off after."""
    torch.manual_seed(0)
    model = tg.GPT(vocab_size=VOCAB, num_layers=2, model_dim=DIM, num_heads=HEADS, num_kv_heads=2,
                   mlp_mult=2, max_seq_len=SEQ, xsa_last_n=1, coda_last_n=2,
                   act_dtype=torch.float32, coda_noise_heads=noise_heads)
    perturb(model, 0.3)
    with torch.no_grad():
        for block in model.blocks:  # gates open, angles off pi/2
            block.attn.coda_theta.uniform_(-math.pi, math.pi)
            block.attn.coda_gate.bias.fill_(0.0)
    ids = tokens()[0]
    inputs = {}
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        before = model.hidden(ids)
        stats = tg.coda_stats(model, ids)
    for h in hooks:
        h.remove()
    assert [i for i, _ in stats] == [0, 1]
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    for i, got in stats:
        attn = model.blocks[i].attn
        assert attn.stats is None
        with torch.no_grad():
            signal, noise, lam = reference_streams(attn, inputs[i])
        dev = (attn.coda_theta - math.pi / 2).abs()
        want = dict(lambda_mean=lam.mean().item(), lambda_max=lam.max().item(),
                    theta_dev_mean=dev.mean().item(), theta_dev_max=dev.max().item(),
                    pre_norm_rms=rms(signal - lam * noise), signal_rms=rms(signal))
        assert got == pytest.approx(want, rel=1e-5), i
        assert 0.1 < want["lambda_mean"] < want["lambda_max"] and want["theta_dev_max"] > 0.1
        assert abs(want["pre_norm_rms"] - want["signal_rms"]) > 1e-3  # the noise stream counts here
    assert torch.equal(model.hidden(ids), before)


# -----------------------------
# Rotary
# -----------------------------

@pytest.mark.parametrize("rope_dims", [0, 4])
def test_rotary(rope_dims):
    rotary = tg.Rotary(HEAD_DIM, rope_dims, 10000.0, SEQ)
    r = rope_dims or HEAD_DIM
    x = torch.randn(2, SEQ, HEADS, HEAD_DIM)
    out = rotary(x)
    assert torch.equal(out[..., r:], x[..., r:])
    assert torch.allclose(out[:, 0], x[:, 0])
    # Each half-split plane (i, i + r/2) keeps its norm.
    plane = lambda t: t[..., :r // 2] ** 2 + t[..., r // 2:r] ** 2  # noqa: E731
    assert torch.allclose(plane(out), plane(x), atol=1e-5)
    # Pair 1 turns by position * base^(-2/r).
    e = torch.zeros(1, SEQ, 1, HEAD_DIM)
    e[..., 1] = 1.0
    angle = torch.arange(SEQ) * 10000.0 ** (-2 / r)
    assert torch.allclose(rotary(e)[0, :, 0, 1], angle.cos(), atol=1e-5)
    assert torch.allclose(rotary(e)[0, :, 0, 1 + r // 2], -angle.sin(), atol=1e-5)
    # <rot(q, m), rot(k, n)> depends only on m - n.
    q = torch.randn(HEAD_DIM).expand(1, SEQ, 1, HEAD_DIM)
    k = torch.randn(HEAD_DIM).expand(1, SEQ, 1, HEAD_DIM)
    scores = rotary(q)[0, :, 0] @ rotary(k)[0, :, 0].T
    for offset in range(-SEQ + 1, SEQ):
        diagonal = scores.diagonal(offset)
        assert (diagonal - diagonal[0]).abs().max() < 1e-4, offset
    assert (scores.diagonal(0)[0] - scores.diagonal(3)[0]).abs() > 1e-3  # positions do matter


# -----------------------------
# FlashAttention-3's branch of attention(), through a stand-in on CPU
# -----------------------------

class FA3StandIn:
    """flash_attn_interface.flash_attn_func's signature and layout: q [B, T, H, D], k and v
    [B, T, Hkv, D], query head h reading KV head h // (H / Hkv); out [B, T, H, D], or (out, lse) as
    some versions return. Its math is written out here (einsum, an explicit causal mask), not taken
    from SDPA. `kv_head` maps query heads to KV heads: a wrong map shows the comparison can fail."""

    def __init__(self, returns_tuple=False, kv_head=lambda h, group, hkv: h // group):
        self.returns_tuple, self.kv_head, self.dtypes = returns_tuple, kv_head, []

    def __call__(self, q, k, v, softmax_scale=None, causal=False):
        B, T, H, D = q.shape
        Hkv = k.size(2)
        assert k.shape == v.shape == (B, T, Hkv, D) and H % Hkv == 0, (q.shape, k.shape, v.shape)
        assert causal is True
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1  # FA3: last dim contiguous
        self.dtypes.append((q.dtype, k.dtype, v.dtype))
        scale = D ** -0.5 if softmax_scale is None else softmax_scale
        heads = torch.tensor([self.kv_head(h, H // Hkv, Hkv) for h in range(H)])
        wide = torch.promote_types(q.dtype, torch.float32)  # bf16 in, fp32 math, as FA3
        scores = torch.einsum("bthd,bshd->bhts", q.to(wide), k[:, :, heads].to(wide)) * scale
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v[:, :, heads].to(wide))
        out = out.to(q.dtype)
        return (out, torch.logsumexp(scores, -1)) if self.returns_tuple else out


def fa3_gpt(num_kv_heads, xsa_last_n, coda_last_n, ve_last_n, act_dtype=torch.float64):
    """float64 by default: the two paths then agree to ~1e-13, where fp32 rounding (amplified by
    XSA's small remainders) left gaps of 1e-4 in small gradients."""
    torch.manual_seed(0)
    model = tg.GPT(vocab_size=VOCAB, num_layers=2, model_dim=DIM, num_heads=HEADS,
                   num_kv_heads=num_kv_heads, mlp_mult=2, max_seq_len=SEQ, rope_dims=4,
                   bigram_vocab_size=16, bigram_dim=8,
                   xsa_last_n=xsa_last_n, coda_last_n=coda_last_n, ve_last_n=ve_last_n, ve_dim=8,
                   act_dtype=act_dtype).to(torch.promote_types(act_dtype, torch.float32))
    perturb(model)
    with torch.no_grad():
        for block in model.blocks:
            if block.attn.coda:  # gates well open and angles off pi/2: noise heads count
                block.attn.coda_theta.uniform_(-math.pi, math.pi)
                block.attn.coda_gate.bias.fill_(0.0)
    return model


def loss_and_grads(model, monkeypatch, fa3):
    """The loss and its gradients, through SDPA (fa3 None) or through `fa3` as FlashAttention-3."""
    with monkeypatch.context() as m:
        if fa3 is not None:
            m.setattr(tg, "fa3_attention", fa3)
            m.setattr(tg, "FA3_DEVICE", "cpu")
        model.zero_grad()
        loss = model(*tokens())
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# Layer 0 XSA and a value embedding, layer 1 all three (CoDA's noise queries stacked 2x on the group
# axis); CoDA without XSA; each with GQA (2 KV heads) and MQA (1).
FA3_CONFIGS = dict(xsa_coda_ve=(2, 1, 2), coda_only=(0, 2, 0))


@pytest.mark.parametrize("returns_tuple", [False, True], ids=["tensor", "tuple"])
@pytest.mark.parametrize("num_kv_heads", [2, 1])
@pytest.mark.parametrize("config", list(FA3_CONFIGS))
def test_fa3_branch_equals_sdpa(config, num_kv_heads, returns_tuple, monkeypatch):
    model = fa3_gpt(num_kv_heads, *FA3_CONFIGS[config])
    fa3 = FA3StandIn(returns_tuple)
    loss, grads = loss_and_grads(model, monkeypatch, fa3)
    assert len(fa3.dtypes) == len(model.blocks)  # every layer went through the branch
    ref_loss, ref_grads = loss_and_grads(model, monkeypatch, None)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)  # the logits are fp32
    for name, g in ref_grads.items():
        assert (grads[name] - g).norm() <= 1e-9 * g.norm(), name
    if num_kv_heads > 1:  # the KV head of query head h is h // (H / Hkv): reading h % Hkv must show
        wrong = FA3StandIn(returns_tuple, kv_head=lambda h, group, hkv: h % hkv)
        assert (loss_and_grads(model, monkeypatch, wrong)[0] - ref_loss).abs() > 1e-3


def test_fa3_branch_gets_one_dtype_in_bf16(monkeypatch):
    """FA3 has no fp32 kernel and no mixed inputs: with bf16 activations (the GPU's), q, k and v
    (value embedding included) arrive in bf16, and the loss is SDPA's within bf16 rounding."""
    model = fa3_gpt(2, *FA3_CONFIGS["xsa_coda_ve"], act_dtype=torch.bfloat16)
    fa3 = FA3StandIn()
    loss, _ = loss_and_grads(model, monkeypatch, fa3)
    assert fa3.dtypes == [(torch.bfloat16,) * 3] * len(model.blocks)
    # a wrong map: 4e-3
    assert (loss - loss_and_grads(model, monkeypatch, None)[0]).abs() < 1e-3 * loss


@pytest.mark.parametrize("choice", ["auto", "sdpa"])
def test_attention_sdpa_keeps_flashattention3_out_where_it_imports(choice, monkeypatch):
    """ATTENTION=auto runs FlashAttention-3 where it imports (and says so); ATTENTION=sdpa never
    calls it, on the device FA3 would serve, and names SDPA."""
    model = fa3_gpt(2, *FA3_CONFIGS["xsa_coda_ve"])
    fa3 = FA3StandIn()
    monkeypatch.setattr(tg, "fa3_attention", fa3)
    monkeypatch.setattr(tg, "FA3_DEVICE", "cpu")
    kernel = tg.choose_attention(types.SimpleNamespace(attention=choice), torch.device("cpu"))
    model(*tokens())
    assert kernel == {"auto": "fa3", "sdpa": "sdpa"}[choice]
    assert len(fa3.dtypes) == (len(model.blocks) if choice == "auto" else 0)


# -----------------------------
# Newton-Schulz and Muon
# -----------------------------
# The products run in tg.compute_dtype: bf16 on GPUs, fp32 on CPUs. Both are checked here, bf16 by
# patching compute_dtype, since bf16 is what the record runs.

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=DTYPES, ids=["fp32", "bf16"])
def compute_dtype(request, monkeypatch):
    monkeypatch.setattr(tg, "compute_dtype", lambda device: request.param)
    return request.param


def newton_schulz_reference(G, steps=5, eps=1e-7):
    """The quintic iteration written out in float64, one matrix at a time."""
    if G.ndim > 2:
        return torch.stack([newton_schulz_reference(g, steps, eps) for g in G])
    a, b, c = 3.4445, -4.7750, 2.0315
    transposed = G.size(0) > G.size(1)
    X = G.double().T if transposed else G.double()
    X = X / (X.norm() + eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if transposed else X).float()


def well_conditioned(rows, cols, seed):
    """Random singular vectors, singular values spread over [0.05, 1]. A square Gaussian matrix has
    a smallest singular value ~1/n of its norm, which five quintic steps cannot lift to 0.5
    (measured: 0.06 on 64x64), so square inputs get a known spectrum instead."""
    g = torch.Generator().manual_seed(seed)
    n = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, n, generator=g))
    s = torch.logspace(math.log10(0.05), 0, n)[torch.randperm(n, generator=g)]
    return u @ torch.diag(s) @ v.T


def check_orthogonalized(G, out, dtype):
    """out ~ U diag(d) V^T for G = U S V^T, with every d in [0.5, 1.5] and mean ~0.8-0.9
    (measured)."""
    assert out.shape == G.shape and out.dtype == dtype
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    core = U.mT @ out.float() @ Vh.mT
    d = core.diagonal(dim1=-2, dim2=-1)
    assert (core - torch.diag_embed(d)).abs().max() < 0.05  # same singular vectors as G
    assert d.min() > 0.5 and d.max() < 1.5
    assert 0.7 < d.mean() < 1.0
    s = torch.linalg.svdvals(out.float())
    assert s.min() > 0.5 and s.max() < 1.5


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_newton_schulz_singular_values(shape, compute_dtype):
    for seed in range(3):
        G = well_conditioned(*shape, seed) if shape[0] == shape[1] else torch.randn(*shape)
        out = tg.newton_schulz(G)
        check_orthogonalized(G, out, compute_dtype)
        # Scale-free: the input is normalized first (a power of 2 keeps the bf16 rounding
        # identical).
        assert torch.allclose(out, tg.newton_schulz(G * 1024), atol=1e-6)
        # bf16 products round at ~2^-9 and five iterations compound it (~4% of the norm, measured).
        tol = 1e-5 if compute_dtype == torch.float32 else 0.06
        assert (out.float() - newton_schulz_reference(G)).norm() < tol * out.float().norm()


def test_newton_schulz_is_per_matrix_in_a_batch(compute_dtype):
    torch.manual_seed(0)
    G = torch.randn(3, 48, 80) * torch.tensor([0.01, 1.0, 100.0])[:, None, None]
    batched = tg.newton_schulz(G)
    check_orthogonalized(G, batched, compute_dtype)
    one_by_one = torch.stack([tg.newton_schulz(g) for g in G])
    assert (batched.float() - one_by_one.float()).abs().max() < 1e-2
    assert (batched.float() - newton_schulz_reference(G)).norm() < 0.06 * batched.float().norm()


def test_newton_schulz_matches_torch():
    """torch.optim.Muon's own iteration (always bf16): ours in bf16 or fp32 lands within bf16
    noise."""
    for shape in [(32, 16), (16, 48), (64, 64)]:
        G = torch.randn(shape)
        theirs = torch.optim._muon._zeropower_via_newtonschulz(G, (3.4445, -4.7750, 2.0315), 5,
                                                               1e-7).float()
        assert (newton_schulz_reference(G) - theirs).norm() < 0.06 * theirs.norm(), shape


def muon_problem(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]
    return params, grads


def run_optimizer(make_opt, params, grads):
    params = [nn.Parameter(p.clone()) for p in params]
    opt = make_opt(params)
    for step_grads in grads:
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def assert_same_updates(start, a, b, rtol):
    for p0, pa, pb in zip(start, a, b):
        da, db = pa - p0, pb - p0
        assert (da - db).norm() < rtol * db.norm(), p0.shape


MUON_SHAPES = [(32, 16), (32, 16), (16, 48), (24, 24), (40, 8)]


def test_muon_matches_torch_optim_muon(compute_dtype, monkeypatch):
    """torch.optim.Muon keeps its buffer in lerp form, B = mu B + (1 - mu) g, and steps along
    g.lerp(B, mu); ours is B = mu B + g and g + mu B, i.e. (1 - mu) times larger. Newton-Schulz
    normalizes its input, so the updates agree. Weight decay uses the unadjusted lr in both, and
    adjust_lr_fn="original" is our sqrt(max(1, rows/cols)) scale. torch's iteration is always bf16:
    for the fp32 case it is swapped for ours, so the comparison is exact up to fp32 rounding; two
    bf16 iterations differ by ~4% (measured)."""
    if compute_dtype == torch.float32:
        monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz",
                            lambda grad, coefficients, steps, eps:
                                tg.newton_schulz(grad, steps, eps))
    params, grads = muon_problem(MUON_SHAPES, steps=3)
    make_ours = lambda nesterov: lambda ps: tg.Muon(  # noqa: E731
        ps, lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=nesterov)
    theirs = run_optimizer(lambda ps: torch.optim.Muon(ps, lr=0.02, momentum=0.95, weight_decay=0.1,
                                                       nesterov=True, adjust_lr_fn="original"),
                           params, grads)
    rtol = 1e-4 if compute_dtype == torch.float32 else 8e-2
    assert_same_updates(params, run_optimizer(make_ours(True), params, grads), theirs, rtol)
    # Without the Nesterov term the updates must disagree: the comparison can fail.
    with pytest.raises(AssertionError):
        assert_same_updates(params, run_optimizer(make_ours(False), params, grads), theirs,
                            3 * rtol)


# On 3 ranks: 4 matrices of one shape, 1 of its transpose, 2 of a third (no count divides 3), and a
# second group of 2 (one rank gets none of it).
SHARED_SHAPES = [(16, 32)] * 4 + [(32, 16), (24, 24), (24, 24), (8, 40), (8, 40)]
SHARED_STEPS, SHARED_WORLD = 2, 3


def run_tg_muon(orthogonalize=tg.newton_schulz):
    params, grads = muon_problem(SHARED_SHAPES, SHARED_STEPS, seed=3)
    # Two groups, like a real set-up with several learning rates.
    make = lambda ps: tg.Muon(  # noqa: E731
        [{"params": ps[:7]}, {"params": ps[7:], "lr": 0.01}], lr=0.02, momentum=0.9,
        weight_decay=0.1, orthogonalize=orthogonalize)
    return params, run_optimizer(make, params, grads)


def _shared_muon_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for dtype in DTYPES:  # one process group for both: spawning costs more than the steps
            tg.compute_dtype = lambda device: dtype
            calls = []  # the shape of every batch this rank orthogonalized
            record = lambda G: calls.append(tuple(G.shape)) or tg.newton_schulz(G)  # noqa: E731
            params = run_tg_muon(record)[1]
            torch.save((params, calls), os.path.join(out_dir, f"{dtype}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_muon_shared_across_ranks_equals_single_process(tmp_path, monkeypatch):
    world = SHARED_WORLD
    mp.spawn(_shared_muon_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    for dtype in DTYPES:
        monkeypatch.setattr(tg, "compute_dtype", lambda device: dtype)
        start, single = run_tg_muon()
        ranks = [torch.load(tmp_path / f"{dtype}-rank{r}.pt") for r in range(SHARED_WORLD)]
        for params, _ in ranks[1:]:
            for a, b in zip(ranks[0][0], params):
                assert torch.equal(a, b)  # replicas stay identical
        # Each matrix goes through the same iteration either way; only the batch it rides in
        # differs.
        rtol = 1e-5 if dtype == torch.float32 else 1e-2
        assert_same_updates(start, ranks[0][0], single, rtol)
        # Every step, each matrix is orthogonalized once: on one rank, in its batch of that shape.
        done = {}
        for _, calls in ranks:
            assert len(calls) == len(set(calls)) * SHARED_STEPS, calls
            for batch in set(calls):
                done[batch[1:]] = done.get(batch[1:], 0) + batch[0]
        assert done == {s: SHARED_SHAPES.count(s) for s in SHARED_SHAPES}
        assert all(calls for _, calls in ranks)  # split by count, rank 2 got none of these 9


def newton_schulz_flops(shape):
    """tg.newton_schulz's cost on one matrix, by torch's FLOP counter (on meta: no arithmetic)."""
    with FlopCounterMode(display=False) as counter:
        tg.newton_schulz(torch.empty(shape, device="meta"))
    return counter.get_total_flops()


def check_plan(shapes, world):
    """share_by_cost's plan is a partition into per-shape batches whose results lie apart in the
    gathered buffer, each in its rank's share. Returns each rank's cost in FLOPs."""
    batches, offsets, size = tg.share_by_cost(tuple(shapes), world)
    assert len(batches) == world and len(offsets) == len(shapes)
    assigned = sorted(i for mine in batches for batch in mine for i in batch)
    assert assigned == list(range(len(shapes)))  # every matrix exactly once
    load, used = [0] * world, [set() for _ in range(world)]
    for r, mine in enumerate(batches):
        kinds = [shapes[batch[0]] for batch in mine]
        assert len(kinds) == len(set(kinds))  # one batch (one call) per shape
        for batch in mine:
            assert all(shapes[i] == shapes[batch[0]] for i in batch)
            for i in batch:
                n = math.prod(shapes[i])
                cells = set(range(offsets[i], offsets[i] + n))
                assert r * size <= offsets[i] and offsets[i] + n <= (r + 1) * size
                assert not cells & used[r]  # no two results overlap
                used[r] |= cells
                load[r] += newton_schulz_flops(shapes[i])
    # A batch lies contiguously in the buffer (one copy per batch), in the order of its indices.
    for mine in batches:
        for batch in mine:
            starts = [offsets[i] for i in batch]
            step = math.prod(shapes[batch[0]])
            assert starts == [starts[0] + j * step for j in range(len(batch))]
    return load


def record_muon_shapes(monkeypatch):
    """The shapes of the record run's Muon matrices, in its parameter order, from the defaults."""
    for name in list(os.environ):
        if name.isupper() and name in tg.Hyperparameters.__init__.__code__.co_consts:
            monkeypatch.delenv(name)
    args = tg.Hyperparameters()
    muon, _ = tg.make_optimizers(tg.build_model(args, torch.device("cpu")), args, tg.newton_schulz)
    assert len(muon.param_groups) == 1
    return [tuple(p.shape) for p in muon.param_groups[0]["params"]]


def test_muon_plan_balances_cost_across_8_ranks_at_the_record_shape(monkeypatch):
    shapes = record_muon_shapes(monkeypatch)
    per_layer = [(512, 512), (256, 512), (256, 512), (512, 512), (1536, 512), (512, 1536)]
    assert sorted(shapes) == sorted(per_layer * 11 + [(512, 128)])  # 11 layers and bigram.proj
    world = 8
    load = check_plan(shapes, world)
    mean = sum(load) / world
    assert max(load) <= 1.1 * mean, [x / mean for x in load]
    plan = tg.share_by_cost(tuple(shapes), world)
    assert tg.share_by_cost.__wrapped__(tuple(shapes), world) == plan  # not just cached
    # The split by count it replaced (per shape, ceil(n / world) consecutive matrices a rank): two
    # ranks got none of the 1536x512 matrices and the most loaded rank a third more than the mean.
    by_count = [0] * world
    for shape in set(shapes):
        of_shape = [i for i, s in enumerate(shapes) if s == shape]
        per_rank = -(-len(of_shape) // world)
        for r in range(world):
            mine = of_shape[r * per_rank:(r + 1) * per_rank]
            by_count[r] += len(mine) * newton_schulz_flops(shape)
            if shape == (1536, 512) and r >= world - 2:
                assert not mine
    assert max(by_count) > 1.3 * mean, [x / mean for x in by_count]


@pytest.mark.parametrize("seed", range(18))
def test_muon_plan_is_within_the_greedy_bound(seed):
    """Random shapes and world sizes (more ranks than matrices included): a partition whose most
    loaded rank is within list scheduling's bound, mean + (1 - 1/world) x the costliest matrix."""
    g = torch.Generator().manual_seed(seed)
    sizes = [8, 16, 24, 40, 64]
    pick = lambda high, *shape: torch.randint(0, high, shape, generator=g).tolist()  # noqa: E731
    kinds = [(sizes[a], sizes[b]) for a, b in pick(len(sizes), 4, 2)]
    shapes = [kinds[k] for k in pick(4, 1 + pick(29, 1)[0])]
    world = 1 + seed % 9
    load = check_plan(shapes, world)
    costliest = max(map(newton_schulz_flops, shapes))
    assert max(load) <= sum(load) / world + (1 - 1 / world) * costliest
    if world == 1:
        assert load == [sum(map(newton_schulz_flops, shapes))]


# -----------------------------
# What trains, stores, rounds and calibrates each parameter
# -----------------------------

def full_model(monkeypatch, **extra):
    """A model with every kind of parameter: bigram, XSA, CoDA, value embedding, partial RoPE."""
    env = dict(VOCAB_SIZE=VOCAB, NUM_LAYERS=2, MODEL_DIM=DIM, NUM_HEADS=HEADS, NUM_KV_HEADS=2,
               MLP_MULT=2, TRAIN_SEQ_LEN=SEQ, EVAL_SEQ_LEN=SEQ, EVAL_STRIDE=8,
               TRAIN_BATCH_TOKENS=SEQ * 8, GRAD_ACCUM_STEPS=1, BIGRAM_VOCAB_SIZE=16, BIGRAM_DIM=8,
               XSA_LAST_N=1, CODA_LAST_N=1, ROPE_DIMS=4, VE_LAST_N=1, VE_DIM=8, TTT_ENABLED=0,
               **extra)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("CODA_ENABLED", raising=False)
    args = tg.Hyperparameters()
    torch.manual_seed(0)
    return args, tg.build_model(args, torch.device("cpu"))


@pytest.mark.parametrize("coda", [{}, dict(CODA_HEAD_NORM="learned", CODA_NOISE_HEADS=1,
                                           CODA_LR=0.031)])
def test_each_parameter_is_trained_once_and_decays_at_its_groups_rate(monkeypatch, coda):
    """One optimizer step with zero gradients leaves only weight decay: every product's matrix
    (bigram's and the value embedding's too) shrinks at Muon's rate, the embeddings at Adam's
    with TIED_EMBED_LR, the control tensors at Adam's with SCALAR_LR, and CoDA's angle, gate and
    learned norm not at all (decay would pull the angle to 0, where noise equals signal); they
    train at CODA_LR (SCALAR_LR by default)."""
    lr = dict(TIED_EMBED_LR=0.123, SCALAR_LR=0.045, MATRIX_LR=0.067, MUON_WD=0.011, ADAM_WD=0.022)
    args, model = full_model(monkeypatch, **lr, **coda)
    muon, opts = tg.make_optimizers(model, args, tg.newton_schulz)
    assert opts[0] is muon
    held = [id(p) for opt in opts for group in opt.param_groups for p in group["params"]]
    assert sorted(held) == sorted(id(p) for p in model.parameters())  # each exactly once
    roles = parts.parameter_roles(model)
    assert {r for r in roles.values()} == {"matrix", "embedding", "coda", "control"}
    assert {"bigram.proj.weight", "value_embed.proj.weight"} <= parts.of_role(model, "matrix")
    assert {id(p) for group in muon.param_groups for p in group["params"]} == {
        id(p) for n, p in model.named_parameters() if roles[n] == "matrix"}
    assert ("blocks.1.attn.coda_norm" in roles) == bool(coda)
    coda_ids = {id(p) for n, p in model.named_parameters() if roles[n] == "coda"}
    coda_groups = [g for opt in opts for g in opt.param_groups
                   if {id(p) for p in g["params"]} == coda_ids]
    assert [g["lr"] for g in coda_groups] == [coda.get("CODA_LR", 0.045)]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
            p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for opt in opts:
        for group in opt.param_groups:
            assert group["base_lr"] == group["lr"]
        opt.step()
    factor = {"matrix": 1 - 0.067 * 0.011, "embedding": 1 - 0.123 * 0.022,
              "control": 1 - 0.045 * 0.022, "coda": 1.0}
    for name, p in model.named_parameters():
        assert torch.allclose(p, before[name] * factor[roles[name]], rtol=1e-6, atol=0), name


def test_each_matrix_is_stored_int6_quantization_aware_and_calibrated(monkeypatch, tmp_path):
    """The products' matrices, and only they, are what Muon trains, what the export rounds to int6
    (int5 under a budget), what LATE_QAT rounds in training and what GPTQ (and the Fisher rule)
    calibrates; embeddings are stored int8 (the Fisher rule weighs their rows too), CoDA's gate
    matrix fp16, every other tensor (CoDA's learned norm too) fp32."""
    args, model = full_model(monkeypatch, LATE_QAT=0.5, CODA_HEAD_NORM="learned")
    assert "blocks.1.attn.coda_norm" in parts.of_role(model, "coda")
    roles = parts.parameter_roles(model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    packed = tg.quantize_state(model.state_dict())
    for name, (kind, *_) in packed.items():
        role = roles[name]
        expected = {"matrix": "int6", "embedding": "int8", "control": "fp32"}.get(role)
        if role == "coda":
            expected = "fp16" if name.endswith("coda_gate.weight") else "fp32"
        assert kind == expected, (name, role, kind)
    matrices = parts.of_role(model, "matrix")
    tight = tg.quantize_state(model.state_dict(), budget_bytes=0)
    assert {n for n, v in tight.items() if v[0] == "int5"} == matrices
    with_qat = {f"{n}.weight" for n, m in model.named_modules()
                if isinstance(m, tg.CastedLinear) and m.qat is not None}
    assert with_qat == matrices
    shard = tmp_path / "fineweb_train_000000.bin"
    synth.write_shard(str(shard), list(range(VOCAB)) * 4)
    hessians, fisher, _ = tg.collect_hessians(args, model, [str(shard)], 0, 1, torch.device("cpu"))
    assert set(hessians) == matrices and all(h.any() for h in hessians.values())
    assert args.export_rule == "fisher"  # the default's row weights
    assert set(fisher) == matrices | parts.of_role(model, "embedding")
    assert all((fisher[n] > 0).all() for n in matrices | {"tok_emb.weight"})  # the head reads all


# -----------------------------
# The agreed clock
# -----------------------------


def test_agreed_clock_reads_one_step_late_and_stops_three_steps_short():
    """Steps of 200 ms against a 1000 ms budget: the flags of step k are read after step k + 1 is
    recorded; the stop comes once the clock read plus three average steps reaches the budget."""
    clock = tg.AgreedClock(cap_ms=1200.0, budget_ms=1000.0, world_size=1, log=lambda *a, **k: None)
    polls, seen = [], []
    for step in range(1, 5):
        clock.record(step, 200.0 * step, torch.tensor(1.0))
        polls.append(clock.poll())
        seen.append((clock.step, clock.ms, clock.at(step)))
    assert polls == [False, False, True, True]  # read step 1: 200 + 600 < 1000; step 2: 400 + 1200
    assert seen == [(0, 0.0, 0.0), (1, 200.0, 400.0), (2, 400.0, 600.0), (3, 600.0, 800.0)]
    clock.finish()
    assert (clock.step, clock.ms) == (4, 800.0)
    uncapped = tg.AgreedClock(cap_ms=0.0, budget_ms=0.0, world_size=1, log=lambda *a, **k: None)
    for step in range(1, 4):
        uncapped.record(step, 1e9 * step, torch.tensor(1.0))
        assert not uncapped.poll()


@pytest.mark.parametrize("last", [False, True])
def test_agreed_clock_stops_at_a_loss_that_is_not_finite(last):
    """A NaN is found when its step's flags are read: a step late, or by finish() after the
    last step; the error names the step and goes to the log."""
    logged = []
    clock = tg.AgreedClock(cap_ms=0.0, budget_ms=0.0, world_size=1,
                           log=lambda msg, console=True: logged.append(msg))
    clock.record(1, 10.0, torch.tensor(1.0))
    clock.record(2, 20.0, torch.tensor(float("nan")))
    with pytest.raises(tg.TrainingDiverged, match="not finite at step 2"):
        if last:
            assert not clock.poll()  # reads step 1 only
            clock.finish()
        else:
            clock.record(3, 30.0, torch.tensor(1.0))
            clock.poll()
    assert logged and logged[0].startswith("error: training loss is not finite at step 2")
