"""train_gpt.py as torchrun runs it, with the clocks of ranks 1..WORLD_SIZE-1 running fast, from
1.5x (rank 1) down to 1.1x (the last rank; of 2 ranks, rank 1 at 1.5x), as if they had started
earlier or their timers drifted. Each rank writes the sha256 of the weights it exports to
weights_rank{RANK}.sha256 and the step its training stopped at to steps_rank{RANK}.txt in the
working directory, so a test can check every rank trained the same model and stopped together.
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


_train = tg.train


def train_and_record_steps(*args, **kwargs):
    steps, *rest = _train(*args, **kwargs)
    Path(f"steps_rank{RANK}.txt").write_text(str(steps))
    return (steps, *rest)


tg.export = export_and_hash
tg.train = train_and_record_steps
tg.main()
