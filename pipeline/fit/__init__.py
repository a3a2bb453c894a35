"""The fitting stage's choice of precision (``precision: auto``): see ``plan.py``."""

from pipeline.fit.plan import FitPlan, choose_precision, fitted_profile, most_compressed

__all__ = ["FitPlan", "choose_precision", "fitted_profile", "most_compressed"]
