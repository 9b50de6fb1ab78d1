"""Test-suite settings shared by every module."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# The machine is shared and noisy: no per-example deadlines (speed is the benchmarks' business).
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
# CI: more examples, same seed-free search; select with HYPOTHESIS_PROFILE=ci.
settings.register_profile(
    "ci", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
