"""Zero-shot benchmarks as Lightning callbacks: classification, retrieval and linear probe (DESIGN §6)."""

from rwkv_clip.callbacks.datasets import EvalDataset
from rwkv_clip.callbacks.linear_probe import LinearProbe, fit_logistic_regression, linear_probe
from rwkv_clip.callbacks.metrics import classification_metrics, retrieval_metrics, zeroshot_classifier
from rwkv_clip.callbacks.zeroshot import ZeroShotClassification, ZeroShotRetrieval

__all__ = [
    "EvalDataset",
    "LinearProbe",
    "ZeroShotClassification",
    "ZeroShotRetrieval",
    "classification_metrics",
    "fit_logistic_regression",
    "linear_probe",
    "retrieval_metrics",
    "zeroshot_classifier",
]
