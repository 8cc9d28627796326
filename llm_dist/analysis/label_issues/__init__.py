"""Label issues from out-of-fold probabilities (`llm-dist label-issues`).

K stratified folds of a classify config's training split (by id, seeded); each fold is an ordinary
training run of the config (`folds.py`: one after another, 1 or N processes, or a SLURM array), trained on
the other folds and predicting its held-out fold. The out-of-fold probabilities of every training example
feed cleanlab (`find_label_issues`, `get_label_quality_scores`) and the plain out-of-fold loss (Chong et al.
2022); both become `suspicion_*` columns of `example_scores.parquet`, scored against planted noise
(`data.label_noise`) with `analysis/detectors.py` (`scores.py`)."""
from .cli import main

__all__ = ["main"]
