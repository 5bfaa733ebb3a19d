"""train_gpt.py as torchrun runs it, with the clocks of ranks 1..WORLD_SIZE-1 running fast, from
1.5x (rank 1) down to 1.1x (the last rank; of 2 ranks, rank 1 at 1.5x), as if they had started
earlier or their timers drifted. Each rank writes the sha256 of the weights it exports to
weights_rank{RANK}.sha256, the step its training stopped at to steps_rank{RANK}.txt and the first
step it trained with depth recurrence on (or "none") to recur_rank{RANK}.txt in the working
directory, so a test can check every rank trained the same model and stopped and switched together.
"""
import hashlib
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

RANK, WORLD_SIZE = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
if RANK > 0:
    FAST = 1.5 - 0.4 * (RANK - 1) / max(WORLD_SIZE - 2, 1)
    fast = lambda: FAST * time.perf_counter()  # noqa: E731
    tg.time = types.SimpleNamespace(**{**vars(time), "perf_counter": fast})

_export = tg.export


def export_and_hash(args, model, *rest):
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode() + t.detach().double().cpu().numpy().tobytes())
    Path(f"weights_rank{RANK}.sha256").write_text(digest.hexdigest())
    return _export(args, model, *rest)


_train, _train_step, recurring = tg.train, tg.train_step, []


def train_step_and_record_recurrence(args, model, base_model, *rest):
    recurring.append(base_model.recurring)
    return _train_step(args, model, base_model, *rest)


def train_and_record_steps(*args, **kwargs):
    steps, *rest = _train(*args, **kwargs)
    Path(f"steps_rank{RANK}.txt").write_text(str(steps))
    loop = recurring[len(recurring) - steps:]  # after the warm-up's steps
    Path(f"recur_rank{RANK}.txt").write_text(str(loop.index(True)) if True in loop else "none")
    return (steps, *rest)


tg.export = export_and_hash
tg.train = train_and_record_steps
tg.train_step = train_step_and_record_recurrence
tg.main()
