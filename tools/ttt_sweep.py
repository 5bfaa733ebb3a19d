"""Several test-time-training settings scored on one artifact, in one process.

    LOAD_ARTIFACT=final_model.int6.ptz TTT_ENABLED=0 \
    TTT_SWEEP="TTT_EPOCHS=3; TTT_EPOCHS=5 TTT_LR=0.01; TTT_FREEZE_BLOCKS=2" \
    torchrun --standalone --nproc_per_node=1 tools/ttt_sweep.py

Runs train_gpt.py as the environment sets it (training too, without LOAD_ARTIFACT). After its final
evaluation, for each `;`-separated setting of TTT_* variables (applied over the run's own), the
artifact's weights are read back from the file and scored by legal score-first TTT, one line each:

    ttt_sweep SETTING val_loss:X val_bpb:X delta:X time:Ys [peak_memory:ZMiB, on a GPU]

delta is against the run's final_int6_sliding_window_exact (so run it with TTT_ENABLED=0). The
compiled graphs are shared, so each setting costs its TTT time alone, not a compile and a sliding
evaluation. Every setting is checked before anything runs: a bad one exits 2 like the run would.
A setting that reaches TTT_MAX_SECONDS (450 by default) logs `ttt_eval: training stopped ...` above
its line, and its score is then not the setting's own: compare settings with TTT_MAX_SECONDS=0.
"""
import contextlib
import importlib.util
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("train_gpt", os.path.join(ROOT, "train_gpt.py"))
tg = sys.modules["train_gpt"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tg)


@contextlib.contextmanager
def environment(overrides: dict):
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def parse_sweep(text: str) -> list[tuple[str, dict]]:
    """[(label, {TTT_VAR: value})]; ConfigError on anything but TTT_* assignments."""
    settings = []
    for part in text.split(";"):
        words = shlex.split(part)
        if not words:
            continue
        pairs = [w.partition("=") for w in words]
        bad = [w for w, (k, eq, v) in zip(words, pairs)
               if not (eq and v and k.startswith("TTT_") and k != "TTT_ENABLED")]
        if bad:
            raise tg.ConfigError(f"TTT_SWEEP: {bad[0]!r}: expected TTT_NAME=VALUE "
                                 f"(TTT_ENABLED is implied)")
        settings.append((" ".join(words), {k: v for k, _, v in pairs}))
    if not settings:
        raise tg.ConfigError("TTT_SWEEP: expected at least one setting, e.g. 'TTT_EPOCHS=5'")
    return settings


def ttt_fields(overrides: dict, world_size: int) -> dict:
    """The run's TTT fields with overrides applied, checked as the run checks them."""
    with environment(dict(overrides, TTT_ENABLED="1")):
        args = tg.Hyperparameters(world_size)
    return {k: v for k, v in vars(args).items() if k.startswith("ttt_")}


def final_evaluation(args, base_model, evaluate, artifact_path, weights, code_bytes, log,
                     digest=None, t_eval=None):
    result = real_final_evaluation(args, base_model, evaluate, artifact_path, weights,
                                   code_bytes, log, digest, t_eval)
    sliding = result["val_bpb"] if result["score"] == "final_int6_sliding_window_exact" else None
    cuda = base_model.tok_emb.weight.is_cuda
    for label, overrides in SETTINGS:
        vars(args).update(ttt_fields(overrides, args.world_size))
        base_model.load_state_dict(tg.read_artifact(artifact_path, args.shape, "ttt_sweep", digest))
        t0 = time.perf_counter()
        if cuda:
            tg.torch.cuda.reset_peak_memory_stats()
        loss, bpb, _, _ = evaluate(args.eval_stride, ttt=True)
        delta = f"{bpb - sliding:.8f}" if sliding is not None else "n/a"
        peak = f" peak_memory:{tg.torch.cuda.max_memory_allocated() >> 20}MiB" if cuda else ""
        log(f"ttt_sweep {label} val_loss:{loss:.8f} val_bpb:{bpb:.8f} delta:{delta} "
            f"time:{time.perf_counter() - t0:.1f}s{peak}")
    return result


def check() -> None:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    for _, overrides in SETTINGS:
        ttt_fields(overrides, world_size)
    if tg.Hyperparameters(world_size).eval_stride <= 0:
        raise tg.ConfigError("TTT_SWEEP: needs EVAL_STRIDE > 0 (TTT scores by sliding window)")


real_final_evaluation = tg.final_evaluation
tg.final_evaluation = final_evaluation

if __name__ == "__main__":
    try:
        SETTINGS = parse_sweep(os.environ.get("TTT_SWEEP", ""))
        check()
    except tg.ConfigError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    tg.main()
