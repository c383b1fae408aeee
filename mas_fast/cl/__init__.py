"""Continual-learning evaluation: MNIST and text scenarios, methods (MAS modes, online EWC, EWC,
Synaptic Intelligence), metrics, plots.

`python -m mas_fast demo` drives it (mas_fast/demo.py); the pieces are usable on their own:

    from mas_fast.cl import SynapticIntelligence, OnlineEWC, average_accuracy, backward_transfer
"""
from .ewc import EWC, OnlineEWC, fisher_sums
from .metrics import average_accuracy, backward_transfer, forgetting, seen_task_accuracy
from .si import SynapticIntelligence

__all__ = ["EWC", "OnlineEWC", "SynapticIntelligence", "fisher_sums", "average_accuracy", "backward_transfer",
           "forgetting", "seen_task_accuracy"]
