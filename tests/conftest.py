import torch

# The suite runs on small CPUs; keep torch from oversubscribing them.
torch.set_num_threads(min(2, torch.get_num_threads()))
