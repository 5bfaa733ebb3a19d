"""train_gpt.py with its artifact write paused: once the temp file beside the artifact is written,
fsync writes `export_paused` in the working directory and sleeps, so a test can signal the run
mid-export and check what it leaves behind."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

_fsync = os.fsync


def paused_fsync(fd):
    if ".ptz.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
        Path("export_paused").write_text("")
        time.sleep(60)
    _fsync(fd)


os.fsync = paused_fsync
tg.main()
