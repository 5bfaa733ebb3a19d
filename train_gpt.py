"""Parameter Golf trainer: a GPT trained in 600 s on 8 GPUs, stored as int6/int8 + zstd within
16,000,000 bytes with this file, scored from disk by exact bits per byte on FineWeb's validation.

    torchrun --standalone --nproc_per_node=8 train_gpt.py      # the record run
    torchrun --standalone --nproc_per_node=1 train_gpt.py      # one GPU (GRAD_ACCUM_STEPS=8)
    python train_gpt.py                                        # one process, GPU or CPU

Every toggle is an environment variable read and checked once in Hyperparameters (README: table).
"""

from __future__ import annotations

import collections
import copy
import fcntl
import fnmatch
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch._inductor.config as inductor_config
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

try:  # FlashAttention-3 (Hopper) on FA3_DEVICE, decided here alone
    from flash_attn_interface import flash_attn_func as fa3_attention
    FA3_DEVICE = "cuda"
except ImportError:
    fa3_attention = FA3_DEVICE = None
try:  # XSA's fused kernels on CUDA
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:
    triton = None
try:
    import zstandard
except ImportError:
    zstandard = None

# Inductor's mix-order reduction fuses gain gradients into one slow kernel.
if hasattr(inductor_config.triton, "mix_order_reduction"):
    inductor_config.triton.mix_order_reduction = False

# -----------------------------
# HYPERPARAMETERS
# -----------------------------


# CoDA's head norms (the first is the default) and its initial lambda, sigmoid(-6).
CODA_HEAD_NORMS = ("rms", "learned", "none")
CODA_LAMBDA_INIT = 1 / (1 + math.exp(6))
# How the export fits the budget (the first is the default); see quantize_state.
EXPORT_RULES = ("fisher", "fill", "rate")
# The training data's order (the first is the default); see DistributedTokenLoader.
DATA_ORDERS = ("strided", "stream")
# TTT's forms (the first is the default): LoRA per document; full-weight SGD on stream chunks.
TTT_MODES = ("lora", "sgd")
# Attention (the first is the default): FlashAttention-3 where it imports, else SDPA; SDPA only.
ATTENTIONS = ("auto", "sdpa")


class ConfigError(Exception):
    """Bad input: one line and a non-zero exit, before anything is written."""


def _text(name: str, default):
    """The variable's value, stripped; an empty or blank one counts as unset."""
    return os.environ.get(name, "").strip() or default


def _env(name: str, default, cast=int):
    raw = os.environ.get(name, "")  # unstripped: a bad value is quoted as it was given
    if raw.strip() == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r}: expected {'an integer' if cast is int else 'a number'}") from None
    if cast is float and not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r}: expected a finite number")
    return value


def _layers(name: str) -> tuple[int, ...]:
    raw = _text(name, "")
    try:
        return tuple(int(part) for part in raw.split(",")) if raw else ()
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected layer indices separated by commas, "
                          f"e.g. 4,5") from None


def layer_list(layers) -> str:
    """4,5: layers as the environment spells them."""
    return ",".join(map(str, layers))


def _flag(name: str, default: bool) -> bool:
    value = _env(name, int(default))
    if value not in (0, 1):
        raise ConfigError(f"{name}={value}: expected 0 or 1")
    return bool(value)


class Hyperparameters:
    def __init__(self, world_size: int = 1):
        self.data_path = _text("DATA_PATH", "./data/datasets/fineweb10B_sp1024")
        self.tokenizer_path = _text("TOKENIZER_PATH",
                                    "./data/tokenizers/fineweb_1024_bpe.model")
        self.vocab_size = _env("VOCAB_SIZE", 1024)
        self.run_id = _text("RUN_ID", None) or str(uuid.uuid4())
        self.seed = _env("SEED", 1337)
        # Shape.
        self.num_layers = _env("NUM_LAYERS", 11)
        self.model_dim = _env("MODEL_DIM", 512)
        self.num_heads = _env("NUM_HEADS", 8)
        self.num_kv_heads = _env("NUM_KV_HEADS", 4)
        self.mlp_mult = _env("MLP_MULT", 3.0, float)
        self.rope_dims = _env("ROPE_DIMS", 0)
        self.rope_base = _env("ROPE_BASE", 10000.0, float)
        self.logit_softcap = _env("LOGIT_SOFTCAP", 30.0, float)
        self.qk_gain_init = _env("QK_GAIN_INIT", 1.5, float)
        self.bigram_vocab_size = _env("BIGRAM_VOCAB_SIZE", 2048)
        self.bigram_dim = _env("BIGRAM_DIM", 128)
        self.xsa_last_n = _env("XSA_LAST_N", 4)
        self.coda_last_n = _env("CODA_LAST_N", 0)
        if _flag("CODA_ENABLED", False):
            self.coda_last_n = self.num_layers
        group = self.num_heads // max(self.num_kv_heads, 1)
        self.coda_noise_heads = _env("CODA_NOISE_HEADS", group)  # one per head
        self.coda_head_norm = _text("CODA_HEAD_NORM", "rms")
        self.coda_lambda_init = _env("CODA_LAMBDA_INIT", CODA_LAMBDA_INIT, float)
        self.ve_last_n = _env("VE_LAST_N", 0)
        self.ve_dim = _env("VE_DIM", 128)
        self.parallel_last_n = _env("PARALLEL_LAST_N", 0)
        self.recur_layers = _layers("RECUR_LAYERS")
        self.recur_start = _env("RECUR_START", 0.44, float)
        self.mlp_leaky_slope = _env("MLP_LEAKY_SLOPE", 0.5, float)
        self.ln_scale = _flag("LN_SCALE", False)
        self.late_qat = _env("LATE_QAT", 0.0, float)
        self.gptq = _flag("GPTQ", True)
        self.export_rule = _text("EXPORT_RULE", EXPORT_RULES[0])
        # Training.
        self.data_order = _text("DATA_ORDER", DATA_ORDERS[0])
        self.attention = _text("ATTENTION", ATTENTIONS[0])
        self.train_seq_len = _env("TRAIN_SEQ_LEN", 2048)
        self.eval_seq_len = _env("EVAL_SEQ_LEN", 2048)
        self.train_batch_tokens = _env("TRAIN_BATCH_TOKENS", 786_432)
        self.grad_accum_steps = _env("GRAD_ACCUM_STEPS", max(1, 8 // world_size))
        self.iterations = _env("ITERATIONS", 20000)
        self.max_wallclock_seconds = _env("MAX_WALLCLOCK_SECONDS", 600.0, float)
        self.warmup_steps = _env("WARMUP_STEPS", 20)
        self.warmdown_iters = _env("WARMDOWN_ITERS", 3500)
        self.lr_floor = _env("LR_FLOOR", 0.0, float)
        # Weight averaging.
        self.ema_enabled = _flag("EMA_ENABLED", True)
        # A horizon of 1 / (1 - decay) steps: 0.997's is about 4.5% of the record's steps.
        self.ema_decay = _env("EMA_DECAY", 0.997, float)
        self.swa_enabled = _flag("SWA_ENABLED", False)
        self.swa_every = _env("SWA_EVERY", 50)
        # Optimizers.
        self.matrix_lr = _env("MATRIX_LR", 0.025, float)
        self.scalar_lr = _env("SCALAR_LR", 0.025, float)
        self.coda_lr = _env("CODA_LR", self.scalar_lr, float)
        self.tied_embed_lr = _env("TIED_EMBED_LR", 0.035, float)
        self.tied_embed_init_std = _env("TIED_EMBED_INIT_STD", 0.005, float)
        # 0.09: weights that compress better; the EMA makes up what the decay costs in training.
        self.muon_wd = _env("MUON_WD", 0.09, float)
        self.muon_row_norm = _flag("MUON_ROW_NORM", True)
        self.adam_wd = _env("ADAM_WD", 0.04, float)
        self.grad_clip_norm = _env("GRAD_CLIP_NORM", 0.3, float)
        self.muon_momentum = _env("MUON_MOMENTUM", 0.99, float)
        self.muon_momentum_warmup_start = _env("MUON_MOMENTUM_WARMUP_START", 0.92, float)
        self.muon_momentum_warmup_steps = _env("MUON_MOMENTUM_WARMUP_STEPS", 1500)
        # Evaluation, export.
        self.eval_stride = _env("EVAL_STRIDE", 64)
        self.val_loss_every = _env("VAL_LOSS_EVERY", 0)
        self.train_log_every = _env("TRAIN_LOG_EVERY", 200)
        self.coda_stats = _flag("CODA_STATS", False)
        self.load_artifact = _text("LOAD_ARTIFACT", None)
        self.artifact_path = _text("ARTIFACT_PATH", "final_model.int6.ptz")
        self.artifact_limit_bytes = _env("ARTIFACT_LIMIT_BYTES", 16_000_000)
        # Legal score-first test-time training.
        self.ttt_enabled = _flag("TTT_ENABLED", True)
        self.ttt_chunk_tokens = _env("TTT_CHUNK_TOKENS", 32768)
        self.ttt_epochs = _env("TTT_EPOCHS", 3)
        self.ttt_lr = _env("TTT_LR", 0.02, float)
        self.ttt_momentum = _env("TTT_MOMENTUM", 0.9, float)
        self.ttt_freeze_blocks = _env("TTT_FREEZE_BLOCKS", 0)
        self.ttt_grad_clip = _env("TTT_GRAD_CLIP", 1.0, float)
        self.ttt_max_seconds = _env("TTT_MAX_SECONDS", 540.0, float)
        self.ttt_mode = _text("TTT_MODE", TTT_MODES[0])
        self.ttt_lora_rank = _env("TTT_LORA_RANK", 96)
        self.ttt_lora_lr = _env("TTT_LORA_LR", 3e-4, float)
        self.ttt_lora_chunk = _env("TTT_LORA_CHUNK", 64)
        self.ttt_lora_batch = _env("TTT_LORA_BATCH", 64)
        self.world_size = world_size
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS",
                     "TRAIN_SEQ_LEN", "EVAL_SEQ_LEN", "TRAIN_BATCH_TOKENS", "GRAD_ACCUM_STEPS",
                     "SWA_EVERY"):
            need(getattr(self, name.lower()) >= 1,
                 f"{name}={getattr(self, name.lower())}: expected a positive integer")
        for name in ("ITERATIONS", "WARMUP_STEPS", "WARMDOWN_ITERS", "VAL_LOSS_EVERY",
                     "TRAIN_LOG_EVERY", "BIGRAM_VOCAB_SIZE", "MUON_MOMENTUM_WARMUP_STEPS",
                     "MAX_WALLCLOCK_SECONDS"):
            need(getattr(self, name.lower()) >= 0,
                 f"{name}={getattr(self, name.lower())}: expected >= 0")
        need(int(self.mlp_mult * self.model_dim) >= 1,
             f"MLP_MULT={self.mlp_mult}: expected a hidden width MLP_MULT x MODEL_DIM of at "
             f"least 1")
        need(0 <= self.seed < 2 ** 32, f"SEED={self.seed}: expected 0..{2 ** 32 - 1}")
        need(re.fullmatch(r"[A-Za-z0-9._-]{1,200}", self.run_id) is not None
             and self.run_id not in (".", ".."),
             f"RUN_ID={self.run_id!r}: expected up to 200 letters, digits, '.', '_' or '-' "
             f"(it names files in logs/)")
        need(self.model_dim % self.num_heads == 0,
             f"NUM_HEADS={self.num_heads} must divide MODEL_DIM={self.model_dim}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"NUM_KV_HEADS={self.num_kv_heads} must divide NUM_HEADS={self.num_heads}")
        head_dim = self.model_dim // self.num_heads
        need(head_dim % 2 == 0,
             f"MODEL_DIM/NUM_HEADS={head_dim}: the head size must be even (rotary pairs)")
        need(0 <= self.rope_dims <= head_dim and self.rope_dims % 2 == 0,
             f"ROPE_DIMS={self.rope_dims}: expected an even number in 0..{head_dim} "
             f"(0 = the whole head)")
        for name in ("XSA_LAST_N", "CODA_LAST_N", "VE_LAST_N", "PARALLEL_LAST_N"):
            n = getattr(self, name.lower())
            need(0 <= n <= self.num_layers, f"{name}={n}: expected 0..{self.num_layers}")
        need(self.ve_last_n == 0 or self.ve_dim >= 1, f"VE_DIM={self.ve_dim}: expected >= 1")
        r, lanes = self.recur_layers, self.num_layers - self.parallel_last_n
        shown = layer_list(r)
        consecutive = r == tuple(range(r[0], r[-1] + 1)) if r else True
        need(not r or (consecutive and 0 <= r[0] and r[-1] < self.num_layers),
             f"RECUR_LAYERS={shown}: expected consecutive ascending layers in "
             f"0..{self.num_layers - 1}")
        need(not r or r[-1] < lanes or r[0] >= lanes,  # a block sees the stream it was built for
             f"RECUR_LAYERS={shown}: expected all below or all within the parallel "
             f"lanes (PARALLEL_LAST_N={self.parallel_last_n}: layers {lanes}..)")
        need(0 <= self.recur_start < 1,
             f"RECUR_START={self.recur_start}: expected a number in [0, 1) (a share of training)")
        # One warm-up step compiles one graph; the other would compile inside the clock.
        need(not r or self.warmup_steps != 1,
             f"WARMUP_STEPS=1: with RECUR_LAYERS the warm-up compiles two graphs, one step each; "
             f"expected 0 or at least 2")
        group = self.num_heads // self.num_kv_heads
        need(self.coda_noise_heads >= 1 and group % self.coda_noise_heads == 0,
             f"CODA_NOISE_HEADS={self.coda_noise_heads}: expected a divisor of "
             f"NUM_HEADS/NUM_KV_HEADS={group}")
        need(self.coda_head_norm in CODA_HEAD_NORMS,
             f"CODA_HEAD_NORM={self.coda_head_norm!r}: expected {', '.join(CODA_HEAD_NORMS)}")
        need(self.data_order in DATA_ORDERS,
             f"DATA_ORDER={self.data_order!r}: expected {', '.join(DATA_ORDERS)}")
        need(self.export_rule in EXPORT_RULES,
             f"EXPORT_RULE={self.export_rule!r}: expected {', '.join(EXPORT_RULES)}")
        need(0 < self.coda_lambda_init < 1,
             f"CODA_LAMBDA_INIT={self.coda_lambda_init}: expected a number in (0, 1)")
        need(self.bigram_vocab_size != 1,
             "BIGRAM_VOCAB_SIZE=1: expected 0 (off) or at least 2 buckets")
        need(self.bigram_vocab_size == 0 or self.bigram_dim >= 1,
             f"BIGRAM_DIM={self.bigram_dim}: expected >= 1")
        for name in ("TIED_EMBED_INIT_STD", "LOGIT_SOFTCAP", "QK_GAIN_INIT"):
            need(getattr(self, name.lower()) > 0,
                 f"{name}={getattr(self, name.lower())}: expected > 0")
        need(self.rope_base > 1, f"ROPE_BASE={self.rope_base}: expected > 1")
        for name in ("MATRIX_LR", "SCALAR_LR", "CODA_LR", "TIED_EMBED_LR", "MUON_WD", "ADAM_WD",
                     "GRAD_CLIP_NORM"):
            need(getattr(self, name.lower()) >= 0,
                 f"{name}={getattr(self, name.lower())}: expected >= 0")
        for name in ("MUON_MOMENTUM", "MUON_MOMENTUM_WARMUP_START"):
            need(0 <= getattr(self, name.lower()) < 1,
                 f"{name}={getattr(self, name.lower())}: expected a number in [0, 1)")
        need(0.0 <= self.lr_floor < 1.0,
             f"LR_FLOOR={self.lr_floor}: expected a number in [0, 1) (0 = decay to 0)")
        need(0.0 <= self.late_qat < 1.0,
             f"LATE_QAT={self.late_qat}: expected a number in [0, 1) (0 = off)")
        need(0.0 < self.ema_decay < 1.0,
             f"EMA_DECAY={self.ema_decay}: expected a number in (0, 1)")
        need(0 <= self.eval_stride <= self.eval_seq_len,
             f"EVAL_STRIDE={self.eval_stride}: expected 0..EVAL_SEQ_LEN={self.eval_seq_len}")
        per_step = self.world_size * self.grad_accum_steps * self.train_seq_len
        need(self.train_batch_tokens % per_step == 0,
             f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be divisible by world size x "
             f"GRAD_ACCUM_STEPS x TRAIN_SEQ_LEN = {self.world_size} x {self.grad_accum_steps} x "
             f"{self.train_seq_len} = {per_step}")
        need(self.artifact_limit_bytes >= 1,
             f"ARTIFACT_LIMIT_BYTES={self.artifact_limit_bytes}: expected >= 1")
        need(not self.ttt_enabled or self.ttt_mode != "sgd"
             or self.ttt_chunk_tokens >= self.eval_seq_len,
             f"TTT_CHUNK_TOKENS={self.ttt_chunk_tokens}: below EVAL_SEQ_LEN={self.eval_seq_len}")
        need(self.ttt_epochs >= 1, f"TTT_EPOCHS={self.ttt_epochs}: expected a positive integer")
        need(self.ttt_lr > 0, f"TTT_LR={self.ttt_lr}: expected > 0")
        need(0 <= self.ttt_momentum < 1, f"TTT_MOMENTUM={self.ttt_momentum}: expected [0, 1)")
        need(0 <= self.ttt_freeze_blocks <= self.num_layers,
             f"TTT_FREEZE_BLOCKS={self.ttt_freeze_blocks}: expected 0..{self.num_layers}")
        need(self.ttt_grad_clip >= 0, f"TTT_GRAD_CLIP={self.ttt_grad_clip}: expected >= 0 (0: off)")
        need(self.ttt_max_seconds >= 0,
             f"TTT_MAX_SECONDS={self.ttt_max_seconds}: expected >= 0 (0: no limit)")
        need(self.attention in ATTENTIONS,
             f"ATTENTION={self.attention!r}: expected {', '.join(ATTENTIONS)}")
        need(self.ttt_mode in TTT_MODES,
             f"TTT_MODE={self.ttt_mode!r}: expected {', '.join(TTT_MODES)}")
        for name in ("TTT_LORA_RANK", "TTT_LORA_BATCH"):
            need(getattr(self, name.lower()) >= 1,
                 f"{name}={getattr(self, name.lower())}: expected a positive integer")
        need(self.ttt_lora_lr > 0, f"TTT_LORA_LR={self.ttt_lora_lr}: expected > 0")
        need(self.ttt_lora_chunk >= 1 and (not self.ttt_enabled or self.ttt_mode != "lora"
                                           or self.ttt_lora_chunk <= self.eval_seq_len),
             f"TTT_LORA_CHUNK={self.ttt_lora_chunk}: expected 1..EVAL_SEQ_LEN={self.eval_seq_len}")

    @property
    def micro_batch_tokens(self) -> int:
        """Tokens of one micro-batch on one rank."""
        return self.train_batch_tokens // (self.world_size * self.grad_accum_steps)

    @property
    def shape(self) -> dict:
        """What an artifact must agree on to be loaded into this model."""
        keys = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult",
                "rope_dims", "rope_base", "logit_softcap", "bigram_vocab_size", "bigram_dim",
                "xsa_last_n", "coda_last_n", "mlp_leaky_slope", "ln_scale")
        shape = {k: getattr(self, k) for k in keys}
        if self.ve_last_n:  # absent when off: older artifacts without value embeddings still load
            shape.update(ve_last_n=self.ve_last_n, ve_dim=self.ve_dim)
        if self.parallel_last_n:
            shape.update(parallel_last_n=self.parallel_last_n)
        if self.recur_layers:
            shape.update(recur_layers=list(self.recur_layers))
        if self.coda_last_n and self.coda_noise_heads != self.num_heads // self.num_kv_heads:
            shape.update(coda_noise_heads=self.coda_noise_heads)  # likewise: only off the default
        if self.coda_last_n and self.coda_head_norm != "rms":
            shape.update(coda_head_norm=self.coda_head_norm)
        return shape


# -----------------------------
# MUON OPTIMIZER
# -----------------------------
# Matrices shared out to ranks by cost, batched by shape, then one all-gather.


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 for products on GPUs; fp32 on CPUs, which emulate bf16 slowly."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# Newer torch renamed all_gather_into_tensor.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def newton_schulz(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Orthogonalizes each matrix of G [..., rows, cols] (quintic Newton-Schulz)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(compute_dtype(G.device)).reshape(-1, *G.shape[-2:])
    transposed = X.size(-2) > X.size(-1)
    X = X.mT if transposed else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):  # each sum rides in a product's epilogue
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return (X.mT if transposed else X).reshape(G.shape)


