"""The worst next_batch across shard boundaries: an older copy of the script's loader against
this one's.

    DATA_PATH=... python tools/bench_loader.py              # old = 05c4fb3, new = this checkout
    DATA_PATH=... python tools/bench_loader.py --old REV --device cpu,cuda --out /big/disk/dir
    TRAIN_GPT=path/to/old/train_gpt.py DATA_PATH=... python tools/bench_loader.py
    DATA_ORDER=strided DATA_PATH=... python tools/bench_loader.py --old train_gpt.py  # an order

Builds FineWeb-sized train shards (--shards of --shard-tokens tokens, 100M each by default, the
challenge's header) in a temporary folder (or --out, reused when it already holds them) by tiling
the tokens of DATA_PATH's train shards. Then, for each version, device and page-cache state, it
times every next_batch of rank 0 of 8 at the record's micro-batch (TRAIN_BATCH_TOKENS / 8 ranks /
GRAD_ACCUM_STEPS, 98304 tokens at the defaults; the environment's Hyperparameters decide), over a
run that passes every shard boundary and the wrap-around back to the first shard, and prints the
worst, p99 and median milliseconds and at which call the worst came. On CUDA a call is timed until
its batch is on the GPU. Before the loader is built, "cold" drops the shards' pages from the page
cache (posix_fadvise), "warm" reads all of them into it. Each version runs in a process of its own,
loaded as tools/profile_step.py loads TRAIN_GPT's copy; the tool checks that both versions gave the
same batches (exit 1 if not). The shards need --shards x 200 MB of disk at the default size.

--old (or TRAIN_GPT) and --new take a file or a git revision of this repository (05c4fb3 is the
last commit before the memory-mapped loader).
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256  # the challenge's shard header
WORLD_SIZE = 8


def script_path(version: str, tmp: str) -> str:
    """A file as it is, or train_gpt.py at a git revision of this repository, written into tmp."""
    if os.path.isfile(version):
        return os.path.abspath(version)
    path = os.path.join(tmp, f"train_gpt_{version.replace('/', '_')}.py")
    with open(path, "wb") as f:
        f.write(subprocess.run(["git", "-C", REPO, "show", f"{version}:train_gpt.py"], check=True,
                               capture_output=True).stdout)
    return path


def describe(version: str) -> str:
    """A revision as given; a file of this repository with its commit (+ when changed since)."""
    if not os.path.isfile(version):
        return version
    path = os.path.relpath(version, REPO)
    def git(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True)

    if path.startswith("..") or git("ls-files", "--error-unmatch", path).returncode:
        return os.path.abspath(version)
    changed = git("diff", "--quiet", "HEAD", "--", path).returncode != 0
    return f"{path} at {git('rev-parse', '--short', 'HEAD').stdout.strip()}{'+' if changed else ''}"


def build_shards(source: str, out: str, n_shards: int, n_tokens: int) -> list[str]:
    """out/fineweb_train_*.bin: n_shards shards of n_tokens, the source shards' tokens tiled."""
    os.makedirs(out, exist_ok=True)
    names = sorted(n for n in os.listdir(source)
                   if n.startswith("fineweb_train_") and n.endswith(".bin"))
    if not names:
        sys.exit(f"DATA_PATH={source} has no fineweb_train_*.bin shards")
    tokens = np.concatenate([np.fromfile(os.path.join(source, n), dtype="<u2",
                                         offset=4 * HEADER_INTS) for n in names])
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, n_tokens
    files = []
    for s in range(n_shards):
        path = os.path.join(out, f"fineweb_train_{s:06d}.bin")
        files.append(path)
        if os.path.exists(path) and os.path.getsize(path) == 4 * HEADER_INTS + 2 * n_tokens:
            continue  # built by an earlier run
        shard = np.resize(np.roll(tokens, -(s * n_tokens) % len(tokens)), n_tokens)
        with open(path, "wb") as f:
            f.write(header.tobytes())
            f.write(shard.tobytes())
    return files


