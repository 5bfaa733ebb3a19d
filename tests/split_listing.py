"""train_gpt.py as torchrun runs it, with rank 1 listing one train shard fewer than rank 0, as if
the last shard appeared (a download still running) between the two ranks' listings."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

_find_shards = tg.find_shards


def fewer_shards(data_path, split, min_tokens, why=""):
    files = _find_shards(data_path, split, min_tokens, why)
    return files[:-1] if split == "train" else files


if int(os.environ.get("RANK", 0)) == 1:
    tg.find_shards = fewer_shards
tg.main()
