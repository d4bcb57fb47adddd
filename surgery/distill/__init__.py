"""Block-wise distillation of replaced attention sites (teacher-forced or end-to-end)."""

from surgery.distill.engine import DistillConfig, DistillResult, SiteResult, distill
from surgery.distill.fidelity import FidelityReport, SiteFidelity, evaluate_fidelity

__all__ = ["DistillConfig", "DistillResult", "FidelityReport", "SiteFidelity", "SiteResult", "distill",
           "evaluate_fidelity"]
