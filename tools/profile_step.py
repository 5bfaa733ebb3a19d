"""Where a training step's milliseconds go, on one GPU, at the configuration the environment sets.

    DATA_PATH=... TOKENIZER_PATH=... TRAIN_BATCH_TOKENS=98304 GRAD_ACCUM_STEPS=1 python tools/profile_step.py

Prints: the mean step time with and without a host sync after every step (the training loop reads its
stop flags one step late, so it runs like the second figure); the top CUDA kernels of a torch.profiler trace of a few steps; and the time of one
Muon step of this script (batched by shape) against torch.optim.Muon (one matrix at a time).
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def timed_steps(step, n: int, host_sync: bool) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        loss = step()
        if host_sync:
            loss.item()
    torch.cuda.synchronize()
    return 1000.0 * (time.perf_counter() - t0) / n


def main() -> None:
    args = tg.Hyperparameters(1)
    device = torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    base = tg.build_model(args, device)
    model = torch.compile(base, dynamic=False)
    muon, optimizers = tg.make_optimizers(base, args, torch.compile(tg.newton_schulz, dynamic=False))
    loader = tg.DistributedTokenLoader(tg.find_shards(args.data_path, "train", 1), args.vocab_size, 0, 1, device)
    step = lambda: tg.train_step(args, model, base, optimizers, loader)  # noqa: E731
    timed_steps(step, 15, True)  # compile and warm up
    print(f"step_ms with per-step host sync: {timed_steps(step, 30, True):.2f}")
    print(f"step_ms without host sync:       {timed_steps(step, 30, False):.2f}")

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed_steps(step, 5, True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=35, max_name_column_width=70))

    # Muon: this script's batched update against torch.optim.Muon on the same matrices.
    for p in muon.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    ref = torch.optim.Muon(muon.param_groups[0]["params"], lr=0.01, momentum=0.95, nesterov=True,
                           adjust_lr_fn="original")
    for name, opt in (("train_gpt.Muon (batched)", muon), ("torch.optim.Muon", ref)):
        for _ in range(5):
            opt.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            opt.step()
        torch.cuda.synchronize()
        print(f"{name}: {1000.0 * (time.perf_counter() - t0) / 20:.2f} ms per step")


if __name__ == "__main__":
    with tg.sdpa_kernel(tg.SDPA_BACKENDS, set_priority=True):
        main()
