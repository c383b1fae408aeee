"""Continual-learning evaluation: MNIST and text scenarios, methods (MAS modes, online EWC), metrics, plots.

`python -m mas_fast demo` drives it (mas_fast/demo.py); the pieces are usable on their own:

    from mas_fast.cl import OnlineEWC, average_accuracy, backward_transfer, forgetting
"""
from .ewc import OnlineEWC, fisher_sums
from .metrics import average_accuracy, backward_transfer, forgetting, seen_task_accuracy

__all__ = ["OnlineEWC", "fisher_sums", "average_accuracy", "backward_transfer", "forgetting",
           "seen_task_accuracy"]
