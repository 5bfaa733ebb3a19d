"""All-int6 exports whose rows' steps are set by an importance estimate, side by side on the same
trained weights, in one process (a study of what the export's budget should buy).

    torchrun --standalone --nproc_per_node=1 tools/export_steps_ab.py

Runs train_gpt.py as the environment sets it (one rank). Between its export and its final
evaluation, the trained state is packed by each rule below at the run's budget, written to disk
and scored from the file (the plain roundtrip evaluation), one line each:

    steps_ab rule:NAME int6:N int5:N bytes:FILE_BYTES roundtrip val_bpb:X gap:X-PRE s:ELAPSED

Each int6 row r of matrix m gets the step max(s_r, c * t_r), s_r its clip of least error over 31
and c one constant, the least whose file fits (found on measured sizes). From a second-order
estimate of the loss, a row's rounding costs about F_r * mean(diag H_m) * step^2 / 12, F_r the
squared gradient of the loss at the row's output summed over calibration tokens (Fisher), H_m the
matrix's input Hessian (GPTQ's); at one price per bit the least-loss step is proportional to
(F_r * mean(diag H_m))^(-1/2). t_r = s_r^beta * that^(1 - beta):

- `fill`: EXPORT_RULE=fill (int5 matrices); `clip`: beta 1, one factor on every row's step;
- `fisher`: beta 0 (what became EXPORT_RULE=fisher); `fisher_half`: beta 0.5; `hessian`: beta
  0 with F_r = 1 (the matrix's input energy alone);
- `rate_fisher`: EXPORT_RULE=rate with each row's error weighted by F_r;
- `int6`: every row at its clip of least error, whatever its size;
- `fisher_rule`: train_gpt's own EXPORT_RULE=fisher (on the run's calibrated Fisher sums);
  `fisher_1mb`: the same at a budget 1,000,000 bytes larger (the price of bytes);
  `fisher_q63`, `fisher_q127`: rows allowed finer steps, codes up to that bound (fisher_steps'
  qmax);
- `embeddings_exact`, `matrices_exact`: `fisher_rule`'s packing with the int8 embeddings, or the
  int6 matrices, kept at fp16 (what each part's rounding costs).

STEPS_AB_RULES=fisher_rule,fisher_1mb picks and orders the rules (default: the first seven).
"""
import functools
import importlib.util
import math
import os
import sys
import time

import torch

T0 = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("train_gpt", os.path.join(ROOT, "train_gpt.py"))
tg = sys.modules["train_gpt"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tg)
STOP_AFTER_S = float(os.environ.get("STEPS_AB_STOP_S", "470"))  # rules left past this: skipped
seen = {}


def fisher_rows(base_model, train_files, device, tokens=98304, seq_len=2048, micro=16):
    """Per int6 matrix, each output row's summed squared loss gradient (times its folded gain's
    square), over the first `tokens` of the training stream."""
    linears = {f"{name}.weight": m for name, m in base_model.named_modules()
               if isinstance(m, tg.CastedLinear) and tg.is_gptq_matrix(f"{name}.weight", m.weight)}
    sums = {n: torch.zeros(m.out_features, device=device) for n, m in linears.items()}

    def watch(name):
        def hook(module, args, kwargs, out):
            gain = kwargs.get("out_scale", args[1] if len(args) > 1 else None)
            gain = None if gain is None else gain.detach().float().view(-1)

            def grad_hook(g):
                g2 = g.float().square().flatten(0, -2).sum(0)
                sums[name].add_(g2 if gain is None else g2 * gain.square())
            out.register_hook(grad_hook)
        return hook

    hooks = [m.register_forward_hook(watch(n), with_kwargs=True) for n, m in linears.items()]
    loader = tg.DistributedTokenLoader(train_files, 0, 1, device, "stream", 0)
    try:
        x, y = loader.next_batch(tokens, seq_len)
        for i in range(0, len(x), micro):
            base_model.zero_grad(set_to_none=True)
            base_model(x[i:i + micro], y[i:i + micro]).backward()
    finally:
        for h in hooks:
            h.remove()
        base_model.zero_grad(set_to_none=True)
    return {n: s.cpu().double() for n, s in sums.items()}


