"""XSA's Triton kernels against the torch expression Inductor compiles, on one GPU, at one rank's
record shape.

    python tools/bench_xsa.py  # B=48 T=2048 Hkv=4 G=2 D=64, bf16 (another: XSA_SHAPE=B,T,Hkv,G,D)

TRAIN_GPT=path benches another copy of the script that has the kernels, loaded as
tools/profile_step.py loads it.

Prints each kernel's error against a float64 reference (output, grad of y, grad of v, relative to
the largest reference value), and the forward and forward+backward times of: Inductor's compiled
reference (what the script ran before the kernels), and the kernels at several rows per program.
"""
import os

import torch
from triton.testing import do_bench

# the script (or TRAIN_GPT's copy), loaded the way the profile tool loads it
from profile_step import tg


def main() -> None:
    B, T, Hkv, G, D = map(int, os.environ.get("XSA_SHAPE", "48,2048,4,2,64").split(","))
    torch.manual_seed(0)
    y = torch.randn(B, T, Hkv, G, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(y)

    y64, v64 = y.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    ref = tg.exclusive_reference(y64, v64)
    ref_grads = torch.autograd.grad(ref, (y64, v64), grad.double())
    out = tg.xsa_kernel(y, v)
    grads = torch.autograd.grad(out, (y, v), grad)
    for name, a, b in (("out", out, ref), ("grad_y", grads[0], ref_grads[0]),
                       ("grad_v", grads[1], ref_grads[1])):
        print(f"kernel {name}: dtype {a.dtype}, max error "
              f"{((a.double() - b).abs().max() / b.abs().max()).item():.2e} of the largest value")
    del y64, v64, ref, ref_grads

    # bytes a forward must move: read y and v, write the output
    moved = 2 * (2 * y.numel() + v.numel())

    def report(name: str, fn) -> None:
        fwd = do_bench(lambda: fn(y, v))
        both = do_bench(lambda: torch.autograd.grad(fn(y, v), (y, v), grad))
        print(f"{name:24} forward {fwd * 1e3:7.1f} us ({moved / fwd / 1e9:5.2f} TB/s)   "
              f"forward+backward {both * 1e3:7.1f} us")

    report("inductor (reference)",
           torch.compile(lambda y, v: tg.exclusive_reference(y, v).to(y.dtype), dynamic=False))
    default_rows = tg.XSA_ROWS
    for rows in (16, 32, 64, 128):
        tg.XSA_ROWS = rows  # read at each launch; a new value compiles the kernels anew
        report(f"triton XSA_ROWS={rows}", tg.xsa_kernel)
    tg.XSA_ROWS = default_rows


if __name__ == "__main__":
    main()
