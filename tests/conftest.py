"""Shared test settings: quiet third-party warnings, one torch thread (CI has 2 cores)."""

import warnings


import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*is not within the observation space.*")
warnings.filterwarnings("ignore", message=".*Constant\\(s\\) may be too high.*")