def stepped(state, packed, hessians, names, steps):
    out = dict(packed)
    for n in names:
        w = state[n].to(hessians[n].device, torch.float32)
        scales = tg.stored_scales(steps[n].to(w.device))
        out[n] = ("int6", tg.round_rows(w, scales, 31, hessians[n]).to(torch.int8).cpu(),
                  scales.half().cpu())
    return out


def profile_rule(state, packed, hessians, shape, budget, profile, log):
    """Steps max(s_r, c t_r), c the least (to 0.1% of the budget) whose file fits."""
    names = [n for n, v in packed.items() if v[0] == "int6"]
    s = {n: packed[n][2].double() for n in names}
    count = {n: state[n].numel() for n in names}
    # t normalised so that c = 1 widens the average row by no factor (geometric, by parameters)
    log_mean = sum(count[n] * (profile[n] / s[n]).log().mean() for n in names) / sum(
        count.values())
    t = {n: profile[n] / log_mean.exp() for n in names}
    compress = tg.cached_zstd22()

    def size_at(lc):
        steps = {n: torch.maximum(s[n], t[n] * 2 ** lc).clamp(max=64 * s[n]).float()
                 for n in names}
        trial = stepped(state, packed, hessians, names, steps)
        return len(tg.ARTIFACT_MAGIC) + 32 + len(tg.serialize(trial, shape, compress)), trial

    aim, lo, hi, best = budget * (1 - 5e-4), None, None, None
    lc = 0.75
    for _ in range(9):
        size, trial = size_at(lc)
        log(f"steps_ab   log2c:{lc:.4f} bytes:{size}")
        if size <= budget:
            hi = (lc, size)
            if best is None or size > best[0]:
                best = (size, trial)
            if size >= budget * (1 - 1e-3):
                break
        else:
            lo = (lc, size)
        if lo and hi:  # regula falsi on log c, kept inside the bracket
            lc = lo[0] + (aim - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1])
            lc = min(max(lc, lo[0] + 0.1 * (hi[0] - lo[0])), hi[0] - 0.1 * (hi[0] - lo[0]))
        else:
            lc = lc + 0.5 if hi is None else lc - 0.5
    return best and best[1]


