"""mas_fast: fast, exact Memory Aware Synapses (Aljundi et al., ECCV 2018) for PyTorch.

    from mas_fast import MAS
    mas = MAS(model, lambda_=1.0)          # mode="per_sample": the paper's exact importance
    mas.consolidate(loader)                 # after a task: Ω from unlabeled data, θ* snapshot
    loss = task_loss + mas.penalty()        # while learning the next task
"""
from .distributed import RankFailedError
from .importance import MODES, NonFiniteError
from .ops import BACKENDS, BackendUnavailable, backend_status
from .regularizer import MAS
from . import optim

__version__ = "0.1.0"

__all__ = ["MAS", "optim", "MODES", "BACKENDS", "BackendUnavailable", "NonFiniteError", "RankFailedError",
           "backend_status", "__version__"]
