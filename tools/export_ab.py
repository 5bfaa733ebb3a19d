"""The export's packing rules side by side on the same trained weights, in one process.

    OLD_TRAIN_GPT=old/train_gpt.py torchrun --standalone --nproc_per_node=1 tools/export_ab.py

Runs train_gpt.py as the environment sets it (one rank). Between its export and its final
evaluation, the trained state is also packed by each rule below, written to disk and scored from the
file's dequantized weights (the plain roundtrip evaluation, no sliding window), one line each:

    export_ab rule:NAME int6:N int5:N bytes:FILE_BYTES roundtrip val_bpb:X gap:X-PRE

- `fisher`, `fill`, `rate`: this script's quantize_state at its budget by each EXPORT_RULE (the
  run's artifact holds the one EXPORT_RULE names; `fisher` falls back to `fill` unless the run
  calibrated with EXPORT_RULE=fisher, the default);
- `old`: OLD_TRAIN_GPT's quantize_state (when set) called as that script called it, at 0.985 of
  the budget (a margin for zstd), packed into this script's file format;
- `int6`: every matrix at int6, each row at its clip of least error, whatever its size;
- `fisher_format1`, `fisher_format2`: `fisher` sized and written in the artifact's format 1
  (each tensor a zstd frame, rows in their own order) or 2 (rows by scale), where the script
  writes format 3 (int5/int6 codes by rANS): what each format buys;
- `fisher_calN` (N a positive integer): `fisher` from a calibration of N steps' tokens (N
  micro-batches a rank, the first the run's own), taken again on the trained weights after the
  run: what a larger calibration buys (the record's one step on 8 GPUs is the proxy's 8);
- `fisher_matrices`: `fisher` with the embeddings left out of the rule (int8 at their absmax
  step, as before the rule weighed their rows);
- `fisher_diag`: `fisher_matrices` with each matrix priced by mean(diag H) instead of GPTQ's
  energy (gptq_energy): the rule as it was before both.

EXPORT_AB_RULES=fisher,fill picks and orders the rules (default: fisher, fill, rate, int6 and
old).

The run then goes on to its own evaluation of its artifact. With EVAL_STRIDE=0 TTT_ENABLED=0 the
A/B costs little more than the training.
"""
import copy
import functools
import importlib.util
import inspect
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tg = load(os.path.join(ROOT, "train_gpt.py"), "train_gpt")
seen = {}


def export(args, base_model, log, rank, code_bytes, hessians, fisher=None):
    seen.update(args=args, code_bytes=code_bytes, hessians=hessians, fisher=fisher,
                state={k: v.detach().clone() for k, v in base_model.state_dict().items()})
    return real_export(args, base_model, log, rank, code_bytes, hessians, fisher)


def train(*args, **kwargs):
    seen["train"] = inspect.signature(real_train).bind(*args, **kwargs).arguments
    return real_train(*args, **kwargs)


def calibrated(args, steps: int):
    """Hessians and Fisher sums of the run's calibration, over `steps` steps' tokens."""
    at = seen["train"]
    at["base_model"].load_state_dict(seen["state"])  # the trained weights, not the last rule's
    longer = copy.copy(args)
    longer.grad_accum_steps *= steps
    longer.train_batch_tokens *= steps
    hessians, fisher, _ = tg.collect_hessians(longer, at["base_model"], at["train_files"],
                                              at["rank"], at["world_size"], at["device"])
    return dict(hessians=hessians, fisher=fisher)


def final_evaluation(args, base_model, evaluate, artifact_path, weights, code_bytes, log,
                     digest=None, t_eval=None):
    if seen and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        state, hessians = seen["state"], seen["hessians"]
        budget = args.artifact_limit_bytes - code_bytes
        pre = evaluate()[1]
        base_model.load_state_dict(state)
        rules = {rule: lambda rule=rule: tg.quantize_state(state, budget, hessians, args.shape,
                                                           rule=rule, fisher=seen["fisher"])
                 for rule in tg.EXPORT_RULES}
        rules["int6"] = lambda: tg.quantize_state(state, float("inf"), hessians, args.shape)
        rules["fisher_format1"] = rules["fisher_format2"] = rules["fisher"]  # format: below
        matrices = {n: f for n, f in (seen["fisher"] or {}).items() if n not in tg.EMBEDDINGS}
        rules["fisher_matrices"] = lambda: tg.quantize_state(state, budget, hessians, args.shape,
                                                             fisher=matrices)
        rules["fisher_diag"] = functools.partial(diagonal_priced, rules["fisher_matrices"])
        for name in REQUESTED:
            if match := CALIBRATED.fullmatch(name):
                rules[name] = lambda steps=int(match[1]): tg.quantize_state(
                    state, budget, shape=args.shape, **calibrated(args, steps))
        if os.environ.get("OLD_TRAIN_GPT"):
            old = load(os.environ["OLD_TRAIN_GPT"], "old_train_gpt")
            takes_shape = "shape" in inspect.signature(old.quantize_state).parameters
            rules["old"] = lambda: old.quantize_state(
                state, 0.985 * budget, hessians, *[args.shape][:takes_shape])
        chosen = REQUESTED or [name for name in (*tg.EXPORT_RULES, "int6", "old") if name in rules]
        rules = {name: rules[name] for name in chosen}
        path = f"{artifact_path}.ab"
        for name, rule in rules.items():
            # sized and written in that format
            tg.ARTIFACT_FORMAT = int(name[-1]) if "_format" in name else artifact_format
            try:
                packed = rule()
                tg.write_artifact(path, packed, args.shape)
            finally:
                tg.ARTIFACT_FORMAT = artifact_format
            base_model.load_state_dict(tg.read_artifact(path, args.shape, "export_ab"))
            bpb = evaluate()[1]
            kinds = [v[0] for v in packed.values()]
            log(f"export_ab rule:{name} int6:{kinds.count('int6')} int5:{kinds.count('int5')} "
                f"bytes:{os.path.getsize(path)} roundtrip val_bpb:{bpb:.8f} gap:{bpb - pre:.8f}")
        os.remove(path)
    # The comparisons above are not the run's evaluation: its clock (t_eval) starts after them.
    return real_final_evaluation(args, base_model, evaluate, artifact_path, weights, code_bytes,
                                 log, digest)


def diagonal_priced(rule):
    """rule() with every matrix priced by mean(diag H), as before gptq_energy."""
    energy = tg.gptq_energy
    tg.gptq_energy = lambda hessian: hessian.diagonal().double().mean()
    try:
        return rule()
    finally:
        tg.gptq_energy = energy


CALIBRATED = re.compile(r"fisher_cal([1-9][0-9]*)")
RULES = (*tg.EXPORT_RULES, "int6", "fisher_format1", "fisher_format2", "fisher_matrices",
         "fisher_diag",
         *(["old"] if os.environ.get("OLD_TRAIN_GPT") else []))
REQUESTED = os.environ["EXPORT_AB_RULES"].split(",") if os.environ.get("EXPORT_AB_RULES") else []
if unknown := {name for name in REQUESTED
               if name not in RULES and not CALIBRATED.fullmatch(name)}:
    sys.exit(f"EXPORT_AB_RULES: no rule {', '.join(sorted(unknown))}; rules: {', '.join(RULES)}"
             f", fisher_calN (N >= 1) (old with OLD_TRAIN_GPT)")
real_export, real_final_evaluation, real_train = tg.export, tg.final_evaluation, tg.train
artifact_format = tg.ARTIFACT_FORMAT
tg.export, tg.final_evaluation, tg.train = export, final_evaluation, train

if __name__ == "__main__":
    tg.main()