def final_evaluation(args, base_model, evaluate, artifact_path, weights, code_bytes, log,
                     digest=None, t_eval=None):
    state, hessians = seen["state"], seen["hessians"]
    budget = args.artifact_limit_bytes - code_bytes
    pre = evaluate()[1]
    device = next(base_model.parameters()).device
    fisher = seen["fisher"] and {n: f.double().cpu() for n, f in seen["fisher"].items()}
    if not fisher:  # the run calibrated no Fisher sums (EXPORT_RULE other than fisher)
        fisher = fisher_rows(base_model, tg.find_shards(args.data_path, "train", 1), device,
                             args.train_batch_tokens, args.train_seq_len)
    base_model.load_state_dict(state)
    log(f"steps_ab fisher rows done s:{time.perf_counter() - T0:.0f}")
    int6 = tg.quantize_state(state, math.inf, hessians, args.shape)
    names = [n for n, v in int6.items() if v[0] == "int6"]
    energy = {n: hessians[n].diagonal().double().mean().cpu() for n in names}
    importance = {n: (fisher[n].clamp_min(1e-12 * fisher[n].mean()) * energy[n]) for n in names}
    least = {n: int6[n][2].double() for n in names}

    def by_profile(beta, use_fisher=True):
        base = {n: (importance[n] if use_fisher else energy[n].expand_as(least[n])) ** -0.5
                for n in names}
        return lambda: profile_rule(state, int6, hessians, args.shape, budget,
                                    {n: least[n] ** beta * base[n] ** (1 - beta) for n in names},
                                    log)

    def rate_fisher():
        real_init = tg.RateDistortion.__init__

        def init(self, options):
            real_init(self, {n: {b: (v[0], v[1], v[2] * fisher[n][None, :], *v[3:])
                                 for b, v in by_bits.items()} for n, by_bits in options.items()})
        tg.RateDistortion.__init__ = init
        try:
            return tg.quantize_state(state, budget, hessians, args.shape, rule="rate")
        finally:
            tg.RateDistortion.__init__ = real_init

    def rule_fisher(qmax=31, extra=0):
        @functools.cache  # the exact() variants reuse the default's packing
        def pack():
            real = tg.fisher_steps
            tg.fisher_steps = functools.partial(real, qmax=qmax)
            try:
                return tg.quantize_state(state, budget + extra, hessians, args.shape,
                                         rule="fisher", fisher=fisher)
            finally:
                tg.fisher_steps = real
        return pack

    def exact(names, rule):
        """rule's packing with the tensors names picks kept as fp16: what their rounding costs."""
        def pack():
            out = rule()
            return dict(out, **{n: ("fp16", state[n].half().cpu().contiguous())
                                for n in out if names(n, out[n][0])})
        return pack

    rules = {"fill": lambda: tg.quantize_state(state, budget, hessians, args.shape, rule="fill"),
             "fisher": by_profile(0.0), "clip": by_profile(1.0),
             "hessian": by_profile(0.0, use_fisher=False), "fisher_half": by_profile(0.5),
             "rate_fisher": rate_fisher, "int6": lambda: int6,
             "fisher_rule": (default := rule_fisher()), "fisher_q63": rule_fisher(63),
             "fisher_q127": rule_fisher(127), "fisher_1mb": rule_fisher(extra=1_000_000),
             "fisher_q127_1mb": rule_fisher(127, extra=1_000_000),
             "embeddings_exact": exact(lambda n, kind: kind == "int8", default),
             "matrices_exact": exact(lambda n, kind: kind == "int6", default)}
    chosen = os.environ.get("STEPS_AB_RULES") or ",".join(RULES[:7])
    rules = {name: rules[name] for name in chosen.split(",")}
    path = f"{artifact_path}.ab"
    for name, rule in rules.items():
        if time.perf_counter() - T0 > STOP_AFTER_S:
            log(f"steps_ab rule:{name} skipped: past {STOP_AFTER_S:.0f}s")
            continue
        packed = rule()
        if packed is None:
            log(f"steps_ab rule:{name} does not fit")
            continue
        tg.write_artifact(path, packed, args.shape)
        base_model.load_state_dict(tg.read_artifact(path, args.shape, "steps_ab"))
        bpb = evaluate()[1]
        kinds = [v[0] for v in packed.values()]
        log(f"steps_ab rule:{name} int6:{kinds.count('int6')} int5:{kinds.count('int5')} "
            f"bytes:{os.path.getsize(path)} roundtrip val_bpb:{bpb:.8f} gap:{bpb - pre:.8f} "
            f"s:{time.perf_counter() - T0:.0f}")
    os.remove(path)
    # The comparisons above are not the run's evaluation: its clock (t_eval) starts after them.
    return real_final_evaluation(args, base_model, evaluate, artifact_path, weights, code_bytes,
                                 log, digest)


def export(args, base_model, log, rank, code_bytes, hessians, fisher=None):
    seen.update(hessians=hessians, fisher=fisher,
                state={k: v.detach().clone() for k, v in base_model.state_dict().items()})
    return real_export(args, base_model, log, rank, code_bytes, hessians, fisher)


RULES = ("fill", "fisher", "clip", "hessian", "fisher_half", "rate_fisher", "int6", "fisher_rule",
         "fisher_q63", "fisher_q127", "fisher_1mb", "fisher_q127_1mb", "embeddings_exact",
         "matrices_exact")
if os.environ.get("STEPS_AB_RULES") and (
        unknown := set(os.environ["STEPS_AB_RULES"].split(",")) - set(RULES)):
    sys.exit(f"STEPS_AB_RULES: no rule {', '.join(sorted(unknown))}; rules: {', '.join(RULES)}")
real_export, real_final_evaluation = tg.export, tg.final_evaluation
tg.export, tg.final_evaluation = export, final_evaluation

if __name__ == "__main__":
    tg.main()
