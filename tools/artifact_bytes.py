"""Where an artifact's bytes go, and what other layouts of the same codes would take (CPU only).

    python3 tools/artifact_bytes.py final_model.int6.ptz

Reads the artifact (format 1, 2 or 3) and prints the whole file as each format would write the
same state (1: a zstd frame per tensor; 2: rows by scale; 3, what train_gpt.py writes: int5/int6
codes in one rANS stream), and, over its quantized matrices' codes (int6/int5):

- the zstd-22 frames as written in format 1 (rows in their own order) and in format 2 (rows in the
  order of their scales), and format 3's rANS stream with its classes and tables;
- the codes' order-0 entropy per matrix and per row, and the code length under one Gaussian per
  row (each row's own variance): bounds for a coder that knew more than zstd's blocks do;
- zstd-22 over rows grouped into K classes of spread (K = 4, 8), plus the classes' own bytes at
  log2 K bits a row, a layout that would have to store the classes;
- how many int6 rows reach a code of +-31 (rows whose step the grid, not the rule, bounds);
- the ideal code length (tables not counted) under context models a coder like format 3's could
  use: classes of row spread alone (32, as format 3, and 128), of row spread times a per-column
  factor (64), and 32 row classes times the previous code's size in the row (0, 1, 2, 3+): what
  more context would buy over format 3's;
- per int8 embedding: its zstd frame as written (rows by scale), what format 3's rANS coder would
  take for it alone (classes, tables and stream), its order-0 entropy, its mean |code| (the
  Fisher rule coarsens rows of little weight, which shrinks their codes) and how many rows reach
  a code of +-127 (rows at their int8 step: the rule's clamp, or a row it left as it was).

The codes are unchanged by every layout: the artifact's state is the same in either format.
"""
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def entropy_bytes(codes: np.ndarray) -> float:
    counts = np.bincount(codes.ravel().astype(np.int64) + 128, minlength=256)
    p = counts[counts > 0] / codes.size
    return -(p * np.log2(p)).sum() * codes.size / 8


def gaussian_bytes(codes: np.ndarray) -> float:
    """Code length of each row under a discretised Gaussian of the row's own mean square."""
    c = torch.from_numpy(codes.astype(np.float64))
    std = c.square().mean(1, keepdim=True).add(1e-3).sqrt()
    cdf = torch.distributions.Normal(0.0, std)
    p = cdf.cdf(c + 0.5) - cdf.cdf(c - 0.5)
    return float(-p.clamp_min(1e-12).log2().sum() / 8)


def context_bytes(sym: np.ndarray, cls: np.ndarray) -> float:
    """Code length of symbols under one fitted table per class (the tables not counted)."""
    k = int(cls.max()) + 1
    counts = np.bincount(cls.astype(np.int64) * 256 + sym, minlength=k * 256).reshape(k, 256)
    p = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return float(-(counts[counts > 0] * np.log2(p[counts > 0])).sum() / 8)


def context_sums(coded: list[np.ndarray]) -> dict[str, float]:
    sym = np.concatenate([c.reshape(-1) for c in coded]).astype(np.int64) + 128
    spread = [np.abs(c.astype(np.float32)).mean(1) for c in coded]
    widths = np.concatenate([np.full(len(c), c.shape[1]) for c in coded])
    rows = {k: np.repeat(tg.equal_count_bins(np.concatenate(spread), widths, k), widths)
            for k in (32, 128)}
    # a column's factor: its codes' size against their rows' spreads, averaged down the column
    column = [(np.abs(c.astype(np.float32)) / np.maximum(r[:, None], 1e-3)).mean(0)
              for c, r in zip(coded, spread)]
    both = np.concatenate([np.log(np.outer(r, q / q.mean()) + 1e-4).reshape(-1)
                           for r, q in zip(spread, column)])
    prev = np.concatenate([np.minimum(np.abs(np.pad(c[:, :-1], ((0, 0), (1, 0)))), 3).reshape(-1)
                           for c in coded]).astype(np.int64)
    return {"context_rows32": context_bytes(sym, rows[32]),
            "context_rows128": context_bytes(sym, rows[128]),
            "context_rows_columns64": context_bytes(
                sym, tg.equal_count_bins(both, np.ones(len(both), np.int64), 64)),
            "context_rows32_previous4": context_bytes(sym, rows[32] * 4 + prev)}


def main(path: str) -> None:
    blob = Path(path).read_bytes()
    head = len(tg.ARTIFACT_MAGIC) + 32
    fmt = tg.artifact_format(blob)
    if fmt is None:
        sys.exit(f"{path}: not an artifact of train_gpt.py")
    shape, packed = tg.deserialize(blob[head:], fmt)
    z = lambda a: len(tg.zstd22(np.ascontiguousarray(a).tobytes()))  # noqa: E731
    sums = dict(format1=0, format2=0, format3=0, order0_matrix=0.0, order0_row=0.0,
                gaussian_row=0.0, classes4=0.0, classes8=0.0)
    rows, at_bound, coded = 0, 0, []
    for name, (kind, codes, *scales) in sorted(packed.items()):
        if kind not in ("int6", "int5"):
            continue
        c = codes.numpy()
        coded.append(c)
        if kind == "int6":
            rows, at_bound = rows + len(c), at_bound + int((np.abs(c).max(1) == 31).sum())
        sums["format1"] += z(c)
        sums["format2"] += z(c[tg.scale_order(scales[0])])
        sums["order0_matrix"] += entropy_bytes(c)
        sums["order0_row"] += sum(entropy_bytes(r) for r in c)
        sums["gaussian_row"] += gaussian_bytes(c)
        spread = c.astype(np.float32).std(1)
        for k in (4, 8):
            group = np.searchsorted(np.quantile(spread, np.linspace(0, 1, k + 1)[1:-1]), spread)
            sums[f"classes{k}"] += sum(z(c[group == g]) for g in range(k) if (group == g).any())
            sums[f"classes{k}"] += len(c) * math.log2(k) / 8
    sums["format3"] = sum(map(len, tg.rans_pack(coded, tg.zstd22))) if coded else 0
    if coded:
        sums.update(context_sums(coded))
    files = {f: head + len(tg.serialize(packed, shape, fmt=f)) for f in tg.ARTIFACT_MAGICS}
    print(f"artifact {path}: {len(blob)} bytes, format {fmt}")
    print(f"file format1:{files[1]} format2:{files[2]} format3:{files[3]} "
          f"saved_2:{files[1] - files[2]} ({1 - files[2] / files[1]:.2%}) "
          f"saved_3:{files[1] - files[3]} ({1 - files[3] / files[1]:.2%})")
    print(f"int6 rows:{rows} at_code_31:{at_bound}")
    base = sums["format1"]
    for key, value in sums.items():
        print(f"int_codes {key}:{value:.0f} ({value / base:.4f} of format1)")
    for name, (kind, codes, *scales) in sorted(packed.items()):
        if kind == "int8":
            c = codes.numpy()
            print(f"int8 {name} rows:{len(c)} zstd:{z(c[tg.scale_order(scales[0])])} "
                  f"rans:{sum(map(len, tg.rans_pack([c], tg.zstd22)))} "
                  f"order0:{entropy_bytes(c):.0f} mean_abs_code:{np.abs(c).mean():.2f} "
                  f"at_code_127:{int((np.abs(c).max(1) == 127).sum())}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 tools/artifact_bytes.py ARTIFACT")
    main(sys.argv[1])
