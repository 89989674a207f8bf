import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The suite runs on small CPUs; keep torch from oversubscribing them.
torch.set_num_threads(min(2, torch.get_num_threads()))
