"""Text classification: `task.py` (the task), `losses.py` (imbalance), `metrics.py` (metrics, report,
plots), `model.py` (build, PEFT, export), `robust.py` (augmentation of the training split, robustness
evaluation)."""
from .losses import class_weights, classification_loss, per_example_loss
from .metrics import compute_metrics, plot_confusion, report_text
from .task import ClassifyTask

__all__ = ["ClassifyTask", "class_weights", "classification_loss", "per_example_loss", "compute_metrics",
           "plot_confusion", "report_text"]
