"""The AnomalyGPT method in plain torch: encoder, prompts, decoder, memory banks, prompt learner,
explainer and the detector that composes them. No Ray, no Redis, no HTTP here."""

from pipeline.detector import Detector, DetectorConfig, Inspection, StageTimings, Verdict
from pipeline.encoder import EncoderConfig, EncoderFingerprint
from pipeline.errors import DefectscopeError
from pipeline.explainer import ExplainerConfig
from pipeline.memory import MemoryBank, fewshot_anomaly_map
from pipeline.postprocess import Region

__all__ = [
    "DefectscopeError",
    "Detector",
    "DetectorConfig",
    "EncoderConfig",
    "EncoderFingerprint",
    "ExplainerConfig",
    "Inspection",
    "MemoryBank",
    "Region",
    "StageTimings",
    "Verdict",
    "fewshot_anomaly_map",
]
