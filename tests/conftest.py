import os
import sys

# Tests import the trainer as `train_gpt` and their helpers (synth) by name.
HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)
# Triton's interpreter runs the script's GPU kernels (XSA) on CPU tensors, so their arithmetic is
# tested here; it must be set before Triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
