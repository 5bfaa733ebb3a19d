"""Where an artifact's bytes go, and what other layouts of the same codes would take (CPU only).

    python3 tools/artifact_bytes.py final_model.int6.ptz

Reads the artifact (format 1 or 2) and prints, over its quantized matrices' codes (int6/int5):

- the zstd-22 frames as written in format 1 (rows in their own order) and in format 2 (rows in the
  order of their scales, what train_gpt.py writes), and the whole file in each format;
- the codes' order-0 entropy per matrix and per row, and the code length under one Gaussian per
  row (each row's own variance): bounds for a coder that knew more than zstd's blocks do;
- zstd-22 over rows grouped into K classes of spread (K = 4, 8), plus the classes' own bytes at
  log2 K bits a row, a layout that would have to store the classes;
- how many int6 rows reach a code of +-31 (rows whose step the grid, not the rule, bounds).

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


def main(path: str) -> None:
    blob = Path(path).read_bytes()
    head = len(tg.ARTIFACT_MAGIC) + 32
    ordered = blob.startswith(tg.ARTIFACT_MAGIC)  # format 2; else format 1
    shape, packed = tg.deserialize(blob[head:], ordered)
    z = lambda a: len(tg.zstd22(np.ascontiguousarray(a).tobytes()))  # noqa: E731
    sums = dict(format1=0, format2=0, order0_matrix=0.0, order0_row=0.0, gaussian_row=0.0,
                classes4=0.0, classes8=0.0)
    rows, at_bound = 0, 0
    for name, (kind, codes, *scales) in sorted(packed.items()):
        if kind not in ("int6", "int5"):
            continue
        c = codes.numpy()
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
    files = {}
    for fmt, order, magic in ((1, lambda s: np.arange(len(s)), tg.ARTIFACT_MAGIC_V1),
                              (2, tg.scale_order, tg.ARTIFACT_MAGIC)):
        real = tg.scale_order
        tg.scale_order = order
        try:
            files[fmt] = len(magic) + 32 + len(tg.serialize(packed, shape))
        finally:
            tg.scale_order = real
    print(f"artifact {path}: {len(blob)} bytes, format {2 if ordered else 1}")
    print(f"file format1:{files[1]} format2:{files[2]} saved:{files[1] - files[2]} "
          f"({1 - files[2] / files[1]:.2%})")
    print(f"int6 rows:{rows} at_code_31:{at_bound}")
    base = sums["format1"]
    for key, value in sums.items():
        print(f"int_codes {key}:{value:.0f} ({value / base:.4f} of format1)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 tools/artifact_bytes.py ARTIFACT")
    main(sys.argv[1])