@functools.cache
def share_by_cost(shapes: tuple[tuple[int, int], ...], world: int) -> tuple[tuple, tuple, int]:
    """Muon's plan, greedy by cost: each rank's batches, each result's offset, a rank's share."""
    cost = [2 * min(s) ** 2 * max(s) + min(s) ** 3 for s in shapes]
    load, batches = [0] * world, [{} for _ in range(world)]
    for i in sorted(range(len(shapes)), key=lambda i: (-cost[i], i)):
        r = load.index(min(load))
        batches[r].setdefault(shapes[i], []).append(i)
        load[r] += cost[i]
    order = [[i for batch in mine.values() for i in batch] for mine in batches]
    size = max(sum(math.prod(shapes[i]) for i in mine) for mine in order)
    at = {i: r * size + sum(math.prod(shapes[k]) for k in mine[:j])
          for r, mine in enumerate(order) for j, i in enumerate(mine)}
    offsets = tuple(at[i] for i in range(len(shapes)))
    return tuple(tuple(map(tuple, mine.values())) for mine in batches), offsets, size


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, weight_decay: float = 0.0,
                 nesterov: bool = True, orthogonalize=newton_schulz, row_norm: bool = False):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                            nesterov=nesterov))
        self.orthogonalize, self.row_norm = orthogonalize, row_norm

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params = group["params"]
            batches, offsets, size = share_by_cost(tuple(tuple(p.shape) for p in params), world)
            device = params[0].device
            local = torch.zeros(size, device=device, dtype=compute_dtype(device))
            for batch in batches[rank]:
                mine, at = [params[i] for i in batch], offsets[batch[0]] - rank * size
                g = torch.stack(self._nesterov_momentum(mine, group))
                if self.row_norm:  # MuonEq-R: every row enters Newton-Schulz at the same norm
                    g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-7)
                out = self.orthogonalize(g)
                local[at:at + out.numel()].view_as(out).copy_(out)
            full = local if world == 1 else local.new_empty(world * size)
            if world > 1:
                all_gather_single(full, local)
            updates = [full[at:at + p.numel()].view_as(p).float() for p, at in zip(params, offsets)]
            alphas = [-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5 for p in params]
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, torch._foreach_mul(updates, alphas))

    def _nesterov_momentum(self, params: list[Tensor], group: dict) -> list[Tensor]:
        grads = [p.grad for p in params]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, grads)
        if not group["nesterov"]:
            return bufs
        return torch._foreach_add(grads, bufs, alpha=group["momentum"])


# -----------------------------
# DATA
# -----------------------------

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
DOWNLOAD_HINT = ("download the data with "
                 "`python3 data/cached_challenge_fineweb.py --variant sp1024` "
                 "from the parameter-golf repository")


def shard_num_tokens(path: str) -> int:
    """Checks a shard's header and exact size; returns its token count."""
    if not os.path.isfile(path):  # a FIFO would hang
        what = ("a directory" if os.path.isdir(path) else
                "a dangling link" if os.path.islink(path) else "not a regular file")
        raise ConfigError(f"{path}: {what}, expected a shard file")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC:
        raise ConfigError(f"{path}: not a challenge shard "
                          f"(expected magic {SHARD_MAGIC} in a 1024-byte header)")
    if header[1] != SHARD_VERSION:
        raise ConfigError(f"{path}: shard version {header[1]}, expected {SHARD_VERSION}")
    expected = 4 * HEADER_INTS + 2 * int(header[2])
    if os.path.getsize(path) != expected:
        raise ConfigError(f"{path}: {os.path.getsize(path)} bytes, "
                          f"expected {expected} for {header[2]} tokens")
    return int(header[2])


def check_ids(path: str, tokens: np.ndarray, vocab_size: int) -> None:
    if (top := tokens.max(initial=0)) >= vocab_size:
        raise ConfigError(f"{path}: token id {top} is outside VOCAB_SIZE={vocab_size}")


def load_shard(path: str, vocab_size: int = 0) -> np.ndarray:
    """Memory-mapped: a reader reads only what it touches. With vocab_size, every id checked."""
    n = shard_num_tokens(path)  # mmap refuses an empty shard
    tokens = np.memmap(path, "<u2", "r", 4 * HEADER_INTS, (n,)) if n else np.zeros(0, "<u2")
    if vocab_size:
        check_ids(path, tokens, vocab_size)
    return tokens


def find_shards(data_path: str, split: str, min_tokens: int, why: str = "") -> list[str]:
    """The split's shards, every header checked, holding at least min_tokens (why) in all."""
    if not os.path.isdir(data_path):
        raise ConfigError(f"DATA_PATH={data_path}: not a directory ({DOWNLOAD_HINT})")
    names = fnmatch.filter(os.listdir(data_path), f"fineweb_{split}_*.bin")  # glob misreads "[1]"
    files = [os.path.join(data_path, name) for name in sorted(names)]
    if not files:
        raise ConfigError(
            f"DATA_PATH={data_path} has no fineweb_{split}_*.bin shards: {DOWNLOAD_HINT}")
    total = sum(shard_num_tokens(f) for f in files)
    if total < min_tokens:
        raise ConfigError(f"DATA_PATH={data_path}: the {split} shards hold {total} tokens; "
                          f"{min_tokens} needed{why}")
    return files


def shard_pieces(starts: np.ndarray, pos: int, length: int):
    """(shard, offset, count) of each shard's piece of the looping stream's tokens
    [pos, pos + length), starts being the shards' first positions (and the total last)."""
    total = int(starts[-1])
    while length > 0:
        i = int(np.searchsorted(starts, pos, side="right")) - 1  # skips empty shards
        k = min(length, int(starts[i + 1]) - pos)
        yield i, pos - int(starts[i]), k
        pos, length = (pos + k) % total, length - k


@functools.lru_cache(maxsize=4)  # a batch reads one lap, or two where one ends
def stride_walk(num_blocks: int, seed: int, lap: int) -> tuple[int, int]:
    """A lap's start and stride over the blocks: the stride coprime to their count, so a lap
    visits every block once; each lap its own, drawn from the seed."""
    def mix(x: int) -> int:  # splitmix64: the same order on every numpy and machine
        x = (x + 0x9E3779B97F4A7C15) % 2 ** 64
        x = (x ^ x >> 30) * 0xBF58476D1CE4E5B9 % 2 ** 64
        x = (x ^ x >> 27) * 0x94D049BB133111EB % 2 ** 64
        return x ^ x >> 31

    key = seed << 32 | lap
    start, stride = mix(key) % num_blocks, mix(mix(key)) % max(1, num_blocks - 1) + 1
    while math.gcd(stride, num_blocks) != 1:
        stride = stride % max(1, num_blocks - 1) + 1
    return start, stride


