"""Suite-wide settings.

One intra-op thread per test process: CI runs ``pytest -n 2`` on two cores, and two workers with a
thread per core each would oversubscribe the machine (measured: several times slower on small solves).
"""

import torch

torch.set_num_threads(1)
