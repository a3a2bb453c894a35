"""The fitting stage's choice of precision (``precision: auto``): see ``plan.py``."""

from pipeline.choices import most_compressed
from pipeline.fit.plan import FitPlan, choose_precision, fitted_profile

__all__ = ["FitPlan", "choose_precision", "fitted_profile", "most_compressed"]
