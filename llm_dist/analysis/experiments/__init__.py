"""`llm-dist experiment SPEC.yaml`: variants × seeds of ordinary runs (local or a SLURM array), interventions
as config, scale sweeps with fitted laws, counterfactual removal, reports with confidence intervals."""
from .cli import main

__all__ = ["main"]