def set_page_cache(files: list[str], cold: bool) -> None:
    """cold: the files' pages dropped from the page cache; warm: all of them read into it."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            if cold:
                os.fsync(fd)  # only clean pages can be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 1 << 24):
                    pass
        finally:
            os.close(fd)


def worker(files: list[str], device_name: str, calls: int, cold: bool) -> None:
    """In a process of its own: times next_batch with TRAIN_GPT's copy; prints one JSON line."""
    import torch
    from profile_step import tg, token_loader  # the script as tools/profile_step.py loads it

    args = tg.Hyperparameters(WORLD_SIZE)
    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    set_page_cache(files, cold)
    loader = token_loader(files, args.vocab_size, 0, WORLD_SIZE, device, args)
    times, digest = [], hashlib.blake2b(digest_size=16)
    for _ in range(calls):
        sync()
        t0 = time.perf_counter()
        x, y = loader.next_batch(args.micro_batch_tokens, args.train_seq_len)
        sync()
        times.append(1000.0 * (time.perf_counter() - t0))
        digest.update(x.cpu().numpy().tobytes())
        digest.update(y.cpu().numpy().tobytes())
    print(json.dumps(dict(times_ms=times, digest=digest.hexdigest(), torch=torch.__version__,
                          micro_batch_tokens=args.micro_batch_tokens)))


def run_worker(script: str, files: list[str], device: str, calls: int, cold: bool) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", device, str(calls),
               str(int(cold)), *files]
    proc = subprocess.run(command, env=dict(os.environ, TRAIN_GPT=script), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"{script} on {device} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", default=os.environ.get("TRAIN_GPT") or "05c4fb3",
                        help="file or git revision (default: TRAIN_GPT, else 05c4fb3)")
    parser.add_argument("--new", default=os.path.join(REPO, "train_gpt.py"),
                        help="file or git revision")
    parser.add_argument("--device", help="comma-separated (default: cpu, and cuda when available)")
    parser.add_argument("--cache", default="warm,cold", help="comma-separated: warm, cold")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    parser.add_argument("--out", help="folder for the shards, kept (default: a temporary one)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        device, calls, cold, *files = opts.worker
        return worker(files, device, int(calls), cold == "1")

    source = os.environ.get("DATA_PATH")
    if not source:
        sys.exit("set DATA_PATH to a folder of train shards to tile")
    tmp = tempfile.mkdtemp(prefix="bench_loader_")
    try:
        out = opts.out or os.path.join(tmp, "shards")
        t0 = time.perf_counter()
        files = build_shards(source, out, opts.shards, opts.shard_tokens)
        print(f"shards: {opts.shards} x {opts.shard_tokens} tokens in {out} (tiled from "
              f"DATA_PATH={source}), ready in {time.perf_counter() - t0:.1f}s; "
              f"{os.cpu_count()} CPUs, numpy {np.__version__}")
        if opts.device is None:
            import torch
            devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        else:
            devices = opts.device.split(",")
        versions = [(f"{name} ({describe(v)})", script_path(v, tmp))
                    for name, v in (("old", opts.old), ("new", opts.new))]
        total = opts.shards * opts.shard_tokens
        rows, digests, step_tokens = [], {}, None
        for device in devices:
            for cache in opts.cache.split(","):
                for label, script in versions:
                    if step_tokens is None:  # a probe call learns the environment's micro-batch
                        probe = run_worker(script, files, device, 1, False)
                        step_tokens = WORLD_SIZE * (probe["micro_batch_tokens"] + 1)
                        calls = -(-total // step_tokens) + 2  # past every boundary and the wrap
                        ends = range(opts.shard_tokens, total + 1, opts.shard_tokens)
                        crossing = [end // step_tokens for end in ends]
                        print(f"rank 0 of {WORLD_SIZE}, torch {probe['torch']}: "
                              f"{probe['micro_batch_tokens']} tokens a call, {calls} calls; "
                              f"the stream passes a shard boundary (or wraps) in calls {crossing}")
                    r = run_worker(script, files, device, calls, cache == "cold")
                    digests.setdefault((device, cache), set()).add(r["digest"])
                    t = np.array(r["times_ms"])
                    stats = t.max(), np.percentile(t, 99), np.median(t), t.argmax()
                    rows.append((device, cache, label, *stats))
        width = max(len(row[2]) for row in rows)
        print(f"{'device':6} {'cache':5} {'version':{width}} {'worst ms':>9} {'p99 ms':>8} "
              f"{'median ms':>9}  worst at call")
        for device, cache, label, worst, p99, median, at in rows:
            print(f"{device:6} {cache:5} {label:{width}} {worst:9.2f} {p99:8.2f} {median:9.3f}"
                  f"  {at}")
        same = all(len(d) == 1 for d in digests.values())
        verdict = "identical in both versions" if same else "DIFFERENT between the versions"
        print(f"batches: {verdict}")
        if not same:
            sys.exit(1)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
