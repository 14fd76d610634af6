"""CLIP_benchmark's evaluation as Lightning callbacks: zero-shot classification, retrieval and a linear probe.

The callbacks are thin: the sets come from ``datasets``, the embedding (split across ranks) from ``embed``, the
numbers from ``metrics``; all three can be used without a Trainer.
"""

from rwkv_clip.callbacks.base import BenchmarkCallback, summary_table
from rwkv_clip.callbacks.benchmarks import LinearProbe, ZeroShotClassification, ZeroShotRetrieval
from rwkv_clip.callbacks.datasets import EvalDataset, load_classification, load_retrieval
from rwkv_clip.callbacks.embed import Ranks, embed_images, embed_texts, zeroshot_classifier
from rwkv_clip.callbacks.metrics import classification_metrics, linear_probe, retrieval_metrics

__all__ = [
    "BenchmarkCallback",
    "EvalDataset",
    "LinearProbe",
    "Ranks",
    "ZeroShotClassification",
    "ZeroShotRetrieval",
    "classification_metrics",
    "embed_images",
    "embed_texts",
    "linear_probe",
    "load_classification",
    "load_retrieval",
    "retrieval_metrics",
    "summary_table",
    "zeroshot_classifier",
]
