"""The validation documents' lengths, as per-document TTT (TTT_MODE=lora) cuts them.

    python3 tools/doc_lengths.py DATA_PATH TOKENIZER_PATH [TTT_LORA_CHUNK] [TTT_LORA_BATCH] [RANKS]

Prints the document count, the longest documents, and two lower bounds on the steps per-document
TTT takes on a rank (its time is its steps times one step's): the rows' even share of the rank's
chunks, and the longest piece's chunks (a document longer than train_gpt's LORA_PIECE_TARGETS is
adapted in pieces). Run it on FineWeb's validation split before counting on TTT's time.
"""
import os
import sys

import numpy as np
import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def main(data_path: str, tokenizer: str, chunk: int = 64, rows: int = 64, ranks: int = 8) -> None:
    files = tg.find_shards(data_path, "val", 2)
    tokens = tg.load_validation_tokens(files, 1 << 16)
    bos = spm.SentencePieceProcessor(model_file=tokenizer).bos_id()
    n = tokens.numel() - 1
    lengths = np.diff(tg.document_starts(tokens, bos, n) + [n])
    pieces = np.diff(tg.document_pieces(tokens, bos, n, chunk) + [n])
    chunks = sorted((-(-int(ln) // chunk) for ln in pieces), reverse=True)  # TTT's order
    share = max(-(-sum(chunks[r::ranks]) // rows) for r in range(ranks))
    print(f"targets:{n} documents:{len(lengths)} bos_id:{bos} mean:{lengths.mean():.1f} "
          f"longest:{', '.join(map(str, sorted(lengths)[::-1][:5]))}")
    for cap in (4096, 16384, 65536):
        print(f"documents over {cap} targets: {(lengths > cap).sum()} "
              f"holding {lengths[lengths > cap].sum()} targets")
    print(f"pieces:{len(pieces)} chunks:{sum(chunks)} (chunk {chunk}); steps a rank at {rows} rows "
          f"on {ranks} ranks: even share {share}, longest piece {chunks[0]}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]))
