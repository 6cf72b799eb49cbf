"""Hardware profiles for the cost model: the built-in ones (``hardware_profiles.json``) and calibrate files.

Measuring this machine (``"this"``) sits above the analysis, in :mod:`attnkit.measure`."""

from attnkit.hardware.profiles import (
    DEFAULT_MISALIGNED_FACTOR, HardwareProfile, dtype_key, family_profile, list_hardware, stored_profile,
)

__all__ = [
    # the profile
    "HardwareProfile", "DEFAULT_MISALIGNED_FACTOR", "dtype_key",
    # stored profiles (no measuring)
    "stored_profile", "list_hardware", "family_profile",
]
