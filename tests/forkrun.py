"""`python SCRIPT` many times from one process that imported torch once.

Each request forks a child that runs the script as `__main__` in its own directory and
environment, stdin from /dev/null, stdout and stderr into files, and exits as the interpreter
would (SystemExit's code; 1 and a traceback for any other exception). A bad input then costs the
script's own work, not the ~4 s of importing torch and Inductor again: tests/test_cli.py's
bad-input cases are 72 processes. What this cannot see is a warning printed while torch imports.

One JSON request a line on stdin: {"script", "cwd", "env", "out", "err", "timeout"}; one JSON
reply a line on stdout: {"returncode": N} or {"timeout": true} (the child killed).
"""
import json
import os
import runpy
import signal
import sys
import time
import traceback

import numpy  # noqa: F401  (what the script imports, so the children need not)
import sentencepiece  # noqa: F401
import torch  # noqa: F401
import torch._inductor.config  # noqa: F401
import torch.distributed  # noqa: F401


def child(request: dict) -> None:
    """Never returns: runs the script and leaves by os._exit with its exit status."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.argv = [request["script"]]
        sys.path[0] = os.path.dirname(request["script"])
        try:
            runpy.run_path(request["script"], run_name="__main__")
            code = 0
        except SystemExit as e:  # as the interpreter exits on it
            code = 0 if e.code is None else e.code
            if not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        deadline = time.monotonic() + request["timeout"]
        while not (done := os.waitpid(pid, os.WNOHANG))[0]:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                done = None
                break
            time.sleep(0.01)
        reply = {"timeout": True} if done is None else {
            "returncode": os.waitstatus_to_exitcode(done[1])}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
