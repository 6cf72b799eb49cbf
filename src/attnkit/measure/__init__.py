"""Measuring, above the analysis: ``attnkit calibrate`` (a hardware profile of this GPU or CPU), ``--hardware
this`` (calibrated once, then cached) and ``attnkit profile`` (measured kernels and latency beside the prediction)."""

from attnkit.measure.calibrate import calibrate
from attnkit.measure.calibrate_cpu import calibrate_cpu
from attnkit.measure.profile import ProfileRecord, ProfileResult, load_measured, profile_models
from attnkit.measure.this_machine import load_hardware, this_machine

__all__ = [
    # hardware profiles measured here
    "calibrate", "calibrate_cpu", "this_machine", "load_hardware",
    # predicted vs measured
    "profile_models", "ProfileRecord", "ProfileResult", "load_measured",
]
