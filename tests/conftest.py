import os
import sys

# Tests import the trainer as `train_gpt` and their helpers (synth) by name.
HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)
