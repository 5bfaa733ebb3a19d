r"""Where a training step's milliseconds go, on one GPU, at the configuration the environment sets.

    DATA_PATH=... TOKENIZER_PATH=... TRAIN_BATCH_TOKENS=98304 GRAD_ACCUM_STEPS=1 \
        python tools/profile_step.py

TRAIN_GPT=path/to/train_gpt.py profiles another version of the script (e.g. an older commit's copy,
to compare two versions back to back on one machine); the default is this repository's.

Prints: the layers XSA, CoDA and value embeddings act on; the mean step time with and without a host
sync after every step (the training loop reads its stop flags one step late, so it runs like the
second figure); peak memory; the top CUDA kernels of a torch.profiler trace of a few steps, in ms
per step, each generated (Triton) kernel followed by the source nodes and the launch line inductor
wrote for it; and the time of one Muon step of this script (batched by shape) against
torch.optim.Muon (one matrix at a time). PROFILE_MUON=0 skips the Muon comparison; PROFILE_TOP=N
lists N kernels (default 25). With RECUR_LAYERS set, every step is timed with the recurrence on (as
after RECUR_START) and the passes are printed; the steps before the switch cost what the same run
without RECUR_LAYERS costs.
"""
import importlib.util
import inspect
import os
import sys
import time

import torch

_script = os.environ.get("TRAIN_GPT") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_gpt.py")
_spec = importlib.util.spec_from_file_location("train_gpt", _script)
tg = sys.modules["train_gpt"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tg)


def token_loader(files: list[str], vocab_size: int, rank: int, world_size: int,
                 device: torch.device, args=None):
    """The script's DistributedTokenLoader (older copies took vocab_size as well; newer ones
    DATA_ORDER and SEED, from args when given)."""
    params = inspect.signature(tg.DistributedTokenLoader).parameters
    takes_vocab = "vocab_size" in params
    order = (args.data_order, args.seed) if args is not None and "order" in params else ()
    return tg.DistributedTokenLoader(files, *[vocab_size][:takes_vocab], rank, world_size, device,
                                     *order)


def timed_steps(step, n: int, host_sync: bool) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        loss = step()
        if host_sync:
            loss.item()
    torch.cuda.synchronize()
    return 1000.0 * (time.perf_counter() - t0) / n


def inductor_call_site(kernel: str) -> list[str]:
    """The 'Source Nodes' comment and the launch line inductor wrote for a generated kernel,
    searched in the output code this process compiled or loaded (the on-disk cache holds other
    runs' kernels of the same name)."""
    from torch._inductor.codecache import PyCodeCache
    for path in sorted({m.__file__ for m in PyCodeCache.modules if getattr(m, "__file__", None)}):
        with open(path) as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith(f"{kernel}.run("):
                notes = [x.strip()[:300] for x in lines[max(0, i - 4):i] if "Source Nodes" in x]
                return notes[-1:] + [line.strip()[:300]]
    return []


def main() -> None:
    args = tg.Hyperparameters(1)
    device = torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    base = tg.build_model(args, device)
    # What the environment asked for, as the model built it (CODA_ENABLED=1 overrides CODA_LAST_N,
    # say); the same lists as the script's model_params line, read from the blocks so older copies
    # work too.
    print(f"{os.path.basename(_script)}: "
          f"xsa_layers:{[i for i, b in enumerate(base.blocks) if b.attn.xsa]} "
          f"coda_layers:{[i for i, b in enumerate(base.blocks) if b.attn.coda]} "
          f"ve_layers:{[i for i, b in enumerate(base.blocks) if b.attn.ve_scale is not None]}")
    if getattr(base, "recurring", False):
        print(f"recurrent steps: block passes {tg.layer_list(base.recur_order)}")
    model = torch.compile(base, dynamic=False)
    muon, optimizers = tg.make_optimizers(base, args,
                                          torch.compile(tg.newton_schulz, dynamic=False))
    loader = token_loader(tg.find_shards(args.data_path, "train", 1), args.vocab_size, 0, 1, device,
                          args)
    step = lambda: tg.train_step(args, model, base, optimizers, loader)  # noqa: E731
    timed_steps(step, 15, True)  # compile and warm up
    print(f"step_ms with per-step host sync: {timed_steps(step, 30, True):.2f}")
    print(f"step_ms without host sync:       {timed_steps(step, 30, False):.2f}")

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed_steps(step, 5, True)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    # Annotations (e.g. Optimizer.step#Muon.step) span kernels that are also listed on their own.
    total = sum(e.self_device_time_total for e in kernels
                if not getattr(e, "is_user_annotation", False))
    print(f"GPU time per step: {total / 5e3:.2f} ms; top kernels (ms per step, launches per step):")
    for e in kernels[:int(os.environ.get("PROFILE_TOP", 25))]:
        print(f"{e.self_device_time_total / 5e3:8.3f} {e.count / 5:5.1f}  {e.key[:150]}")
        if e.key.startswith("triton_"):
            for line in inductor_call_site(e.key):
                print(f"{'':16}{line}")

    print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if os.environ.get("PROFILE_MUON", "1") == "0":
        return
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