def read_spans(total: int, order: str, seed: int, call: int, rank: int, world_size: int,
               local_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """(start, length) in the looping stream of the shards, of what a rank's call-th micro-batch
    reads: `stream`, one span of the stream for each rank in turn; `strided`, local_tokens //
    seq_len blocks of seq_len + 1 tokens (block b starts at b * seq_len), the global batch taking
    the next blocks of a lap of stride_walk."""
    if order == "stream":
        span = local_tokens + 1
        return [((call * world_size + rank) * span % total, span)]
    n, num_blocks = local_tokens // seq_len, (total - 1) // seq_len
    spans = []
    for entry in range((call * world_size + rank) * n, (call * world_size + rank + 1) * n):
        lap, i = divmod(entry, num_blocks)
        start, stride = stride_walk(num_blocks, seed, lap)
        spans.append(((start + i * stride) % num_blocks * seq_len, seq_len + 1))
    return spans


class DistributedTokenLoader:
    """Each micro-step's global batch is read_spans' reading of the shards (DATA_ORDER); a rank
    reads only its share."""

    def __init__(self, files: list[str], rank: int, world_size: int, device: torch.device,
                 order: str, seed: int):
        self.shards = [load_shard(f) for f in files]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.rank, self.world_size, self.device = rank, world_size, device
        self.order, self.seed, self.calls = order, seed, 0

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        total = int(self.starts[-1])
        spans = read_spans(total, self.order, self.seed, self.calls, self.rank, self.world_size,
                           local_tokens, seq_len)
        self.calls += 1
        size = sum(length for _, length in spans)
        local = torch.empty(size, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        out, done = local.numpy(), 0
        for pos, length in spans:
            for i, offset, k in shard_pieces(self.starts, pos, length):
                out[done:done + k] = self.shards[i][offset:offset + k]
                done += k
        local = local.to(self.device, non_blocking=True)
        if len(spans) == 1:  # one span: its rows follow on from each other
            return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)
        rows = local.view(len(spans), seq_len + 1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def read_before_clock(args: Hyperparameters, files: list[str]) -> list[tuple[str, int, int]]:
    """(file, start, end) of each piece of a shard the warm-up and calibration read, so checked
    before they read it; every shard is checked in full beside the warm-up (check_train_ids)."""
    if not files:  # LOAD_ARTIFACT: no training
        return []
    steps = max(1, args.warmup_steps)  # calibration reads one step, the first of the warm-up's
    starts = np.cumsum([0] + [shard_num_tokens(f) for f in files])
    total, pieces = int(starts[-1]), set()
    for call in range(steps * args.grad_accum_steps):
        for rank in range(args.world_size):
            for pos, length in read_spans(total, args.data_order, args.seed, call, rank,
                                          args.world_size, args.micro_batch_tokens,
                                          args.train_seq_len):
                pieces.update((i, a, a + k) for i, a, k in shard_pieces(starts, pos, length))
    merged = []  # the stream's spans follow on from each other: one piece a shard
    for i, a, b in sorted(pieces):
        if merged and merged[-1][0] == i and a <= merged[-1][2]:
            merged[-1][2] = max(merged[-1][2], b)
        else:
            merged.append([i, a, b])
    return [(files[i], a, b) for i, a, b in merged]


def check_train_ids(args, files: list[str], rank: int, world_size: int, device):
    """Checks this rank's share of the shards in a thread; the function returned waits."""
    mine = list(range(rank, len(files), world_size))

    def bad(i: int) -> bool:  # an unreadable shard is bad too: every rank must reach the reduce
        try:
            return load_shard(files[i]).max(initial=0) >= args.vocab_size
        except Exception:  # any failure: the shard is reported, the thread never dies
            return True

    found = []  # a daemon: an early exit does not wait for the scan
    scan = threading.Thread(target=lambda: found.append(next(filter(bad, mine), len(files))),
                            daemon=True)
    scan.start()

    def wait() -> None:
        scan.join()
        first = torch.tensor(found[0], device=device)
        if world_size > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if first.item() < len(files):
            path = files[first.item()]
            try:
                load_shard(path, args.vocab_size)  # raises, naming shard and id
            except OSError as e:
                raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None

    return wait


def load_validation_tokens(files: list[str], vocab_size: int) -> Tensor:
    tokens = np.concatenate([load_shard(f, vocab_size) for f in files])
    return torch.from_numpy(tokens.astype(np.int64))


# -----------------------------
# BITS-PER-BYTE ACCOUNTING
# -----------------------------
# A token's bytes: its piece without "▁" (byte tokens 1; control, unknown, unused 0: boundaries),
# plus a leading "▁"'s space unless after a boundary (sentencepiece drops a document's).


def build_byte_luts(sp: spm.SentencePieceProcessor,
                    device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    n = sp.vocab_size()
    base_bytes = np.zeros(n, dtype=np.int16)
    leading_space = np.zeros(n, dtype=np.bool_)
    boundary = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base_bytes[i] = 1
        else:
            piece = sp.id_to_piece(i)
            leading_space[i] = piece.startswith("▁")
            base_bytes[i] = len(piece.removeprefix("▁").encode("utf-8"))
    return tuple(torch.from_numpy(a).to(device) for a in (base_bytes, leading_space, boundary))


def token_bytes(prev: Tensor, target: Tensor, luts: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    base_bytes, leading_space, boundary = luts
    space = leading_space[target] & ~boundary[prev]
    return base_bytes[target].to(torch.int32) + space.to(torch.int32)


# -----------------------------
# MODEL
# -----------------------------


def fake_int6(w: Tensor) -> Tensor:
    """w rounded to the export's int6 per-row absmax grid (in value, not in storage)."""
    scale = w.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 31
    return torch.clamp(torch.round(w.detach() / scale), -31, 31) * scale


class CastedLinear(nn.Linear):
    """fp32 weights, products in the activations' dtype; int6-rounded, straight-through, while
    the `qat` buffer (which compiled graphs read) is 1."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("qat", None, persistent=False)
        self.lora: tuple[Tensor, Tensor] | None = None  # per-document TTT: (A, B), one per row

    def enable_qat(self) -> None:
        self.qat = torch.zeros((), device=self.weight.device)

    def forward(self, x: Tensor, out_scale: Tensor | None = None) -> Tensor:
        """out_scale: a gain folded into the weight's rows: its gradient sums over the weight."""
        w = self.weight
        if self.qat is not None:
            w = w + self.qat * (fake_int6(w) - w.detach())
        if out_scale is not None:
            w = w * out_scale.view(-1, 1)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return lora_add(F.linear(x, w.to(x.dtype), bias), x, self.lora)


def lora_add(out: Tensor, x: Tensor, lora: tuple[Tensor, Tensor] | None) -> Tensor:
    """out + x A^T B^T, batch row b by its own pair (A [rows, r, in], B [rows, out, r])."""
    if lora is None:
        return out
    a, b = lora
    return out + (x @ a.to(x.dtype).mT) @ b.to(x.dtype).mT


@torch.library.custom_op("train_gpt::cos_sin", mutates_args=())
def cos_sin(theta: Tensor) -> Tensor:
    """[cos θ, sin θ] as one op Inductor cannot inline into every noise query element."""
    return torch.stack((theta.cos(), theta.sin()))


cos_sin.register_fake(lambda theta: theta.new_empty((2, *theta.shape)))
cos_sin.register_autograd(
    lambda ctx, g: g[1] * ctx.saved_tensors[0][0] - g[0] * ctx.saved_tensors[0][1],
    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(output))


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates the half-split pairs (i, i + n/2) of x's last dim by the angles of cos/sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class Rotary(nn.Module):
    """RoPE on the first rope_dims of each head; the other dims carry no position."""

    def __init__(self, head_dim: int, rope_dims: int, base: float, max_len: int):
        super().__init__()
        self.rope_dims = rope_dims or head_dim
        dims = torch.arange(0, self.rope_dims, 2, dtype=torch.float32)
        inv_freq = base ** (-dims / self.rope_dims)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos()[:, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[:, None, :], persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, H, D]
        T, r = x.size(1), self.rope_dims
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        if r == x.size(-1):
            return rotate_pairs(x, cos, sin)
        return torch.cat((rotate_pairs(x[..., :r], cos, sin), x[..., r:]), dim=-1)


# SDPA's order of preference, fastest first; the first that supports the inputs runs.
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention, q [B, T, H, D] against k, v [B, T, Hkv, D] (GQA)."""
    if q.device.type == FA3_DEVICE:
        out = fa3_attention(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


def choose_attention(args, device: torch.device) -> str:
    """The kernel attention() runs on device: ATTENTION=sdpa turns FlashAttention-3 off for the
    process (a fallback should it misbehave where it imports; every logged run took SDPA)."""
    global FA3_DEVICE
    if args.attention == "sdpa":
        FA3_DEVICE = None
    return "fa3" if device.type == FA3_DEVICE else "sdpa"


def exclusive_reference(y: Tensor, v: Tensor) -> Tensor:
    """XSA in fp32: y - (y.v_hat) v_hat; on CUDA outside CoDA, Triton kernels replace it."""
    y, v_hat = y.float(), F.normalize(v.float(), dim=-1).unsqueeze(-2)
    return y - (y * v_hat).sum(-1, keepdim=True) * v_hat


if triton is not None:
    # The backward in one pass; a program takes XSA_ROWS (token, KV head) rows, all G heads.
    XSA_ROWS = 32

    @triton.jit
    def _xsa_rows(v_ptr, n_rows, D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's rows: offsets in v, mask, unit values v_hat (fp32) and norms |v|."""
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        offs = rows[:, None] * D + tl.arange(0, BLOCK_D)[None, :]
        mask = (rows[:, None] < n_rows) & (tl.arange(0, BLOCK_D)[None, :] < D)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(v * v, axis=1))
        return rows, offs, mask, v / tl.maximum(norm, 1e-12)[:, None], norm

    @triton.jit
    def _xsa_forward(y_ptr, v_ptr, out_ptr, n_rows, G: tl.constexpr, D: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows, offs, mask, v_hat, _ = _xsa_rows(v_ptr, n_rows, D, BLOCK_ROWS, BLOCK_D)
        for h in tl.static_range(G):  # head h of row r sits at (r * G + h) * D
            head = offs + (rows[:, None] * (G - 1) + h) * D
            y = tl.load(y_ptr + head, mask=mask, other=0.0).to(tl.float32)
            out = y - tl.sum(y * v_hat, axis=1)[:, None] * v_hat
            tl.store(out_ptr + head, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _xsa_backward(g_ptr, y_ptr, v_ptr, gy_ptr, gv_ptr, n_rows, G: tl.constexpr, D: tl.constexpr,
                      BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows, offs, mask, v_hat, norm = _xsa_rows(v_ptr, n_rows, D, BLOCK_ROWS, BLOCK_D)
        g_v_hat = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
        for h in tl.static_range(G):
            head = offs + (rows[:, None] * (G - 1) + h) * D
            g = tl.load(g_ptr + head, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + head, mask=mask, other=0.0).to(tl.float32)
            g_dot, y_dot = tl.sum(g * v_hat, axis=1)[:, None], tl.sum(y * v_hat, axis=1)[:, None]
            tl.store(gy_ptr + head, (g - g_dot * v_hat).to(gy_ptr.dtype.element_ty), mask=mask)
            g_v_hat -= g_dot * y + y_dot * g
        # through v_hat = v / max(|v|, eps): the tangential part over |v|, or all over eps below it
        radial = tl.where(norm >= 1e-12, tl.sum(g_v_hat * v_hat, axis=1), 0.0)[:, None]
        g_v = (g_v_hat - radial * v_hat) / tl.maximum(norm, 1e-12)[:, None]
        tl.store(gv_ptr + offs, g_v.to(gv_ptr.dtype.element_ty), mask=mask)

    def _xsa_launch(kernel, v: Tensor, *tensors: Tensor) -> None:
        rows, D = v.numel() // v.size(-1), v.size(-1)
        G = tensors[0].numel() // (rows * D)
        grid = (triton.cdiv(rows, XSA_ROWS),)
        wrap_triton(kernel)[grid](*tensors, rows, G, D, XSA_ROWS, triton.next_power_of_2(D))

    @triton_op("train_gpt::xsa", mutates_args=())
    def xsa_kernel(y: Tensor, v: Tensor) -> Tensor:
        """exclusive_reference(y, v) in y's dtype (contiguous y and v)."""
        out = torch.empty_like(y)
        _xsa_launch(_xsa_forward, v, y, v, out)
        return out

    @triton_op("train_gpt::xsa_backward", mutates_args=())
    def xsa_backward_kernel(grad: Tensor, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        grad_y, grad_v = torch.empty_like(y), torch.empty_like(v)
        _xsa_launch(_xsa_backward, v, grad, y, v, grad_y, grad_v)
        return grad_y, grad_v

    xsa_kernel.register_autograd(
        lambda ctx, grad: xsa_backward_kernel(grad.contiguous(), *ctx.saved_tensors),
        setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """exclusive_reference(y, v), by the Triton kernels on CUDA."""
    if triton is not None and y.is_cuda:
        return xsa_kernel(y.contiguous(), v.contiguous())
    return exclusive_reference(y, v)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rotary: Rotary,
                 qk_gain_init: float, xsa: bool, coda: bool, value_embed: bool = False,
                 coda_noise_heads: int = 0, coda_head_norm: str = "rms",
                 coda_lambda_init: float = CODA_LAMBDA_INIT):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, num_kv_heads * self.head_dim, bias=False)
        self.c_v = CastedLinear(dim, num_kv_heads * self.head_dim, bias=False)
        self.proj = CastedLinear(dim, dim, bias=False)
        self.proj.zero_init = True
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))
        self.rotary = rotary
        self.xsa, self.coda = xsa, coda
        # The gain on the shared value embedding (None: this layer takes none).
        self.ve_scale = nn.Parameter(torch.ones(())) if value_embed else None
        if coda:
            # Noise queries per KV group (0: one per head): q turned by a learned angle per RoPE
            # plane (commutes with RoPE), uncorrelated at pi/2; the gate starts at lambda_init.
            self.coda_noise_heads = coda_noise_heads or num_heads // num_kv_heads
            self.coda_theta = nn.Parameter(torch.full(
                (num_kv_heads * self.coda_noise_heads, self.head_dim // 2), math.pi / 2))
            self.coda_gate = CastedLinear(dim, num_heads, bias=True)
            self.coda_gate.zero_init = True
            p = coda_lambda_init
            nn.init.constant_(self.coda_gate.bias, math.log(p / (1 - p)))  # -6.0 by default
            self.coda_head_norm = coda_head_norm
            self.coda_norm = (nn.Parameter(torch.ones(self.head_dim))
                              if coda_head_norm == "learned" else None)
            self.stats = None  # a dict while coda_stats captures the uncompiled model

    def noise_queries(self, q: Tensor) -> Tensor:
        """q [B, T, H, D] -> [B, T, Hkv * n, D]: each noise head's query turned by its angles."""
        B, T, H, D = q.shape
        if self.coda_theta.size(0) < H:  # the mean of the queries it serves: RoPE commutes too
            q = q.view(B, T, self.coda_theta.size(0), -1, D).mean(3)
        r = self.rotary.rope_dims // 2
        cos, sin = cos_sin(self.coda_theta).to(q.dtype)
        if r == cos.size(-1):
            return rotate_pairs(q, cos, sin)
        rope = self.rotary.rope_dims
        return torch.cat((rotate_pairs(q[..., :rope], cos[:, :r], sin[:, :r]),
                          rotate_pairs(q[..., rope:], cos[:, r:], sin[:, r:])), dim=-1)

    def forward(self, x: Tensor, ve: Tensor | None = None,
                out_scale: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        G = H // Hkv
        q = F.rms_norm(self.c_q(x).view(B, T, H, D), (D,))
        k = F.rms_norm(self.c_k(x).view(B, T, Hkv, D), (D,))
        v = self.c_v(x).view(B, T, Hkv, D)
        if self.ve_scale is not None:  # before XSA, which then removes it along with v
            v = v + self.ve_scale.to(x.dtype) * ve.view(B, T, Hkv, D)
        q = self.rotary(q) * self.q_gain.to(x.dtype)[:, None]
        k = self.rotary(k)
        if self.coda:  # one attention call: noise queries on each KV head's group axis
            n = self.coda_noise_heads
            noise_q = self.noise_queries(q).view(B, T, Hkv, n, D)
            q = torch.cat((q.view(B, T, Hkv, G, D), noise_q), dim=3).view(B, T, Hkv * (G + n), D)
        y = attention(q, k, v).view(B, T, Hkv, -1, D)
        # fp32: CoDA's RMSNorm would scale a bf16 XSA remainder back up. XSA is linear and both
        # streams share V: it runs once, after the combination.
        if self.coda:  # signal head j of a group takes noise head j // (G / n)
            signal, noise = y.float().split((G, n), dim=3)
            lam = torch.sigmoid(self.coda_gate(x).float()).view(B, T, Hkv, n, G // n, 1)
            y = (signal.view(B, T, Hkv, n, G // n, D) - lam * noise.unsqueeze(4)).flatten(3, 4)
            y = exclusive_reference(y, v) if self.xsa else y
            if self.stats is not None:  # coda_stats' capture: never set in compiled graphs
                signal = exclusive_reference(signal, v) if self.xsa else signal
                self.stats.update(lam=lam, pre_norm=y, signal=signal)
            if self.coda_head_norm != "none":
                y = F.rms_norm(y, (D,), self.coda_norm)
        elif self.xsa:  # on the [B, T, Hkv, G, D] view: no copies of V
            y = exclusive_self_attention(y, v)
        return self.proj(y.to(x.dtype).reshape(B, T, C), out_scale)


class MLP(nn.Module):
    """leaky_relu(x, slope)² (slope 0: relu²)."""

    def __init__(self, dim: int, mlp_mult: float, leaky_slope: float = 0.0):
        super().__init__()
        hidden = int(mlp_mult * dim)
        self.fc = CastedLinear(dim, hidden, bias=False)
        self.proj = CastedLinear(hidden, dim, bias=False)
        self.proj.zero_init = True
        self.leaky_slope = leaky_slope

    def forward(self, x: Tensor, out_scale: Tensor | None = None) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), self.leaky_slope).square(), out_scale)


class Block(nn.Module):
    def __init__(self, dim: int, mlp_mult: float, attn: CausalSelfAttention,
                 leaky_slope: float = 0.0, norm_scale: float = 1.0, parallel: bool = False):
        super().__init__()
        self.attn = attn
        self.mlp = MLP(dim, mlp_mult, leaky_slope)
        self.norm_scale = norm_scale  # on the normalized inputs of attention and MLP
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        if parallel:  # per sublayer and channel: the lanes' residual gain, its writes into both
            # Per channel, not scalar: a scalar's gradient is a reduction over the whole stream.
            self.lane_resid = nn.Parameter(torch.full((2, dim), 1.1 ** 0.5))
            self.lane_write = nn.Parameter(torch.ones(2, 2, dim))
        self.parallel = parallel

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None = None) -> Tensor:
        """x: [B, T, C], or [2, B, T, C] (attention's lane, MLP's lane) in a parallel block."""
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        if not self.parallel:  # the gains ride in the output products
            x = x + self.attn(F.rms_norm(x, (x.size(-1),)) * self.norm_scale, ve, self.attn_scale)
            return x + self.mlp(F.rms_norm(x, (x.size(-1),)) * self.norm_scale, self.mlp_scale)
        resid = self.lane_resid.to(x.dtype)[:, None, None]
        write = self.lane_write.to(x.dtype)[:, :, None, None]
        x = x.expand(2, *x.shape[-3:])  # one lane before the first parallel block
        a = self.attn(F.rms_norm(x[0], (x.size(-1),)) * self.norm_scale, ve, self.attn_scale)
        x = resid[0] * x + write[0] * a
        m = self.mlp(F.rms_norm(x[1], (x.size(-1),)) * self.norm_scale, self.mlp_scale)
        return resid[1] * x + write[1] * m


class SmearGate(nn.Module):
    """Blends each position with the previous one by a learned per-channel gate."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        return torch.lerp(x, F.pad(x[:, :-1], (0, 0, 1, 0)), g)


class BigramHash(nn.Module):
    """Embeds a hash of (previous token, token); the last bucket stands for 'no previous'."""

    def __init__(self, buckets: int, bigram_dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, bigram_dim)
        nn.init.zeros_(self.embed.weight)
        self.proj = CastedLinear(bigram_dim, model_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        t = ids.to(torch.int32)
        h = torch.bitwise_xor(36313 * t[:, 1:], 27191 * t[:, :-1]) % (self.buckets - 1)
        h = F.pad(h, (1, 0), value=self.buckets - 1)
        return self.proj(self.embed(h).to(dtype), self.scale)


class ValueEmbedding(nn.Module):
    """A second token embedding, added to the values of the deepest VE_LAST_N layers."""

    def __init__(self, vocab_size: int, ve_dim: int, kv_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, ve_dim)
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj = CastedLinear(ve_dim, kv_dim, bias=False)
        self.proj.zero_init = True

    def forward(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        return self.proj(self.embed(ids).to(dtype))


class GPT(nn.Module):
    def __init__(self, *, vocab_size: int, num_layers: int, model_dim: int, num_heads: int,
                 num_kv_heads: int, mlp_mult: float, max_seq_len: int, rope_dims: int = 0,
                 rope_base: float = 10000.0, bigram_vocab_size: int = 0, bigram_dim: int = 128,
                 xsa_last_n: int = 0, coda_last_n: int = 0, logit_softcap: float = 30.0,
                 qk_gain_init: float = 1.5, tied_embed_init_std: float = 0.005,
                 act_dtype: torch.dtype = torch.bfloat16, mlp_leaky_slope: float = 0.5,
                 ln_scale: bool = False, qat: bool = False, ve_last_n: int = 0, ve_dim: int = 128,
                 coda_noise_heads: int = 0, coda_head_norm: str = "rms",
                 coda_lambda_init: float = CODA_LAMBDA_INIT, parallel_last_n: int = 0,
                 recur_layers: tuple[int, ...] = ()):
        super().__init__()
        self.logit_softcap, self.act_dtype = logit_softcap, act_dtype
        self.head_lora: tuple[Tensor, Tensor] | None = None  # per-document TTT, as CastedLinear's
        self.tok_emb = nn.Embedding(vocab_size, model_dim)
        self.bigram = (BigramHash(bigram_vocab_size, bigram_dim, model_dim)
                       if bigram_vocab_size else None)
        self.smear = SmearGate(model_dim)
        head_dim = model_dim // num_heads
        self.value_embed = (ValueEmbedding(vocab_size, ve_dim, num_kv_heads * head_dim)
                            if ve_last_n else None)
        rotary = Rotary(head_dim, rope_dims, rope_base, max_seq_len)
        # Each layer's XSA, CoDA, value embedding and lanes, decided here alone: the deepest N.
        self.blocks = nn.ModuleList(
            Block(model_dim, mlp_mult, CausalSelfAttention(
                model_dim, num_heads, num_kv_heads, rotary, qk_gain_init,
                xsa=i >= num_layers - xsa_last_n, coda=i >= num_layers - coda_last_n,
                value_embed=i >= num_layers - ve_last_n, coda_noise_heads=coda_noise_heads,
                coda_head_norm=coda_head_norm, coda_lambda_init=coda_lambda_init),
                mlp_leaky_slope, 1 / math.sqrt(i + 1) if ln_scale else 1.0,
                parallel=i >= num_layers - parallel_last_n)
            for i in range(num_layers))
        # U-Net: the first half's outputs feed the second, reversed.
        self.num_skips = num_layers // 2
        # None with one layer: DDP fails on a parameter that never gets a gradient.
        self.skip_weights = (nn.Parameter(torch.ones(self.num_skips, model_dim))
                             if self.num_skips else None)
        # Depth recurrence: the blocks of recur_layers run again right after their first pass; the
        # skips count passes, not blocks. Training turns it on at RECUR_START.
        r = tuple(recur_layers)
        self.recur_order = (list(range(r[-1] + 1)) + list(r) + list(range(r[-1] + 1, num_layers))
                            if r else list(range(num_layers)))
        self.recurring = bool(r)
        self._init_weights(tied_embed_init_std)
        if qat:
            for name, module in self.named_modules():
                if (isinstance(module, CastedLinear)
                        and is_qat_matrix(f"{name}.weight", module.weight)):
                    module.enable_qat()

    def set_qat(self, on: bool) -> None:
        for module in self.modules():
            if isinstance(module, CastedLinear) and module.qat is not None:
                module.qat.fill_(float(on))

    def _init_weights(self, tied_embed_init_std: float) -> None:
        nn.init.normal_(self.tok_emb.weight, std=tied_embed_init_std)
        for module in self.modules():
            if isinstance(module, CastedLinear):
                if getattr(module, "zero_init", False):
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.orthogonal_(module.weight)

    def hidden(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids).to(self.act_dtype)
        if self.bigram is not None:
            x = x + self.bigram(ids, self.act_dtype)
        x = self.smear(F.rms_norm(x, (x.size(-1),)))
        ve = self.value_embed(ids, self.act_dtype) if self.value_embed is not None else None
        order = self.recur_order if self.recurring else range(len(self.blocks))
        x0, skips, n = x, [], len(order)
        for v, i in enumerate(order):
            if v >= n - self.num_skips:
                x = x + self.skip_weights[n - 1 - v].to(x.dtype) * skips.pop()
            x = self.blocks[i](x, x0, ve)
            if v < self.num_skips:
                skips.append(x)
        x = x.mean(0) if x.dim() == 4 else x  # parallel lanes end averaged
        return F.rms_norm(x, (x.size(-1),))

    def token_nll(self, ids: Tensor, targets: Tensor) -> Tensor:
        """Per-token negative log-likelihood (fp32), [B, T]."""
        return self.logits_nll(self.logits(self.hidden(ids)), targets)

    def logits(self, h: Tensor) -> Tensor:
        """The tied head's logits (fp32), before the softcap."""
        return lora_add(F.linear(h, self.tok_emb.weight.to(self.act_dtype)), h,
                        self.head_lora).float()

    def logits_nll(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return nll.view_as(targets)

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        return self.token_nll(ids, targets).mean()


def build_model(args: Hyperparameters, device: torch.device) -> GPT:
    """The model of args.shape (what its artifact records), every argument by keyword."""
    return GPT(**args.shape, max_seq_len=max(args.train_seq_len, args.eval_seq_len),
               qk_gain_init=args.qk_gain_init, tied_embed_init_std=args.tied_embed_init_std,
               coda_lambda_init=args.coda_lambda_init, act_dtype=compute_dtype(device),
               qat=args.late_qat > 0).to(device)


@torch.no_grad()
def coda_stats(model: GPT, ids: Tensor) -> list[tuple[int, dict[str, float]]]:
    """Per CoDA layer on ids: lambda's mean and max, |theta - pi/2|'s, and the RMS of the head
    norm's input and of its signal part (each stream as the norm sees it: after XSA if on)."""
    layers = [(i, b.attn) for i, b in enumerate(model.blocks) if b.attn.coda]
    if not layers:  # no forward to spend
        return []
    for _, attn in layers:
        attn.stats = {}
    model.hidden(ids)
    result, rms = [], lambda t: t.square().mean().sqrt().item()
    for i, attn in layers:
        s, dev, attn.stats = attn.stats, (attn.coda_theta - math.pi / 2).abs(), None
        result.append((i, dict(lambda_mean=s["lam"].mean().item(), lambda_max=s["lam"].max().item(),
                               theta_dev_mean=dev.mean().item(), theta_dev_max=dev.max().item(),
                               pre_norm_rms=rms(s["pre_norm"]), signal_rms=rms(s["signal"]))))
    return result


# -----------------------------
# EVALUATION
# -----------------------------


def plan_windows(num_targets: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) of each window, scoring every target exactly once."""
    if num_targets <= seq_len:
        return [(0, 0)]
    windows, end = [(0, 0)], seq_len
    while end + stride <= num_targets:
        end += stride
        windows.append((end - seq_len, seq_len - stride))
    if end < num_targets:
        windows.append((num_targets - seq_len, seq_len - (num_targets - end)))
    return windows


class Evaluator:
    """Scores the validation stream (targets = tokens[1:]), windows split across ranks."""

    def __init__(self, tokens: Tensor, seq_len: int, stride: int, luts, device: torch.device,
                 rank: int, world_size: int, batch_tokens: int = 131072):
        self.tokens = tokens.to(device)
        self.num_targets = tokens.numel() - 1
        self.seq_len = min(seq_len, self.num_targets)
        windows = plan_windows(self.num_targets, self.seq_len, stride)
        lo, hi = len(windows) * rank // world_size, len(windows) * (rank + 1) // world_size
        self.windows = torch.tensor(windows[lo:hi], dtype=torch.int64, device=device).view(-1, 2)
        self.max_batch = max(1, batch_tokens // self.seq_len)
        self.batch = min(self.max_batch, -(-len(windows) // world_size))
        self.luts, self.device, self.rank, self.world_size = luts, device, rank, world_size
        self.offsets = torch.arange(self.seq_len + 1, device=device)

    def __call__(self, nll_fn) -> tuple[float, float, int, int]:
        sums = self.score(self.windows, nll_fn, self.batch)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        return self.result(sums)

    @torch.no_grad()
    def score(self, windows: Tensor, nll_fn, batch: int) -> Tensor:
        """float64 sums (nll, targets, bytes) of these windows, `batch` at a time."""
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch]
            if len(w) < batch:  # pad with windows that score nothing: one compiled shape
                pad = torch.tensor([[0, self.seq_len]], device=w.device).expand(batch - len(w), 2)
                w = torch.cat((w, pad))
            chunk = self.tokens[w[:, :1] + self.offsets]
            x, y = chunk[:, :-1], chunk[:, 1:]
            scored = self.offsets[None, :-1] >= w[:, 1:]
            self.add(sums, nll_fn(x, y), scored, x, y)
        return sums

    def add(self, sums: Tensor, nll: Tensor, scored: Tensor, x: Tensor, y: Tensor) -> None:
        """Adds the scored targets' nll, count and bytes to the float64 sums."""
        sums[0] += torch.where(scored, nll.double(), 0.0).sum()
        sums[1] += scored.sum()
        sums[2] += torch.where(scored, token_bytes(x, y, self.luts), 0).sum()

    def result(self, sums: Tensor) -> tuple[float, float, int, int]:
        """(loss, bpb, targets, bytes) of the sums over all ranks."""
        nll_sum, n_tokens, n_bytes = sums.tolist()
        if int(n_tokens) != self.num_targets:
            raise RuntimeError(
                f"evaluation scored {int(n_tokens)} targets, expected {self.num_targets}")
        loss = nll_sum / n_tokens
        return loss, loss / math.log(2.0) * n_tokens / n_bytes, int(n_tokens), int(n_bytes)


def test_time_train(ev: Evaluator, stride: int, model: GPT, nll_fn, args, log,
                    spent: float = 0.0) -> tuple:
    """Legal score-first TTT: each chunk is scored, then trained on. The result, chunk sums.
    spent: seconds of the evaluation before TTT, which count against TTT_MAX_SECONDS."""
    rank, world, L, t0, score_s = ev.rank, ev.world_size, ev.seq_len, time.perf_counter(), 0.0
    sync = torch.cuda.synchronize if ev.device.type == "cuda" else (lambda: None)
    plan = torch.tensor(plan_windows(ev.num_targets, L, stride), dtype=torch.int64).view(-1, 2)
    # A chunk holds the windows whose first scored target falls in it.
    counts = plan.sum(1).div(args.ttt_chunk_tokens, rounding_mode="floor").unique_consecutive(
        return_counts=True)[1].tolist()
    chunks = plan.split(counts)
    bounds = [int(w[0].sum()) for w in chunks] + [ev.num_targets]
    n_seqs = [(bounds[c + 1] - bounds[c]) // L for c in range(len(chunks))]
    micro = max(1, min(-(-max(n_seqs) // world), args.micro_batch_tokens // L))
    frozen = {id(p) for block in model.blocks[:args.ttt_freeze_blocks] for p in block.parameters()}
    params = [p.requires_grad_(id(p) not in frozen) for p in model.parameters()]
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(params, lr=args.ttt_lr, momentum=args.ttt_momentum)
    sums = torch.zeros(len(chunks), 3, dtype=torch.float64, device=ev.device)
    stopped, first = False, None  # TTT_MAX_SECONDS: from then on chunks are scored, not trained on
    for c, (windows, n) in enumerate(zip(chunks, n_seqs)):
        sync()
        t1 = time.perf_counter()
        mine = windows[len(windows) * rank // world:len(windows) * (rank + 1) // world]
        sums[c] = ev.score(mine.to(ev.device), nll_fn, min(ev.max_batch, -(-max(counts) // world)))
        sync()
        score_s += time.perf_counter() - t1
        if c == len(chunks) - 1 or n == 0 or stopped:  # nothing is scored after the last chunk
            continue
        if args.ttt_max_seconds > 0:  # train on while the rest can be scored in time, at this rate
            elapsed, rest = spent + time.perf_counter() - t0, 0.0
            if first is None and c > 0:  # the rates leave chunk 0 out: it carries the compiling
                first = (c, elapsed, score_s)
            elif first is not None:  # since then: k chunks trained, k scored
                k, scored_s = c - first[0], score_s - first[2]
                rest = (elapsed - first[1] - scored_s) / k + scored_s / k * (len(chunks) - c - 1)
            late = torch.tensor([elapsed + rest], dtype=torch.float64, device=ev.device)
            if world > 1:  # the slowest rank's view: every rank stops at the same chunk
                dist.all_reduce(late, op=dist.ReduceOp.MAX)
            if stopped := late.item() >= args.ttt_max_seconds:
                log(f"ttt_eval: training stopped at chunk {c + 1}/{len(chunks)} ({c} trained) at "
                    f"{elapsed:.1f}s (TTT_MAX_SECONDS={args.ttt_max_seconds:g}); "
                    f"the rest is scored without updates")
                continue
        for group in opt.param_groups:  # cosine decay over the chunks
            group["lr"] = args.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / max(len(chunks) - 1, 1)))
        mine = bounds[c] + L * torch.arange(n * rank // world, n * (rank + 1) // world)
        padded = max(1, -(-len(mine) // micro)) * micro  # zero-weight rows: one compiled shape
        weight = ((torch.arange(padded) < len(mine))[:, None] / (n * L)).to(ev.device)
        starts = torch.cat((mine, mine.new_full((padded - len(mine),), bounds[c]))).to(ev.device)
        for _ in range(args.ttt_epochs):
            for i in range(0, padded, micro):
                rows = ev.tokens[starts[i:i + micro, None] + ev.offsets]
                (nll_fn(rows[:, :-1], rows[:, 1:]) * weight[i:i + micro]).sum().backward()
            if world > 1:  # the mean gradient everywhere: the same weights on every rank
                flat = torch.cat([p.grad.flatten() for p in params])
                dist.all_reduce(flat)
                for p, g in zip(params, flat.split([p.numel() for p in params])):
                    p.grad.copy_(g.view_as(p))
            if args.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.ttt_grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=False)
        if (c + 1) % max(1, len(chunks) // 10) == 0:
            log(f"ttt_chunk:{c + 1}/{len(chunks)} time:{time.perf_counter() - t0:.1f}s")
    for p in model.parameters():
        p.requires_grad_(True).grad = None
    if world > 1:
        dist.all_reduce(sums)
    result, total_s = ev.result(sums.sum(0)), time.perf_counter() - t0
    log(f"ttt_eval chunks:{len(chunks)} tokens:{result[2]} time:{total_s:.1f}s "
        f"score:{score_s:.1f}s train:{total_s - score_s:.1f}s")
    return result, sums


def document_starts(tokens: Tensor, bos: int, num_targets: int) -> list[int]:
    """The first target of each document: 0 and each BOS before the last target (a document's
    targets run from its BOS, which predicts its first token, to the one that predicts the next
    BOS)."""
    at = torch.nonzero(tokens[1:num_targets] == bos).flatten() + 1 if bos >= 0 else tokens[:0]
    return [0] + at.tolist()


def document_pieces(tokens: Tensor, bos: int, num_targets: int, chunk: int) -> list[int]:
    """The first target of each piece TTT adapts alone: each document's start, then every
    LORA_PIECE_TARGETS (in whole chunks) within a longer one."""
    starts = document_starts(tokens, bos, num_targets)
    piece = max(chunk, LORA_PIECE_TARGETS - LORA_PIECE_TARGETS % chunk)
    return [p for s, e in zip(starts, starts[1:] + [num_targets]) for p in range(s, e, piece)]


class DocAdapters:
    """LoRA pairs on each block's attention projections and MLP input and on the head: one pair
    per batch row, so each row's document adapts alone; Adam (beta1 = 0) with a step count per
    row. B starts at zero: a fresh row scores as the artifact does."""

    BETA2, EPS = 0.999, 1e-10

    def __init__(self, model: GPT, rows: int, rank: int, device: torch.device):
        hosts = [(m, "lora", m.in_features, m.out_features) for block in model.blocks
                 for m in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.attn.proj,
                           block.mlp.fc)]
        dim, vocab = model.tok_emb.embedding_dim, model.tok_emb.num_embeddings
        self.hosts = hosts + [(model, "head_lora", dim, vocab)]
        gen = torch.Generator().manual_seed(0)  # one start for every document, on any rank
        self.a0 = [(torch.rand(rank, n_in, generator=gen) * 2 - 1).div_(n_in ** 0.5).to(device)
                   for _, _, n_in, _ in self.hosts]
        self.pairs = [(a0.expand(rows, -1, -1).clone().requires_grad_(),
                       torch.zeros(rows, n_out, rank, device=device, requires_grad=True))
                      for a0, (_, _, _, n_out) in zip(self.a0, self.hosts)]
        self.params = [p for pair in self.pairs for p in pair]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(rows, device=device)

    def install(self, on: bool) -> None:
        for (host, attr, _, _), pair in zip(self.hosts, self.pairs):
            setattr(host, attr, pair if on else None)

    @torch.no_grad()
    def reset(self, rows: list[int]) -> None:
        if rows:
            idx = torch.tensor(rows, device=self.steps.device)
            for (a, b), a0 in zip(self.pairs, self.a0):
                a[idx], b[idx] = a0, 0.0
            for v in self.v:
                v[idx] = 0.0
            self.steps[idx] = 0.0

    @torch.no_grad()
    def step(self, train: Tensor, lr: float) -> None:
        """One Adam step on the rows where train is 1; the others keep weights and state."""
        self.steps += train
        correction = 1 - self.BETA2 ** self.steps.clamp_min(1)
        for p, v in zip(self.params, self.v):
            on = train.view(-1, *[1] * (p.dim() - 1)).bool()
            v.copy_(torch.where(on, self.BETA2 * v + (1 - self.BETA2) * p.grad.square(), v))
            c = correction.view_as(on)
            p.copy_(torch.where(on, p - lr * p.grad / ((v / c).sqrt() + self.EPS), p))
            p.grad = None


# A step that scores without training costs about a third of one that trains (no backward); a
# half leaves a margin in TTT_MAX_SECONDS' projection.
LORA_SCORE_SHARE = 0.5
# A document is adapted in pieces of at most this many targets, each from a fresh start: a long
# document (a stream without BOS is one) then holds a row for this / TTT_LORA_CHUNK steps at most.
LORA_PIECE_TARGETS = 65536


def doc_test_time_train(ev: Evaluator, model: GPT, nll_fn, args, log, bos: int,
                        spent: float = 0.0) -> tuple:
    """Legal score-first TTT per document (a long one in pieces): its chunks of TTT_LORA_CHUNK
    targets in order, each scored by the window of EVAL_SEQ_LEN tokens ending with it, then one
    step of the document's own adapters on it; a row takes the next document when its own ends.
    spent: as in test_time_train. Returns the result and each target's nll (this rank's
    documents; 0 elsewhere)."""
    rank, world, L, t0 = ev.rank, ev.world_size, ev.seq_len, time.perf_counter()
    C, rows, N, dev = min(args.ttt_lora_chunk, L), args.ttt_lora_batch, ev.num_targets, ev.device
    starts = document_pieces(ev.tokens, bos, N, C)
    ends = starts[1:] + [N]
    # Longest first: rows then run out together at the end, and ranks get even shares.
    order = sorted(range(len(starts)), key=lambda d: (starts[d] - ends[d], d))[rank::world]
    queue = collections.deque(order)
    chunks = [-(-(e - s) // C) for s, e in zip(starts, ends)]
    left = sum(chunks[d] for d in order)  # the projection's count of this rank's steps to come
    doc, pos = [-1] * rows, [0] * rows
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = DocAdapters(model, rows, args.ttt_lora_rank, dev)
    adapters.install(True)
    sums = torch.zeros(3, dtype=torch.float64, device=dev)
    nll_at = torch.zeros(N, device=dev)
    steps, first, stopped, started, report = 0, None, False, 0, max(1, len(order) // 10)
    while True:
        fresh = [b for b in range(rows) if doc[b] < 0][:len(queue)]
        for b in fresh:
            doc[b] = queue.popleft()
            pos[b] = starts[doc[b]]
        if not any(d >= 0 for d in doc):
            break
        adapters.reset(fresh)
        if started // report != (started + len(fresh)) // report:
            log(f"ttt_docs:{started + len(fresh)}/{len(order)} "
                f"time:{time.perf_counter() - t0:.1f}s")
        started += len(fresh)
        if args.ttt_max_seconds > 0 and not stopped:  # train on while the rest fits, at this rate
            elapsed, rest = spent + time.perf_counter() - t0, 0.0
            if first is None and steps > 0:  # the rate leaves step 0 out: it holds the compiling
                first = (steps, elapsed)
            elif first is not None:  # one more step trained, the rest scored (no backward)
                step_s = (elapsed - first[1]) / (steps - first[0])
                tail = max(-(-(ends[d] - pos[b]) // C) for b, d in enumerate(doc) if d >= 0)
                more = max(-(-left // rows), tail)  # the even share, or the longest piece's rest
                rest = step_s + step_s * LORA_SCORE_SHARE * max(0, more - 1)
            if stopped := elapsed + rest >= args.ttt_max_seconds:
                log(f"ttt_eval: training stopped at step {steps + 1} ({started} of {len(order)} "
                    f"documents started) at {elapsed:.1f}s (TTT_MAX_SECONDS="
                    f"{args.ttt_max_seconds:g}); the rest is scored without updates")
        active = [d >= 0 for d in doc]
        lo = [pos[b] if active[b] else 0 for b in range(rows)]
        hi = [min(pos[b] + C, ends[doc[b]]) if active[b] else 0 for b in range(rows)]
        train = [active[b] and hi[b] < ends[doc[b]] and not stopped for b in range(rows)]
        w = torch.tensor([max(0, h - L) for h in hi])
        lo_t, hi_t = (torch.tensor(v).sub(w).to(dev)[:, None] for v in (lo, hi))
        w = w.to(dev)[:, None]
        window = ev.tokens[w + ev.offsets]
        x, y = window[:, :-1], window[:, 1:]
        scored = (ev.offsets[None, :-1] >= lo_t) & (ev.offsets[None, :-1] < hi_t)
        nll = nll_fn(x, y)  # with gradients even when no row trains: no_grad compiles a new graph
        with torch.no_grad():
            mine = torch.where(scored, nll.detach(), 0.0)
            nll_at.scatter_add_(0, (w + ev.offsets[None, :-1]).flatten(), mine.flatten())
            ev.add(sums, mine, scored, x, y)
        if any(train):
            t = torch.tensor(train, dtype=torch.float32, device=dev)
            chunk_loss = torch.where(scored, nll, 0.0).sum(1) / (hi_t - lo_t).clamp_min(1)[:, 0]
            (chunk_loss * t).sum().backward()
            adapters.step(t, args.ttt_lora_lr)
        del nll
        steps += 1
        for b in range(rows):
            if active[b]:
                pos[b], left = hi[b], left - 1
                if hi[b] == ends[doc[b]]:
                    doc[b] = -1
    adapters.install(False)
    for p in model.parameters():
        p.requires_grad_(True)
    if world > 1:
        dist.all_reduce(sums)
    result, total_s = ev.result(sums), time.perf_counter() - t0
    log(f"ttt_eval chunks:{sum(chunks)} "
        f"tokens:{result[2]} time:{total_s:.1f}s docs:{len(starts)} steps:{steps}")
    return result, nll_at


# -----------------------------
# EXPORT: INT6 / INT8 + ZSTD
# -----------------------------
# One code per byte: zstd takes the unused bits back.

# Formats: 1, each tensor a zstd frame; 2, rows in scale_order; 3, int5/int6 codes by rANS.
ARTIFACT_FORMAT = 3
ARTIFACT_MAGICS = {fmt: b"PGINT6\x00" + bytes([fmt]) for fmt in (1, 2, 3)}
ARTIFACT_MAGIC = ARTIFACT_MAGICS[ARTIFACT_FORMAT]


def artifact_format(blob: bytes) -> int | None:
    """The format a file's magic names; None for a file that is no artifact of this script."""
    return {magic: fmt for fmt, magic in ARTIFACT_MAGICS.items()}.get(blob[:len(ARTIFACT_MAGIC)])
CONTROL_PATTERNS = ("q_gain", "attn_scale", "mlp_scale", "resid_mix", "skip_weights", "smear",
                    "bigram.scale", "coda_theta", "coda_gate.bias", "coda_norm", "ve_scale",
                    "lane_")
EMBEDDINGS = ("tok_emb.weight", "bigram.embed.weight", "value_embed.embed.weight")
CLIP_QUANTILES = (1.0, 0.9999, 0.999, 0.995, 0.99)


def is_control(name: str) -> bool:
    """Gains, gates, mixes and angles: small, and sensitive to rounding."""
    return any(p in name for p in CONTROL_PATTERNS)


def export_kind(name: str, t: Tensor) -> str:
    """How a tensor is stored in the artifact (int6 matrices may drop to int5 to fit)."""
    if is_control(name):
        return "fp32"
    if name in EMBEDDINGS:
        return "int8"
    if t.ndim == 2 and "coda_" not in name:  # CoDA's gate is small
        return "int6"
    return "fp16"


def is_qat_matrix(name: str, t: Tensor) -> bool:
    """QAT trains on the grid the export rounds to: the int6 matrices'."""
    return export_kind(name, t) == "int6"


def is_gptq_matrix(name: str, t: Tensor) -> bool:
    """GPTQ rounds the int6 (or int5) matrices from their inputs' Hessians."""
    return export_kind(name, t) == "int6"


def gptq_factor(hessian: Tensor) -> tuple[Tensor, Tensor] | None:
    """GPTQ's column order (largest input first) and the upper Cholesky factor U of the damped
    inverse Hessian in that order; None if it does not factor."""
    h = hessian.float().clone()
    dead = h.diagonal() == 0  # an input always 0: its column is plainly rounded
    h[dead, dead] = 1.0
    h.diagonal().add_(0.01 * h.diagonal().mean())
    order = torch.argsort(h.diagonal(), descending=True)
    h = h[order][:, order]
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        chol, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    return None if info.item() != 0 else (order, chol)


def gptq_energy(hessian: Tensor) -> Tensor:
    """What a unit of rounding variance costs a row's d^T H d under GPTQ, per weight. GPTQ leaves
    d = U^T e, e_j column j's rounding error over U_jj, so the cost is mean (U H U^T)_jj / U_jj^2:
    mean 1 / U_jj^2 but for the damping, and mean(diag H) for uncorrelated inputs."""
    factor = gptq_factor(hessian)
    if factor is None:  # rounded to the nearest: every column's error stays as it is
        return hessian.diagonal().double().mean()
    order, u = factor[0], factor[1].double()
    h = hessian.double()[order][:, order]
    return (((u @ h) * u).sum(1) / u.diagonal().square()).mean()


def gptq_codes(w: Tensor, scale: Tensor, qmax: int, hessian: Tensor,
               block: int = 128) -> Tensor | None:
    """GPTQ: columns rounded in turn, each error moved onto the rest by the inverse Hessian."""
    if (factor := gptq_factor(hessian)) is None:
        return None
    order, chol = factor
    wt, cols = w.float().t()[order].contiguous(), w.size(1)  # one column per row of wt
    codes, scale = torch.empty_like(wt), scale.float()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        err = torch.empty(i2 - i1, wt.size(1), dtype=wt.dtype, device=wt.device)
        for i in range(i1, i2):
            codes[i] = torch.clamp(torch.round(wt[i] / scale), -qmax, qmax)
            err[i - i1] = (wt[i] - codes[i] * scale) / chol[i, i]
            wt[i + 1:i2] -= chol[i, i + 1:i2, None] * err[i - i1]
        wt[i2:] -= chol[i1:i2, i2:].t() @ err
    return codes[torch.argsort(order)].t()


def stored_scales(scales: Tensor) -> Tensor:
    """Scales as the file stores them: fp16, never 0."""
    return scales.half().clamp_min(2 ** -24).float()


def round_rows(w: Tensor, scales: Tensor, qmax: int, hessian: Tensor | None = None) -> Tensor:
    """Codes of w's rows at their scales: GPTQ given a Hessian (if it factors), else nearest."""
    codes = None if hessian is None else gptq_codes(w, scales, qmax, hessian)
    if codes is None:
        codes = torch.clamp(torch.round(w / scales[:, None]), -qmax, qmax)
    return codes


def row_options(w: Tensor, bits: int, quantiles=(1.0,),
                hessian: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Each row at each |w| quantile clip: int8 codes (clip, row, col), fp16 scales and squared
    errors (clip, row) (given a Hessian: the product's, with GPTQ), all on the CPU."""
    w = w.float() if hessian is None else w.to(hessian.device, torch.float32)
    qmax = 2 ** (bits - 1) - 1
    inner = [quantile for quantile in quantiles if quantile != 1.0]  # one sort for all
    inner_clips = iter(torch.quantile(w.abs(), torch.tensor(inner, dtype=w.dtype, device=w.device),
                                      dim=1) if inner else [])
    clips = torch.stack([w.abs().amax(dim=1) if quantile == 1.0 else next(inner_clips)
                         for quantile in quantiles])
    scales = stored_scales(clips / qmax)
    # every clip at once: GPTQ's rows are independent
    codes = round_rows(w.repeat(len(quantiles), 1), scales.flatten(), qmax, hessian)
    codes = codes.view(len(quantiles), *w.shape)
    diff = codes * scales[:, :, None] - w
    err = diff.square().sum(-1) if hessian is None else ((diff @ hessian.float()) * diff).sum(-1)
    return codes.to(torch.int8).cpu(), scales.half().cpu(), err.double().cpu()


def quantize_rows(w: Tensor, bits: int, quantiles=(1.0,),
                  hessian: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """int8 codes, fp16 scales (CPU), each row at its clip of least error."""
    return least_error(*row_options(w, bits, quantiles, hessian))


def least_error(codes: Tensor, scales: Tensor, err: Tensor) -> tuple[Tensor, Tensor]:
    best, rows = err.argmin(dim=0), torch.arange(codes.size(1))  # the first clip among equals
    return codes[best, rows], scales[best, rows]


def row_bits(codes: Tensor) -> Tensor:
    """Each (clip, row)'s order-0 code length in bits under its clip's histogram: what the clip
    choice trades against error (exact sizes come from compressing the chosen codes)."""
    out = []
    for c in codes.long() + 128:
        counts = torch.bincount(c.flatten(), minlength=256).double()
        out.append(-(counts / c.numel()).log2()[c].sum(-1))
    return torch.stack(out)


def zstd22(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=22).compress(data)


def cached_zstd22():
    """zstd22 that compresses each distinct chunk once: the export's trials and its write share
    the frames of every tensor they have in common."""
    frames: dict[bytes, bytes] = {}

    def compress(chunk: bytes) -> bytes:
        return frames[chunk] if chunk in frames else frames.setdefault(chunk, zstd22(chunk))

    return compress


class RateDistortion:
    """Every int6 matrix at int6 and int5, each row at every clip. A weight lam in [0, 1] picks
    each row's clip, and each matrix's width, of least (1 - lam) err / err0 + lam bits / bits0:
    the lower convex hull of (bytes, error), one currency for all matrices, walked by bisection."""

    def __init__(self, options: dict[str, dict[int, tuple]]):
        self.names, self.options = list(options), options
        rows = [options[n][6][2].size(1) for n in self.names]
        self.seg = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows))
        self.err = {b: torch.cat([options[n][b][2] for n in self.names], 1) for b in (6, 5)}
        self.bits = {b: torch.cat([options[n][b][3] for n in self.names], 1) for b in (6, 5)}
        least = self.err[6].argmin(0, keepdim=True)
        self.err0 = max(float(self.err[6].gather(0, least).sum()), 1e-30)
        self.bits0 = max(float(self.bits[6].gather(0, least).sum()), 1.0)

    def pick(self, lam: float, widths: Tensor | None = None) -> tuple[Tensor, dict, Tensor]:
        """Each matrix's width (6 where widths is True), rows' clips, per-matrix err and bits."""
        sums, picks = {}, {}
        for b in (6, 5):
            cost = (1 - lam) / self.err0 * self.err[b] + lam / self.bits0 * self.bits[b]
            picks[b] = cost.argmin(0, keepdim=True)
            sums[b] = [torch.zeros(len(self.names), dtype=torch.float64).index_add_(
                0, self.seg, x.gather(0, picks[b])[0]) for x in (cost, self.err[b], self.bits[b])]
        if widths is None:
            widths = sums[6][0] <= sums[5][0]
        return widths, picks, [torch.where(widths, sums[6][i], sums[5][i]) for i in (1, 2)]

    def bisect(self, fits, lo: float = 0.0, hi: float = 1.0) -> float:
        """The least lam in [lo, hi] that fits (hi when none does): code bits fall as lam rises."""
        if fits(lo):
            return lo
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return hi

    def choose(self, bits_budget: float) -> tuple[Tensor, dict, float]:
        """Widths from the hull, then clips refilling what a width's step left, then any int5
        matrix whose int6 form fits, most error saved per byte first."""
        lam = self.bisect(lambda x: float(self.pick(x)[2][1].sum()) <= bits_budget)
        widths = self.pick(lam)[0]
        lam = self.bisect(lambda x: float(self.pick(x, widths)[2][1].sum()) <= bits_budget, 0, lam)
        if lam == 0.0:
            _, _, (err, bits) = self.pick(0.0, widths)
            _, _, (err6, bits6) = self.pick(0.0, torch.ones_like(widths))
            slack = bits_budget - float(bits.sum())
            for m in sorted(torch.nonzero(~widths).flatten().tolist(),
                            key=lambda m: -(err[m] - err6[m]) / max(bits6[m] - bits[m], 1e-9)):
                if bits6[m] - bits[m] <= slack:
                    widths[m], slack = True, slack - float(bits6[m] - bits[m])
        widths, picks, (_, bits) = self.pick(lam, widths)
        return widths, picks, float(bits.sum())

    def packed(self, widths: Tensor, picks: dict) -> dict[str, tuple]:
        out = {}
        for m, name in enumerate(self.names):
            b = 6 if widths[m] else 5
            rows = (self.seg == m).nonzero().flatten()
            best = picks[b][0, rows]
            codes, scales = self.options[name][b][:2]
            idx = torch.arange(codes.size(1))
            out[name] = (f"int{b}", codes[best, idx], scales[best, idx])
        return out


def quantize_state(state: dict[str, Tensor], budget_bytes: float = math.inf,
                   hessians: dict[str, Tensor] | None = None, shape: dict | None = None,
                   compress=None, rule: str = EXPORT_RULES[0],
                   fisher: dict[str, Tensor] | None = None) -> dict[str, tuple]:
    """Packs a state dict, its artifact (written with shape) at most budget_bytes if it can be,
    sizes measured by compressing. Over budget, rule 'fill': int6 matrices drop to int5, largest
    saving first, until the file fits, then any whose int6 form fits the slack goes back, rows
    at their clip of least error; rule 'rate': rows' clips and matrices' widths of least error per
    byte, one currency for all matrices (RateDistortion); rule 'fisher': every matrix int6, each
    row's step set by its estimated cost in loss (fisher_steps), else (no calibration) 'fill'."""
    state = {name: t.detach().cpu() for name, t in state.items()}
    hessians, packed, options = hessians or {}, {}, {}
    for name, t in state.items():
        kind = export_kind(name, t)
        if kind == "int6":
            options[name] = {6: row_options(t, 6, CLIP_QUANTILES, hessians.get(name))}
            packed[name] = (kind, *least_error(*options[name][6]))
        elif kind == "int8":
            packed[name] = (kind, *quantize_rows(t, 8))
        else:
            dtype = torch.float32 if kind == "fp32" else torch.float16
            packed[name] = (kind, t.to(dtype).contiguous())
    compress = compress or cached_zstd22()

    def file_bytes(p: dict) -> int:
        return len(ARTIFACT_MAGIC) + 32 + len(serialize(p, shape or {}, compress))

    if budget_bytes == math.inf or not options or (size := file_bytes(packed)) <= budget_bytes:
        return packed
    if rule == "fisher" and fisher and all(n in fisher and n in hessians for n in options) and (
            out := fisher_steps(state, packed, hessians, fisher, budget_bytes, size,
                                file_bytes)) is not None:
        return out
    for name, by_bits in options.items():  # both rules' int5 candidates, computed once
        by_bits[5] = row_options(state[name], 5, CLIP_QUANTILES, hessians.get(name))
    if rule != "rate" and (out := fill_budget(packed, options, budget_bytes, file_bytes,
                                               compress)) is not None:
        return out
    for by_bits in options.values():  # 'rate', or 'fill' with all-int5 over: coarser clips
        for b in (6, 5):
            by_bits[b] += (row_bits(by_bits[b][0]),)
    rd = RateDistortion(options)
    offset = size - rd.bits0 / 8  # the bytes outside the estimate: scales, floats, header, zstd
    floor = float(rd.pick(1.0)[2][1].sum())
    aim, best, least = budget_bytes * (1 - 5e-4), None, None
    for _ in range(6):
        widths, picks, bits = rd.choose(8 * (aim - offset))
        trial = dict(packed, **rd.packed(widths, picks))
        size = file_bytes(trial)
        if size <= budget_bytes and (best is None or size > best[0]):
            best = (size, trial)
        if least is None or size < least[0]:
            least = (size, trial)
        filled = budget_bytes * (1 - 1e-3) <= size <= budget_bytes
        if filled or size > budget_bytes and bits <= floor:  # or nothing smaller to try
            break
        offset = size - bits / 8
        aim -= max(size - budget_bytes, 0)  # over: aim lower for good
    return (best or least)[1]  # nothing fits: the smallest tried, for the caller to refuse


def fisher_steps(state, packed, hessians, fisher, budget_bytes, size, file_bytes, trials=10,
                 qmax=31):
    """Rule 'fisher' of quantize_state: every int6 matrix stays int6, row r of matrix m at the step
    s_r * clamp(c * t_r / s_r, 1, 64), s_r its step of least error, t_r = (F_r e_m)^-1/2 and c the
    least that fits, found on measured sizes. To second order, rounding a row at step d costs the
    loss about F_r e_m d^2 / 12 (F_r its output's summed squared gradient, e_m what a unit of
    rounding variance costs its inputs' X^T X under GPTQ: gptq_energy), so at one price per bit of
    an entropy-coded file the loss is least at steps in proportion to t_r. An int8 embedding with
    a weight in fisher (that product already, no Hessian) is stepped alike from its absmax step.
    None when no c tried fits. qmax above 31 (a study's, not the rule's) lets an int6 row finer
    than s_r, down to the step that codes its largest weight to qmax."""
    names = [n for n, v in packed.items() if v[0] == "int6" or v[0] == "int8" and n in fisher]
    least = {n: packed[n][2].double() for n in names}
    top = {n: 127 if packed[n][0] == "int8" else qmax for n in names}
    ratio = {}
    for n in names:
        energy = gptq_energy(hessians[n]).cpu() if n in hessians else 1.0
        t = (fisher[n].double().cpu() * energy).clamp_min(1e-300).rsqrt()
        ratio[n] = (t / least[n]).clamp(2 ** -40, 2 ** 40)
    finest = {n: (state[n].double().abs().amax(1) / qmax / least[n]).clamp(max=1)
              if qmax > 31 and n in hessians else torch.ones_like(least[n]) for n in names}
    counts = {n: least[n].numel() * state[n].size(1) for n in names}
    params = sum(counts.values())
    # t on the scale of s: c = 1 widens no row on a geometric average over the parameters
    shift = sum(counts[n] * ratio[n].log2().mean() for n in names) / params

    def stepped(lc: float) -> dict[str, tuple]:
        out = dict(packed)
        for n in names:
            hessian = hessians.get(n)
            w = state[n].float() if hessian is None else state[n].to(hessian.device, torch.float32)
            factor = torch.maximum(ratio[n] * 2 ** (lc - shift), finest[n]).clamp(max=64)
            scales = stored_scales((least[n] * factor).float().to(w.device))
            out[n] = (packed[n][0], round_rows(w, scales, top[n], hessian).to(torch.int8).cpu(),
                      scales.half().cpu())
        return out

    aim, over, under, best = budget_bytes * (1 - 5e-4), None, None, None
    lc, stride = 8 * (size - aim) / params, 0.5  # bits a parameter saves per doubling of its step
    for _ in range(trials):
        trial = stepped(lc)
        trial_bytes = file_bytes(trial)
        if trial_bytes > budget_bytes:
            over = max(over or (-math.inf, 0), (lc, trial_bytes))
        else:
            under = min(under or (math.inf, 0), (lc, trial_bytes))
            if best is None or trial_bytes > best[0]:
                best = (trial_bytes, trial)
            if trial_bytes >= budget_bytes * (1 - 1e-3):
                break
        if over is None or under is None:  # not yet bracketed: step out, farther each time
            lc, stride = lc + (stride if under is None else -stride), 2 * stride
            continue
        (x0, s0), (x1, s1) = over, under  # regula falsi on log2 c, kept off the bracket's ends
        x = x0 + (aim - s0) * (x1 - x0) / (s1 - s0) if s1 != s0 else (x0 + x1) / 2
        lc = min(max(x, x0 + 0.1 * (x1 - x0)), x1 - 0.1 * (x1 - x0))
    return best and best[1]


def fill_budget(packed, options, budget_bytes, file_bytes, compress):
    """Rule 'fill' of quantize_state: whole matrices int6 -> int5 in the order of their zstd
    frames' saving, largest first, the fewest that make the file fit (by bisection: the file
    shrinks as more drop); then any that fits the slack goes back, smallest saving first (the most
    matrices back). None when even all at int5 is over."""
    int5 = {n: ("int5", *least_error(*by_bits[5])) for n, by_bits in options.items()}
    chunks = [entry[n][1].numpy().tobytes() for entry in (packed, int5) for n in options]
    with ThreadPoolExecutor() as pool:  # zstd releases the GIL
        sizes = list(pool.map(lambda chunk: len(compress(chunk)), chunks))
    saving = {n: sizes[i] - sizes[len(options) + i] for i, n in enumerate(options)}
    order = sorted(options, key=lambda n: -saving[n])

    def dropped(k: int) -> dict:
        return dict(packed, **{n: int5[n] for n in order[:k]})

    over, fits = 0, len(order)  # the least count that fits, by bisection: each size is a write
    while fits - over > 1:
        mid = (over + fits) // 2
        over, fits = (mid, fits) if file_bytes(dropped(mid)) > budget_bytes else (over, mid)
    out = dropped(fits)
    if fits == len(order) and file_bytes(out) > budget_bytes:  # all of them, never measured yet
        return None
    for n in reversed(order[:fits - 1]):  # the last one dropped is known not to fit back
        if file_bytes(back := dict(out, **{n: packed[n]})) <= budget_bytes:
            out = back
    return out


def dequantize_state(packed: dict[str, tuple]) -> dict[str, Tensor]:
    return {name: v[1].float() * v[2].float()[:, None] if v[0].startswith("int") else v[1].float()
            for name, v in packed.items()}


NUMPY_DTYPES = {"int5": np.int8, "int6": np.int8, "int8": np.int8, "fp16": np.float16,
                "fp32": np.float32}


def scale_order(scales) -> np.ndarray:
    """Rows by their stored scale: zstd's blocks then hold rows whose codes spread alike."""
    return np.argsort(np.asarray(scales, dtype=np.float16), kind="stable")


# Format 3 codes the int5/int6 matrices with rANS: zstd's Huffman spends at least a bit a code,
# and a row at a coarse step holds mostly zeros.
RANS_KINDS, RANS_CLASSES, RANS_BITS = ("int5", "int6"), 32, 14
RANS_SYMBOLS = 255  # codes -127..127: a study's finer grids (qmax up to 127) code too
RANS_LOW = 1 << 16  # a lane's state stays in [2^16, 2^32), 16 bits shed or read at a time


def rans_lanes(n: int) -> int:
    """Lanes for n codes, stepped at once: each lane's final state costs 4 bytes."""
    return max(1, min(4096, n // 1024))


def rans_tables(sym: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Frequencies [class, symbol] summing to 2^RANS_BITS per class, each symbol seen at least 1."""
    counts = np.bincount(cls.astype(np.int64) * RANS_SYMBOLS + sym,
                         minlength=RANS_CLASSES * RANS_SYMBOLS).reshape(RANS_CLASSES, -1)
    seen = counts > 0
    spare = (1 << RANS_BITS) - seen.sum(1, keepdims=True)
    freq = (counts * spare // np.maximum(counts.sum(1, keepdims=True), 1) + seen)
    freq[np.arange(RANS_CLASSES), counts.argmax(1)] += (1 << RANS_BITS) - freq.sum(1)
    return freq.astype(np.uint16)


def rans_cumulative(freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = freq.astype(np.uint64)
    return f, np.cumsum(f, 1) - f


def rans_lay_out(values: np.ndarray, fill) -> tuple[np.ndarray, int]:
    """values (one a code) padded with fill to the lanes' whole length, as [lanes, length]."""
    lanes = rans_lanes(len(values))
    length = -(-len(values) // lanes)
    pad = np.full(lanes * length - len(values), fill, values.dtype)
    return np.concatenate([values, pad]).reshape(lanes, length), lanes


def rans_encode(sym: np.ndarray, cls: np.ndarray, freq: np.ndarray) -> tuple[np.ndarray, ...]:
    """Interleaved rANS of symbols sym, each under its class's table: the codes cut into lanes of
    one length (the last padded with its class's likeliest symbol), all lanes stepped at once,
    last symbol first. Returns the lanes' final states and the 16-bit words in reading order."""
    sym, lanes = rans_lay_out(sym, freq[cls[-1]].argmax())
    cls = rans_lay_out(cls, cls[-1])[0]
    f64, cum = rans_cumulative(freq)
    top = np.uint64((RANS_LOW >> RANS_BITS) << 16)  # a state of f * top or more sheds 16 bits
    x, words = np.full(lanes, RANS_LOW, np.uint64), []
    for t in range(sym.shape[1] - 1, -1, -1):
        c, s = cls[:, t], sym[:, t]
        f = f64[c, s]
        shed = x >= top * f
        words.append(x[shed].astype(np.uint16))
        x[shed] >>= np.uint64(16)
        x = (x // f << np.uint64(RANS_BITS)) + x % f + cum[c, s]
    return x.astype(np.uint32), np.concatenate(words[::-1]).astype(np.uint16)


def rans_decode(states: np.ndarray, words: np.ndarray, cls: np.ndarray,
                freq: np.ndarray) -> np.ndarray:
    """The symbols rans_encode coded, one class each in cls; ValueError unless the stream ends
    where the encoder began: every word read, every lane back at its first state."""
    n = len(cls)
    cls, lanes = rans_lay_out(cls, cls[-1])
    if len(states) != lanes or (freq.astype(np.int64).sum(1) != 1 << RANS_BITS).any():
        raise ValueError("rANS stream: its lanes or tables do not match the index")
    f64, cum = rans_cumulative(freq)
    slot = np.stack([np.repeat(np.arange(RANS_SYMBOLS, dtype=np.uint8), f) for f in freq])
    x, pos, out = states.astype(np.uint64), 0, np.empty(cls.shape, np.uint8)
    low, mask = np.uint64(RANS_LOW), np.uint64((1 << RANS_BITS) - 1)
    for t in range(cls.shape[1]):
        c, r = cls[:, t], x & mask
        s = out[:, t] = slot[c, r]
        x = f64[c, s] * (x >> np.uint64(RANS_BITS)) + r - cum[c, s]
        need = x < low
        k = int(need.sum())
        if pos + k > len(words):
            raise ValueError("rANS stream: fewer words than its codes need")
        x[need] = x[need] << np.uint64(16) | words[pos:pos + k]
        pos += k
    if pos != len(words) or (x != low).any():
        raise ValueError("rANS stream: does not end where it began")
    return out.reshape(-1)[:n]


def rans_coded(kind: str, shape, fmt: int) -> bool:
    """Whether a tensor's codes go in the rANS stream: format 3's non-empty int5/int6 matrices."""
    return fmt >= 3 and kind in RANS_KINDS and math.prod(shape) > 0


def equal_count_bins(value: np.ndarray, weight: np.ndarray, k: int) -> np.ndarray:
    """Bins 0..k-1 of value, each holding about the same total of the integer weights."""
    order = np.argsort(value, kind="stable")
    below = np.cumsum(weight[order])
    edges = value[order][np.searchsorted(below, np.arange(1, k) * below[-1] / k)]
    return np.searchsorted(edges, value)


def rans_pack(matrices: list[np.ndarray], compress) -> list[bytes]:
    """The codes of matrices in one rANS stream: each row's class (RANS_CLASSES bins of equal
    code counts over its mean |code|, which sets how its codes spread), the class tables, the
    lanes' states and words. The first two frames go through compress."""
    spread = np.concatenate([np.abs(m.astype(np.float32)).mean(1) for m in matrices])
    widths = np.concatenate([np.full(len(m), m.shape[1]) for m in matrices])
    classes = equal_count_bins(spread, widths, RANS_CLASSES).astype(np.uint8)
    sym = np.concatenate([m.reshape(-1) for m in matrices]).astype(np.int16) + 127
    if sym.min() < 0:
        raise ValueError("rANS codes are -127..127: a code of -128 cannot be stored")
    sym, cls = sym.astype(np.uint8), np.repeat(classes, widths)
    freq = rans_tables(sym, cls)
    states, words = rans_encode(sym, cls, freq)
    return [compress(classes.tobytes()), compress(freq.tobytes()), states.tobytes(),
            words.tobytes()]


def rans_unpack(frames: list[bytes], shapes: list) -> list[np.ndarray]:
    """rans_pack's matrices back from its four frames, given their shapes."""
    classes = np.frombuffer(unzstd(frames[0], sum(s[0] for s in shapes)), np.uint8)
    if classes.max(initial=0) >= RANS_CLASSES:
        raise ValueError("rANS stream: row classes do not match the index")
    freq = np.frombuffer(unzstd(frames[1], RANS_CLASSES * RANS_SYMBOLS * 2), np.uint16)
    freq = freq.reshape(RANS_CLASSES, RANS_SYMBOLS)
    cls = np.repeat(classes, np.concatenate([np.full(s[0], s[1]) for s in shapes]))
    sym = rans_decode(np.frombuffer(frames[2], np.uint32), np.frombuffer(frames[3], np.uint16),
                      cls, freq)
    codes = (sym.astype(np.int16) - 127).astype(np.int8)
    bounds = np.cumsum([0] + [s[0] * s[1] for s in shapes])
    return [codes[a:b].reshape(s) for a, b, s in zip(bounds, bounds[1:], shapes)]


# No artifact within the challenge's limit holds a model of more values than this: an index that
# says more is damaged, and is refused before the reader allocates what it says.
ARTIFACT_MAX_VALUES = 1 << 28


def unzstd(frame: bytes, size: int, exact: bool = True) -> bytes:
    """A zstd frame decompressed, refused unless the size its header declares is size (at most size
    if not exact): zstd allocates what a frame declares before decoding it."""
    declared = zstandard.frame_content_size(frame)  # 2^64 - 1: not declared
    if declared > size or exact and declared != size:
        raise ValueError(f"a frame declares {declared} bytes where the index implies {size}")
    return zstandard.ZstdDecompressor().decompress(frame)


def serialize(packed: dict[str, tuple], shape: dict, compress=zstd22, fmt: int = 0) -> bytes:
    """JSON index, then zstd frames: one per tensor stored whole (rows in scale_order from format
    2) and one of all rows' scales; format 3 (the default) codes the int5/int6 matrices in one
    rANS stream after them (rans_pack), formats 1-2 gave each its own frame."""
    fmt = fmt or ARTIFACT_FORMAT
    names = sorted(packed)
    coded = [n for n in names if rans_coded(packed[n][0], packed[n][1].shape, fmt)]
    chunks = [(v[1].numpy()[scale_order(v[2])] if len(v := packed[n]) == 3 and fmt >= 2
               else v[1].numpy()).tobytes() for n in names if n not in coded]
    chunks.append(b"".join(packed[n][2].numpy().tobytes() for n in names if len(packed[n]) == 3))
    with ThreadPoolExecutor() as pool:  # zstd releases the GIL
        frames = list(pool.map(compress, chunks))
    if coded:
        frames += rans_pack([packed[n][1].numpy() for n in coded], compress)
    index = {"shape": shape,
             "tensors": [[n, packed[n][0], list(packed[n][1].shape)] for n in names],
             "frames": [len(f) for f in frames]}
    header = zstd22(json.dumps(index).encode())
    return len(header).to_bytes(4, "little") + header + b"".join(frames)


def deserialize(payload: bytes, fmt: int = 0) -> tuple[dict, dict[str, tuple]]:
    """serialize's shape and packed state back from a payload of format fmt."""
    fmt = fmt or ARTIFACT_FORMAT
    size = int.from_bytes(payload[:4], "little")
    header = json.loads(unzstd(payload[4:4 + size], 1 << 20, exact=False))
    tensors, frames, pos = header["tensors"], [], 4 + size
    for name, kind, shape in tensors:
        if kind not in NUMPY_DTYPES or not all(isinstance(d, int) and 0 <= d < 2 ** 32
                                               for d in shape) or (
                kind.startswith("int") and len(shape) != 2):
            raise ValueError(f"{name}: shape {shape} is not one of a {kind} tensor")
    if sum(math.prod(t[2]) for t in tensors) > ARTIFACT_MAX_VALUES:
        raise ValueError(f"the index declares more than {ARTIFACT_MAX_VALUES} values")
    for frame_bytes in header["frames"]:
        frames.append(payload[pos:pos + frame_bytes])
        pos += frame_bytes
    coded = [t for t in tensors if rans_coded(t[1], t[2], fmt)]
    sizes = [math.prod(shape) * np.dtype(NUMPY_DTYPES[kind]).itemsize
             for _, kind, shape in tensors if not rans_coded(kind, shape, fmt)]
    sizes.append(2 * sum(t[2][0] for t in tensors if t[1].startswith("int")))  # fp16 scales
    whole = len(sizes)
    if pos != len(payload) or len(frames) != whole + 4 * bool(coded):
        raise ValueError("frames do not match the index")
    raws = [unzstd(f, n) for f, n in zip(frames[:whole], sizes)]
    codes = iter(rans_unpack(frames[whole:], [t[2] for t in coded]) if coded else [])
    packed, scale_pos, raw = {}, 0, iter(raws)
    for name, kind, shape in tensors:
        if rans_coded(kind, shape, fmt):
            data = next(codes)
        else:
            data = np.frombuffer(next(raw), dtype=NUMPY_DTYPES[kind],
                                 count=math.prod(shape)).reshape(shape)
        if not kind.startswith("int"):
            packed[name] = (kind, torch.from_numpy(data.copy()))
            continue
        scales = np.frombuffer(raws[-1], dtype=np.float16, count=shape[0], offset=scale_pos)
        scale_pos += scales.nbytes
        rows = data.copy()
        if fmt >= 2 and not rans_coded(kind, shape, fmt):
            rows[scale_order(scales)] = data
        packed[name] = (kind, torch.from_numpy(rows), torch.from_numpy(scales.copy()))
    return header["shape"], packed


def write_atomic(path: str, data: bytes) -> None:
    """Writes a temp file beside path and renames it over path: readers see old or new."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # no temp file left behind, whatever happened
        if os.path.exists(tmp):
            os.remove(tmp)


def write_artifact(path: str, packed: dict[str, tuple], shape: dict, compress=zstd22,
                   fmt: int = 0) -> bytes:
    """Writes magic, the payload's sha256, payload; returns the sha256."""
    payload = serialize(packed, shape, compress, fmt)
    digest = hashlib.sha256(payload).digest()
    write_atomic(path, ARTIFACT_MAGICS[fmt or ARTIFACT_FORMAT] + digest + payload)
    return digest


LEGACY_SHAPE = {"rope_base": 10000.0, "logit_softcap": 30.0, "coda_head_norm": "rms",
                "recur_layers": []}


def read_artifact(path: str, shape: dict, variable: str = "LOAD_ARTIFACT",
                  digest: bytes | None = None) -> dict[str, Tensor]:
    """Reads and checks an artifact (and that its sha256 is digest); ConfigError if wrong."""
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{variable}={path}: cannot read it ({e.strerror})") from None
    head = len(ARTIFACT_MAGIC) + 32
    fmt = artifact_format(blob)
    if fmt is None:
        raise ConfigError(f"{variable}={path}: not an artifact of this script")
    if len(blob) < head or hashlib.sha256(blob[head:]).digest() != blob[len(ARTIFACT_MAGIC):head]:
        raise ConfigError(f"{variable}={path}: truncated or corrupted (checksum mismatch)")
    if digest is not None and blob[len(ARTIFACT_MAGIC):head] != digest:
        raise ConfigError(f"{variable}={path}: not the artifact this run wrote (replaced since)")
    try:
        written_shape, packed = deserialize(blob[head:], fmt)
    except (zstandard.ZstdError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{variable}={path}: unreadable payload") from None

    def shown(v):  # as the variable is written
        return layer_list(v) if isinstance(v, list) else v

    for key in [*shape, *(k for k in written_shape if k not in shape)]:
        old = LEGACY_SHAPE.get(key, 0)  # absent from older artifacts: the value they had (or off)
        if shape.get(key, old) != written_shape.get(key, old):
            raise ConfigError(f"{variable}={path} was written with "
                              f"{key.upper()}={shown(written_shape.get(key, old))}, "
                              f"this run has {key.upper()}={shown(shape.get(key, old))}")
    return dequantize_state(packed)


# -----------------------------
# WEIGHT AVERAGING
# -----------------------------


class WeightAverage:
    """fp32 EMA (every step) and SWA (every SWA_EVERY steps in the warmdown); SWA wins."""

    def __init__(self, model: nn.Module, args: Hyperparameters):
        self.params = list(model.parameters())
        self.args = args
        self.ema = [p.detach().float().clone() for p in self.params] if args.ema_enabled else None
        self.swa, self.swa_count = None, 0

    @torch.no_grad()
    def update(self, step: int, lr_scale: float) -> None:
        if self.ema is not None:
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params],
                                 1.0 - self.args.ema_decay)
        if self.args.swa_enabled and lr_scale < 1.0 and step % self.args.swa_every == 0:
            if self.swa is None:
                self.swa = [p.detach().float().clone() for p in self.params]
            else:
                torch._foreach_add_(self.swa, [p.detach().float() for p in self.params])
            self.swa_count += 1

    @torch.no_grad()
    def apply(self) -> str:
        """Loads the chosen average into the model; returns its name."""
        if self.swa is not None:
            chosen = [s / self.swa_count for s in self.swa]
            what = f"swa({self.swa_count} checkpoints)"
        elif self.ema is not None:
            chosen, what = self.ema, f"ema(decay {self.args.ema_decay})"
        else:
            return "final weights"
        for p, avg in zip(self.params, chosen):
            p.copy_(avg)
        return what


# -----------------------------
# TRAINING
# -----------------------------


class RunLog:
    """Rank 0 prints and appends to logs/{RUN_ID}.txt; other ranks stay silent."""

    def __init__(self, run_id: str, master: bool):
        self.master = master
        self.path = f"logs/{run_id}.txt"
        if master:
            os.makedirs("logs", exist_ok=True)

    def __call__(self, msg: str, console: bool = True) -> None:
        if not self.master:
            return
        if console:
            print(msg, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            print(msg, file=f)


LOG_HEADER_END = "=" * 100


def log_environment(log, cuda: bool) -> None:
    """Heads the log file with this source, the software and the GPUs; 100 '=' end it."""
    log(f"{'=' * 43} train_gpt.py {'=' * 44}\n{Path(__file__).read_text(encoding='utf-8')}",
        console=False)
    log(f"python:{platform.python_version()} torch:{torch.__version__} cuda:{torch.version.cuda} "
        f"cudnn:{torch.backends.cudnn.version()} triton:{triton.__version__ if triton else None} "
        f"numpy:{np.__version__} sentencepiece:{spm.__version__} "
        f"zstandard:{zstandard.__version__ if zstandard else None}", console=False)
    if cuda:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        log("gpus: " + ", ".join(names), console=False)
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            smi = "nvidia-smi: not available"
        log(smi, console=False)
    log(LOG_HEADER_END, console=False)


class TrainingDiverged(Exception):
    pass


def is_muon_matrix(name: str, p: Tensor) -> bool:
    """Muon trains the products' weights; AdamW the lookups and the small tensors."""
    return p.ndim == 2 and name not in EMBEDDINGS and not is_control(name) and "coda_" not in name


def make_optimizers(model: GPT, args: Hyperparameters,
                    orthogonalize) -> tuple[Muon, list[torch.optim.Optimizer]]:
    """Muon for the matrices, AdamW for the rest; CoDA never decays (angle 0: noise = signal)
    and trains at CODA_LR."""
    embeds, matrices, controls, no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if name in EMBEDDINGS:
            embeds.append(p)
        elif is_muon_matrix(name, p):
            matrices.append(p)
        elif "coda_" in name:
            no_decay.append(p)
        else:
            controls.append(p)
    fused = dict(fused=True) if model.tok_emb.weight.is_cuda else {}
    adam = dict(betas=(0.9, 0.95), eps=1e-8, **fused)
    muon = Muon(matrices, lr=args.matrix_lr, momentum=args.muon_momentum, weight_decay=args.muon_wd,
                orthogonalize=orthogonalize, row_norm=args.muon_row_norm)
    scalar_groups = [{"params": controls, "lr": args.scalar_lr, "weight_decay": args.adam_wd}]
    if no_decay:
        scalar_groups.append({"params": no_decay, "lr": args.coda_lr, "weight_decay": 0.0})
    opts = [muon,
            torch.optim.AdamW([{"params": embeds, "lr": args.tied_embed_lr}],
                              weight_decay=args.adam_wd, **adam),
            torch.optim.AdamW(scalar_groups, **adam)]
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return muon, opts


def lr_scale(args: Hyperparameters, step: int, elapsed_ms: float, budget_ms: float) -> float:
    """1, then linear to LR_FLOOR over the last WARMDOWN_ITERS steps (under a cap: their time)."""
    if args.warmdown_iters == 0:
        return 1.0
    if args.max_wallclock_seconds == 0:
        left = min(1.0, max(args.iterations - step, 0) / args.warmdown_iters)
    else:
        warmdown_ms = args.warmdown_iters * elapsed_ms / max(step, 1)
        left = min(1.0, max(budget_ms - elapsed_ms, 0.0) / max(warmdown_ms, 1e-9))
    return args.lr_floor + (1.0 - args.lr_floor) * left


def train_step(args, model, base_model, optimizers, loader: DistributedTokenLoader) -> Tensor:
    """One optimizer step over GRAD_ACCUM_STEPS micro-batches; the mean loss, on device."""
    loss_sum = None
    for micro in range(args.grad_accum_steps):
        x, y = loader.next_batch(args.micro_batch_tokens, args.train_seq_len)
        last = micro == args.grad_accum_steps - 1
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            loss = model(x, y)
            (loss / args.grad_accum_steps).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    if args.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(base_model.parameters(), args.grad_clip_norm)
    for opt in optimizers:  # each parameter has one optimizer
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss_sum / args.grad_accum_steps


CALIBRATION_PIECES = 8  # per micro-batch: the deadline drops an eighth of one at a time
GPTQ_MARGIN = 1.25  # the loop stops this many calibrations (plus a piece) short of the cap


@torch.no_grad()
def collect_hessians(args, base_model: GPT, train_files: list[str], rank: int, world_size: int,
                     device: torch.device, time_left_ms=None,
                     piece_ms: float = 0.0) -> tuple[dict, dict, dict]:
    """GPTQ's X^T X of each matrix's inputs over one step's tokens, within time_left_ms; for
    EXPORT_RULE=fisher also each output row's squared gradient of the tokens' summed loss, and
    each embedding row's loss weight on the matrices' scale (fisher_steps)."""
    linears = {f"{name}.weight": module for name, module in base_model.named_modules()
               if isinstance(module, CastedLinear)
               and is_gptq_matrix(f"{name}.weight", module.weight)}
    lookups = {f"{name}.weight": module for name, module in base_model.named_modules()
               if isinstance(module, nn.Embedding) and f"{name}.weight" in EMBEDDINGS
               } if args.export_rule == "fisher" else {}
    # Every key from the start: ranks that fed no piece still join each sum.
    hessians = {name: torch.zeros(m.in_features, m.in_features, device=device)
                for name, m in linears.items()}
    fisher = {name: torch.zeros(m.out_features, device=device) for name, m in linears.items()
              } if args.export_rule == "fisher" else {}
    fisher |= {name: torch.zeros(m.num_embeddings, device=device) for name, m in lookups.items()}
    # the tied head's rows: squared logit gradients, and its inputs' mean square, summed
    head = dict(rows=torch.zeros(base_model.tok_emb.num_embeddings, device=device),
                energy=torch.zeros(1, device=device)) if fisher else {}
    outputs = []  # (name, output, the gain folded into its rows or a lookup's ids) of a forward
    applied = dict.fromkeys(linears, 0)  # rows each matrix read: the tokens times its uses a token

    def accumulate(name: str):
        def hook(module, inputs):
            x = inputs[0].detach().flatten(0, -2).float()
            hessians[name].addmm_(x.t(), x)
            applied[name] += x.size(0)
        return hook

    def keep_output(name: str):
        def hook(module, inputs, kwargs, out):
            if name in lookups:
                outputs.append((name, out, inputs[0]))
                return
            gain = kwargs.get("out_scale", inputs[1] if len(inputs) > 1 else None)
            outputs.append((name, out, None if gain is None else gain.detach().float().view(-1)))
        return hook

    hooks = [module.register_forward_pre_hook(accumulate(name)) for name, module in linears.items()]
    if fisher:
        hooks += [module.register_forward_hook(keep_output(name), with_kwargs=True)
                  for name, module in (linears | lookups).items()]
    loader = DistributedTokenLoader(train_files, rank, world_size, device, args.data_order,
                                    args.seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def pieces():
        for _ in range(args.grad_accum_steps):
            x, y = loader.next_batch(args.micro_batch_tokens, args.train_seq_len)
            yield from zip(*(t.split(max(1, len(x) // CALIBRATION_PIECES)) for t in (x, y)))

    def feed(x: Tensor, y: Tensor):
        if not fisher:
            base_model.hidden(x)
            return
        with torch.enable_grad():  # gradients of the outputs alone: no weight's .grad is touched
            h = base_model.hidden(x)
            logits = base_model.logits(h)
            *grads, g_head = torch.autograd.grad(base_model.logits_nll(logits, y).sum(),
                                                 [out for _, out, _ in outputs] + [logits],
                                                 allow_unused=True)
        for (name, _, gain), g in zip(outputs, grads):
            if g is None:  # an output the loss does not read: no weight on its rows
                continue
            if name in lookups:  # a row's per-element mean, summed over the tokens that read it
                fisher[name].index_add_(0, gain.flatten(), g.float().square().mean(-1).flatten())
                continue
            g2 = g.float().square().flatten(0, -2).sum(0)
            fisher[name].add_(g2 if gain is None else g2 * gain.square())
        head["rows"].add_(g_head.float().square().flatten(0, -2).sum(0))
        head["energy"].add_(h.detach().float().square().mean(-1).sum())
        outputs.clear()

    def go_on(slowest_ms: float) -> bool:
        """Another piece fits: decided on the least time left and the slowest piece of all ranks,
        so every rank feeds the same pieces and none waits past the cap for another."""
        if time_left_ms is None:
            return True
        view = torch.tensor([-time_left_ms(), slowest_ms], dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(view, op=dist.ReduceOp.MAX)
        return -view[0].item() >= 2 * view[1].item()

    base_model.eval()
    tokens, slowest_ms = 0, piece_ms
    try:
        for x, y in pieces():
            if not go_on(slowest_ms):
                break
            t0 = time.perf_counter()
            feed(x, y)
            sync()
            slowest_ms = max(slowest_ms, 1000.0 * (time.perf_counter() - t0))
            tokens += x.numel()
    finally:
        for hook in hooks:
            hook.remove()
        outputs.clear()
        base_model.train()
    t0 = time.perf_counter()
    if world_size > 1:
        for sums in (hessians, fisher, head):
            for name in sorted(sums):
                dist.all_reduce(sums[name])
    if lookups:
        # The matrices' weight F_r mean(diag H) is the tokens' count times a weight's mean squared
        # gradient (uses times that, for a matrix a token uses more than once: recurrence, so
        # divided by them); a lookup's sum is the latter, and the tied head is a matrix of its own.
        for name in lookups:
            fisher[name].mul_(tokens * world_size)
        fisher["tok_emb.weight"].add_(head["rows"] * head["energy"])
        for name in linears:
            if applied[name] > tokens:
                fisher[name].mul_(tokens / applied[name])
    sync()
    reduce_ms = 1000.0 * (time.perf_counter() - t0)
    return hessians, fisher, dict(tokens=tokens, piece_ms=slowest_ms, reduce_ms=reduce_ms)


class AgreedClock:
    """The clock all ranks agree on (MAX) and the stop, read a step late so the GPU never waits;
    a NaN on any rank stops all."""

    def __init__(self, cap_ms: float, budget_ms: float, world_size: int, log):
        self.cap_ms, self.budget_ms, self.world_size, self.log = cap_ms, budget_ms, world_size, log
        self.ms, self.step = 0.0, 0  # at the last step read
        self.unread: list[tuple] = []

    def at(self, step: int) -> float:
        """The agreed clock extrapolated to step: one schedule, so one model, on all ranks."""
        return self.ms / self.step * step if self.step else 0.0

    def record(self, step: int, elapsed_ms: float, loss: Tensor) -> None:
        """Queues this step's flags without waiting."""
        flags = torch.stack((torch.full((), elapsed_ms, dtype=torch.float64, device=loss.device),
                             (~torch.isfinite(loss)).double()))
        if self.world_size > 1:  # with NCCL the stream, not the host, waits
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        copied = None
        if flags.is_cuda:
            pinned = torch.empty(2, dtype=flags.dtype, pin_memory=True)
            flags = pinned.copy_(flags, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        self.unread.append((flags, copied, step))

    def poll(self) -> bool:
        """Reads all but the newest flags; True once three more average steps reach the budget."""
        if len(self.unread) < 2:
            return False
        while len(self.unread) > 1:
            self._read(*self.unread.pop(0))
        return self.cap_ms > 0 and self.ms + 3 * self.ms / self.step >= self.budget_ms

    def finish(self) -> None:
        """Reads the flags left: a NaN in the last step stops too."""
        while self.unread:
            self._read(*self.unread.pop(0))

    def _read(self, flags: Tensor, copied, step: int) -> None:
        if copied is not None:
            copied.synchronize()
        ms, diverged = flags.tolist()
        if diverged:
            msg = (f"training loss is not finite at step {step}: stopping "
                   f"(try a lower MATRIX_LR/SCALAR_LR/TIED_EMBED_LR or GRAD_CLIP_NORM)")
            self.log(f"error: {msg}", console=False)
            raise TrainingDiverged(msg)
        self.ms, self.step = ms, step


def coda_logger(args, base_model: GPT, tokens: Tensor, log):
    """log_coda(step): coda_stats' lines on the first 4 validation sequences; every rank computes
    them alone (no collectives), rank 0 logs."""
    L = min(args.eval_seq_len, tokens.numel())
    ids = tokens[:min(4, tokens.numel() // L) * L].view(-1, L).to(base_model.tok_emb.weight.device)

    def log_coda(step: int) -> None:
        for i, s in coda_stats(base_model, ids):
            log(f"coda_stats step:{step} layer:{i} lambda_mean:{s['lambda_mean']:.5f} "
                f"lambda_max:{s['lambda_max']:.5f} theta_dev_mean:{s['theta_dev_mean']:.4f} "
                f"theta_dev_max:{s['theta_dev_max']:.4f} pre_norm_rms:{s['pre_norm_rms']:.4f} "
                f"signal_rms:{s['signal_rms']:.4f}")

    return log_coda


def train(args, model, base_model, muon, optimizers, train_files, evaluate, log, rank, world_size,
          device, log_coda=lambda step: None):
    """The loop under the cap: (steps, training ms, GPTQ's Hessians and the Fisher rule's row
    weights, each None without a calibration, the perf_counter time at which the loop ended)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run_step = lambda loader: train_step(args, model, base_model, optimizers, loader)  # noqa: E731

    finish_id_check = check_train_ids(args, train_files, rank, world_size, device)
    # Compile warm-up on real batches, then restore weights, optimizer state and data order.
    if args.warmup_steps > 0:
        t0 = time.perf_counter()
        initial_model = copy.deepcopy(base_model.state_dict())
        initial_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        loader = DistributedTokenLoader(train_files, rank, world_size, device,
                                        args.data_order, args.seed)
        for k in range(args.warmup_steps):  # the later half with recurrence: its graph too
            base_model.recurring = bool(args.recur_layers) and 2 * k >= args.warmup_steps
            run_step(loader)
        base_model.load_state_dict(initial_model)
        for opt, state in zip(optimizers, initial_opts):
            opt.load_state_dict(state)
        sync()
        log(f"warmup_steps:{args.warmup_steps} done in {time.perf_counter() - t0:.1f}s "
            f"(weights and optimizer state restored)")

    def calibrate(time_left_ms=None, piece_ms: float = 0.0) -> tuple[dict, dict, dict]:
        """collect_hessians' results, with the ms it took."""
        t0 = time.perf_counter()
        hessians, fisher, stats = collect_hessians(args, base_model, train_files, rank,
                                                   world_size, device, time_left_ms, piece_ms)
        return hessians, fisher, dict(stats, ms=1000.0 * (time.perf_counter() - t0))

    loader = DistributedTokenLoader(train_files, rank, world_size, device, args.data_order,
                                    args.seed)
    average = WeightAverage(base_model, args)
    cap_ms = 1000.0 * args.max_wallclock_seconds
    train_ms, step, stop_at, qat_on = 0.0, 0, None, False
    # GPTQ's calibration reads training data, so it runs inside the cap: timed here, reserved.
    reserved_ms, measured = 0.0, torch.zeros(3, dtype=torch.float64, device=device)
    if args.gptq and cap_ms > 0:
        calibrate()
        stats = calibrate()[2]
        measured = torch.tensor([stats["ms"], stats["piece_ms"], stats["reduce_ms"]],
                                dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(measured, op=dist.ReduceOp.MAX)
        # One piece and one reduce more than it took: the deadline checks leave that much.
        reserved_ms = GPTQ_MARGIN * (measured[0] + measured[1] + measured[2]).item()
    budget_ms = cap_ms - reserved_ms
    clock = AgreedClock(cap_ms, budget_ms, world_size, log)
    base_model.recurring, recur_from = False, None  # (step, ms) where recurrence came on
    finish_id_check()
    if world_size > 1:
        dist.barrier()  # start the clocks together
    sync()
    t0 = time.perf_counter()
    while True:
        last_step = step == args.iterations or step == stop_at
        if last_step or (args.val_loss_every > 0 and step > 0 and step % args.val_loss_every == 0):
            sync()
            ended = time.perf_counter()  # at the last step, the evaluation's clock starts here
            train_ms += 1000.0 * (ended - t0)
            val_loss, val_bpb, _, _ = evaluate()
            log(f"step:{step}/{args.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
            sync()
            t0 = time.perf_counter()
        if last_step:
            break
        scale = lr_scale(args, step, clock.at(step), budget_ms)
        warmup = args.muon_momentum_warmup_steps
        frac = min(step / warmup, 1.0) if warmup else 1.0
        for group in muon.param_groups:
            group["momentum"] = ((1 - frac) * args.muon_momentum_warmup_start
                                 + frac * args.muon_momentum)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        left = (scale - args.lr_floor) / (1.0 - args.lr_floor)  # the warmdown's share left
        if args.late_qat > 0 and left < args.late_qat and not qat_on:
            base_model.set_qat(True)
            qat_on = True
            log(f"late_qat: int6 fake quantization on from step {step} (lr scale {scale:.3f})")
        share = step / max(args.iterations, 1)  # of training done; under a cap, the agreed clock's
        share = max(share, clock.at(step) / max(budget_ms, 1e-9)) if cap_ms > 0 else share
        if args.recur_layers and recur_from is None and share >= args.recur_start:
            base_model.recurring = True
            recur_from = (step, train_ms + 1000.0 * (time.perf_counter() - t0))
            log(f"recurrence: layers {layer_list(args.recur_layers)} run twice from step "
                f"{step} ({100 * share:.1f}% of training)")
        train_loss = run_step(loader)
        step += 1
        average.update(step, scale)
        elapsed_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
        clock.record(step, elapsed_ms, train_loss)
        stop = clock.poll()
        if args.train_log_every > 0 and (step <= 10 or step % args.train_log_every == 0 or stop):
            log(f"step:{step}/{args.iterations} train_loss:{train_loss.item():.4f} "
                f"train_time:{elapsed_ms:.0f}ms step_avg:{elapsed_ms / step:.2f}ms")
            if args.coda_stats and step % args.train_log_every == 0 and not (
                    stop or step == args.iterations):  # the last step's come after the loop
                log_coda(step)
        if stop and stop_at is None:
            stop_at = step
    clock.finish()
    base_model.set_qat(False)  # evaluations and export see the plain weights
    if recur_from is not None and step > recur_from[0]:  # its step cost, from the run itself
        before = recur_from[1] / recur_from[0] if recur_from[0] else float("nan")
        log(f"recurrence: step_avg {before:.2f}ms before step {recur_from[0]}, "
            f"{(train_ms - recur_from[1]) / (step - recur_from[0]):.2f}ms from it")
    if args.recur_layers and recur_from is None:  # as the artifact will be loaded
        base_model.recurring = True
        log("recurrence: the run ended before RECUR_START; evaluated and exported with it on")
    log_coda(step)
    log(f"weights for export: {average.apply()}")
    if not args.gptq:
        return step, train_ms, None, None, ended
    started, (_, piece_ms, reduce_ms) = time.perf_counter(), measured.tolist()

    def time_left_ms() -> float:
        return cap_ms - train_ms - 1000.0 * (time.perf_counter() - started) - 2 * reduce_ms

    hessians, fisher, stats = calibrate(time_left_ms if cap_ms > 0 else None, piece_ms)
    tokens = torch.tensor([stats["tokens"]], device=device)
    total_ms = torch.tensor([train_ms + stats["ms"]], dtype=torch.float64, device=device)
    if world_size > 1:  # all ranks' tokens; the slowest rank's clock
        dist.all_reduce(tokens)
        dist.all_reduce(total_ms, op=dist.ReduceOp.MAX)
    log(f"gptq_calibration: {tokens.item()} tokens in {stats['ms']:.0f}ms "
        f"(reserved {reserved_ms:.0f}ms), training time with it {total_ms.item():.0f}ms"
        + (f" of {cap_ms:.0f}ms" if cap_ms > 0 else ""))
    if tokens.item() == 0:  # no time left for any piece: the export rounds
        log("gptq_calibration: no time left inside the cap; exporting without GPTQ")
        return step, train_ms, None, None, ended
    return step, train_ms, hessians, fisher, ended


def check_inputs(args: Hyperparameters):
    """Finds bad input before anything is written; returns what the run reads."""
    if zstandard is None:
        raise ConfigError("the zstandard package is missing: pip install zstandard")
    if not os.path.isfile(args.tokenizer_path):
        raise ConfigError(f"TOKENIZER_PATH={args.tokenizer_path}: no such file ({DOWNLOAD_HINT})")
    try:
        sp = spm.SentencePieceProcessor(model_file=args.tokenizer_path)
    except (OSError, RuntimeError):
        raise ConfigError(
            f"TOKENIZER_PATH={args.tokenizer_path}: not a sentencepiece model") from None
    if sp.vocab_size() != args.vocab_size:
        raise ConfigError(f"VOCAB_SIZE={args.vocab_size} differs from the tokenizer's "
                          f"{sp.vocab_size()} ({args.tokenizer_path})")
    least, why = ((args.train_seq_len + 1, " (DATA_ORDER=strided: one block of TRAIN_SEQ_LEN + 1)")
                  if args.data_order == "strided" else (1, ""))
    train_files = [] if args.load_artifact else find_shards(args.data_path, "train", least, why)
    shards = {}  # each shard opened once: a strided warm-up reads thousands of pieces
    for path, start, end in read_before_clock(args, train_files):  # all: check_train_ids
        if path not in shards:
            shards[path] = load_shard(path)
        check_ids(path, shards[path][start:end], args.vocab_size)
    val_tokens = load_validation_tokens(find_shards(args.data_path, "val", 2), args.vocab_size)
    artifact_dir = os.path.dirname(args.artifact_path) or "."
    if not os.path.isdir(artifact_dir):
        raise ConfigError(f"ARTIFACT_PATH={args.artifact_path}: its directory does not exist")
    if os.path.isdir(args.artifact_path):
        raise ConfigError(
            f"ARTIFACT_PATH={args.artifact_path}: is a directory, expected a file name")
    if int(os.environ.get("RANK", 0)) == 0:  # rank 0 writes log and artifact: fail now
        if os.path.lexists("logs") and not os.path.isdir("logs"):
            raise ConfigError(f"logs: {os.path.abspath('logs')} is not a directory "
                              f"(the run logs go there)")
        probe_writable("logs" if os.path.isdir("logs") else ".", "logs/ (the run's log)")
        if not args.load_artifact:
            probe_writable(artifact_dir, f"ARTIFACT_PATH={args.artifact_path}")
            free = shutil.disk_usage(artifact_dir).free
            if free < args.artifact_limit_bytes:
                raise ConfigError(f"ARTIFACT_PATH={args.artifact_path}: {free} bytes free on its "
                                  f"disk, the artifact needs up to "
                                  f"ARTIFACT_LIMIT_BYTES={args.artifact_limit_bytes}")
    loaded = read_artifact(args.load_artifact, args.shape) if args.load_artifact else None
    return sp, train_files, val_tokens, loaded


def probe_writable(directory: str, what: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write_probe")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"{what}: cannot write in {os.path.abspath(directory)} ({e.strerror})") from None


class ArtifactLock:
    """A lock beside the artifact for the run: two runs must not score each other's file."""

    def __init__(self, path: str, exclusive: bool, variable: str):
        self.path = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.lock")
        while True:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:  # an unwritable folder: the artifact will fail too
                self.fd = None
                return
            try:
                mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
                fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                raise ConfigError(f"{variable}={path}: another run is using this artifact now "
                                  f"(it holds {self.path})") from None
            try:  # its last holder may have removed it since the open
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    return
            except FileNotFoundError:
                pass
            os.close(self.fd)

    def __enter__(self) -> "ArtifactLock":
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:  # the file goes only when no other run holds it
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def setup_distributed(world_size: int) -> tuple[int, torch.device]:
    """torchrun's rank (0 without torchrun); NCCL on GPUs, gloo on CPU."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return rank, device


def agree_on_inputs(args, train_files: list[str], val_tokens: Tensor,
                    weights: dict[str, Tensor] | None, world_size: int, device: torch.device):
    """Every rank listed and read its inputs alone: a shard that appeared between two ranks'
    listings (a download still running) would have them read different streams, unreported.
    The weights are hashed as loaded, not read again: a file replaced since would pass."""
    if world_size == 1:
        return
    digest = hashlib.blake2b(digest_size=7)
    for path in train_files:
        digest.update(f"{os.path.basename(path)}:{shard_num_tokens(path)};".encode())
    digest.update(val_tokens.numpy())
    for name, t in sorted((weights or {}).items()):
        digest.update(name.encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    mine = int.from_bytes(digest.digest(), "little")
    seen = torch.tensor([mine, -mine], dtype=torch.int64, device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    if seen[0].item() != -seen[1].item():
        raise ConfigError(f"the ranks read different inputs (DATA_PATH={args.data_path}"
                          + (f", LOAD_ARTIFACT={args.load_artifact}" if args.load_artifact else "")
                          + "): were files still being written? Start again once they are")


def make_evaluate(args, base_model: GPT, sp, tokens: Tensor, compile_fn, log, rank: int, device):
    """evaluate(stride, ttt) -> (loss, bpb, targets, bytes), always of the same targets."""
    nll_fn = compile_fn(base_model.token_nll, dynamic=False)
    luts, tokens = build_byte_luts(sp, device), tokens.to(device)  # one copy for all
    evaluators: dict[int, Evaluator] = {}
    counted: list[tuple[int, int]] = []
    lora_fn: list = []

    def evaluate(stride: int | None = None, ttt: bool = False,
                 spent: float = 0.0) -> tuple[float, float, int, int]:
        stride = stride or args.eval_seq_len
        if stride not in evaluators:
            evaluators[stride] = Evaluator(tokens, args.eval_seq_len, stride, luts, device, rank,
                                           args.world_size)
        base_model.eval()
        if ttt and args.ttt_mode == "lora":
            if not lora_fn:  # its own graph: the adapters are inputs and need gradients
                lora_fn.append(compile_fn(base_model.token_nll, dynamic=False))
            result = doc_test_time_train(evaluators[stride], base_model, lora_fn[0], args, log,
                                         sp.bos_id(), spent)[0]
        elif ttt:
            result = test_time_train(evaluators[stride], stride, base_model, nll_fn, args, log,
                                     spent)[0]
        else:
            result = evaluators[stride](nll_fn)
        base_model.train()
        if not counted:
            counted.append(result[2:])
            log(f"val_tokens:{result[2]} val_bytes:{result[3]}")
        elif result[2:] != counted[0]:
            raise RuntimeError(
                f"evaluation counted {result[2:]} targets/bytes, earlier {counted[0]}")
        return result

    return evaluate


def export(args, base_model: GPT, log, rank: int, code_bytes: int,
           hessians: dict[str, Tensor] | None, fisher: dict[str, Tensor] | None = None) -> bytes:
    """Rank 0 writes the artifact, filling what the code leaves of the limit; the sha256 on every
    rank."""
    if rank == 0:
        state = base_model.state_dict()
        if hessians is not None:  # a hook that never fired: refuse, not round silently
            missing = [name for name, t in state.items()
                       if is_gptq_matrix(name, t) and name not in hessians]
            if missing:
                raise RuntimeError(f"GPTQ calibration saw no inputs for {missing}")
        budget = args.artifact_limit_bytes - code_bytes
        compress = cached_zstd22()  # the write reuses the frames the fitting compressed
        packed = quantize_state(state, budget, hessians, args.shape, compress, args.export_rule,
                                fisher)
        written = write_artifact(args.artifact_path, packed, args.shape, compress)
        kinds = [v[0] for v in packed.values()]
        log(f"export: int6 matrices:{kinds.count('int6')} int5 matrices:{kinds.count('int5')} "
            f"int8 embeddings:{kinds.count('int8')} budget:{budget} "
            f"bytes:{os.path.getsize(args.artifact_path)}")
        digest = torch.tensor(list(written), dtype=torch.uint8)
    else:
        digest = torch.zeros(32, dtype=torch.uint8)
    if args.world_size > 1:  # every rank checks the file it scores is this one
        digest = digest.to(base_model.tok_emb.weight.device)
        dist.broadcast(digest, 0)
    return bytes(digest.tolist())


def final_evaluation(args, base_model: GPT, evaluate, artifact_path: str, weights,
                     code_bytes: int, log, digest: bytes | None = None,
                     t_eval: float | None = None) -> dict:
    """Scores the file on disk whose sha256 is digest: the artifact alone decides. t_eval: when
    the evaluation's clock started (the end of training; default now), which TTT_MAX_SECONDS
    and the evaluation_time line count from."""
    t_eval = time.perf_counter() if t_eval is None else t_eval
    model_bytes = os.path.getsize(artifact_path)
    log(f"Serialized model int6+zstd: {model_bytes} bytes")
    log(f"Code size: {code_bytes} bytes")
    log(f"Total submission size int6+zstd: {model_bytes + code_bytes} bytes")
    if weights is None:
        weights = read_artifact(artifact_path, args.shape, "ARTIFACT_PATH", digest)
    base_model.load_state_dict(weights)
    val_loss, val_bpb, _, _ = evaluate()
    log(f"final_int6_roundtrip_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
    result = dict(roundtrip_val_bpb=val_bpb, bytes_total=model_bytes + code_bytes,
                  bytes_model_int6_zstd=model_bytes, bytes_code=code_bytes,
                  score="final_int6_roundtrip_exact", ttt_val_loss=None, ttt_val_bpb=None)
    if args.eval_stride > 0:
        t0 = time.perf_counter()
        val_loss, val_bpb, _, _ = evaluate(args.eval_stride)
        log(f"final_int6_sliding_window_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
        log(f"sliding_window_eval stride:{args.eval_stride} time:{time.perf_counter() - t0:.1f}s")
        result.update(score="final_int6_sliding_window_exact")
    if args.ttt_enabled:  # last: it trains the model
        val_loss, val_bpb, _, _ = evaluate(args.eval_stride, ttt=True,
                                           spent=time.perf_counter() - t_eval)
        log(f"legal_ttt_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
        result.update(score="legal_ttt_exact", ttt_val_loss=val_loss, ttt_val_bpb=val_bpb)
    log(f"evaluation_time:{time.perf_counter() - t_eval:.1f}s")
    return dict(result, val_loss=val_loss, val_bpb=val_bpb)


def write_report(args, report: dict, log, rank: int) -> int:
    """Writes logs/{RUN_ID}.json; the exit status: 3 when over the limit."""
    if rank == 0:
        write_atomic(f"logs/{args.run_id}.json", (json.dumps(report, indent=2) + "\n").encode())
    excess = report["bytes_total"] - args.artifact_limit_bytes
    if excess > 0:
        log(f"error: total submission size {report['bytes_total']} bytes exceeds "
            f"ARTIFACT_LIMIT_BYTES={args.artifact_limit_bytes} by {excess} bytes "
            f"(artifact kept at {report['artifact']})")
        return 3
    return 0


def run(held: ExitStack) -> int:
    """The whole run; held keeps the artifact's lock until the end."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    args = Hyperparameters(world_size)
    sp, train_files, val_tokens, weights = check_inputs(args)
    if int(os.environ.get("RANK", 0)) == 0:
        held.enter_context(ArtifactLock(args.load_artifact, False, "LOAD_ARTIFACT")
                           if args.load_artifact
                           else ArtifactLock(args.artifact_path, True, "ARTIFACT_PATH"))
    rank, device = setup_distributed(world_size)
    agree_on_inputs(args, train_files, val_tokens, weights, world_size, device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    log = RunLog(args.run_id, rank == 0)
    cuda = device.type == "cuda"
    log_environment(log, cuda)
    kernel = choose_attention(args, device)
    log(f"run_id:{args.run_id} world_size:{world_size} grad_accum_steps:{args.grad_accum_steps} "
        f"device:{device.type} attention:{kernel} "
        f"torch:{torch.__version__}")
    config = " ".join(f"{k}={v}" for k, v in vars(args).items() if k != "world_size")
    log("config: " + config, console=False)
    base_model = build_model(args, device)
    log(f"model_params:{sum(p.numel() for p in base_model.parameters())} "
        f"xsa_layers:{[i for i, b in enumerate(base_model.blocks) if b.attn.xsa]} "
        f"coda_layers:{[i for i, b in enumerate(base_model.blocks) if b.attn.coda]} "
        f"ve_layers:{[i for i, b in enumerate(base_model.blocks) if b.attn.ve_scale is not None]}")
    compile_fn = torch.compile if cuda else (lambda fn, **kw: fn)
    evaluate = make_evaluate(args, base_model, sp, val_tokens, compile_fn, log, rank, device)
    report = dict(seed=args.seed, step=0, step_avg_ms=None, pre_quant_val_bpb=None,
                  artifact=args.load_artifact or args.artifact_path)
    code_bytes, digest = os.path.getsize(__file__), None
    t_eval = None  # the evaluation's clock: from the loop's end, else final_evaluation's start

    if weights is None:  # train, average, export
        model = compile_fn(base_model, dynamic=False)
        if world_size > 1:
            model = DDP(model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)
        muon, optimizers = make_optimizers(base_model, args,
                                           compile_fn(newton_schulz, dynamic=False))
        steps, train_ms, hessians, fisher, t_eval = train(  # t_eval: when the loop ended
            args, model, base_model, muon, optimizers, train_files, evaluate, log, rank,
            world_size, device, coda_logger(args, base_model, val_tokens, log))
        if cuda:
            log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
        pre_loss, pre_bpb, _, _ = evaluate()
        log(f"pre_quant_average val_loss:{pre_loss:.8f} val_bpb:{pre_bpb:.8f}")
        report.update(step=steps, step_avg_ms=round(train_ms / max(steps, 1), 2),
                      pre_quant_val_bpb=pre_bpb)
        digest = export(args, base_model, log, rank, code_bytes, hessians, fisher)
    report.update(final_evaluation(args, base_model, evaluate, report["artifact"], weights,
                                   code_bytes, log, digest, t_eval=t_eval))
    return write_report(args, report, log, rank)


class Interrupted(BaseException):  # not Exception: torch.compile catches and drops those
    """SIGINT or SIGTERM, raised where the run is: the way out cleans up."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}; "
                         f"no artifact or report was half-written")
        self.exit_code = 128 + signum


def interrupt(signum: int, frame) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not break the clean-up
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def main() -> None:
    master = int(os.environ.get("RANK", 0)) == 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        with sdpa_kernel(SDPA_BACKENDS, set_priority=True), ExitStack() as held:
            code = run(held)
    except (ConfigError, TrainingDiverged, Interrupted) as e:  # exit 2, 4, 128 + signal
        code = (2 if isinstance(e, ConfigError) else 4 if isinstance(e, TrainingDiverged)
                else e.exit_code)
        if master:
            print(f"error: {e}", file=sys.stderr, flush=True)
    try:
        if dist.is_available() and dist.is_initialized():
            if code in (0, 3, 4):  # exits all ranks reach: none may leave before rank 0's last line
                dist.barrier()  # (a bad input may be one rank's alone)
            dist.destroy_process_group()
    except Interrupted as e:  # a signal while waiting for the other ranks: no traceback either
        code = e.exit_code
    sys.exit(code)


if __name__ == "__main__":
    main()
