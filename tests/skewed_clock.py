"""train_gpt.py as torchrun runs it, with rank 1's clock running 1.5x fast (as if it had started
earlier or its timer drifted). Each rank writes the sha256 of the weights it exports to
weights_rank{RANK}.sha256 in the working directory, so a test can check every rank trained the same model.
"""
import hashlib
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

RANK = int(os.environ.get("RANK", 0))
if RANK == 1:
    tg.time = types.SimpleNamespace(**{**vars(time), "perf_counter": lambda: 1.5 * time.perf_counter()})

_export = tg.export


def export_and_hash(args, model, *rest):
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode() + t.detach().double().cpu().numpy().tobytes())
    Path(f"weights_rank{RANK}.sha256").write_text(digest.hexdigest())
    return _export(args, model, *rest)


tg.export = export_and_hash
tg.main()
