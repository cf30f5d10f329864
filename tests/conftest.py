"""Test-wide settings."""

from hypothesis import settings

# Speed is measured in bench/, not here: on a loaded 2-core CI machine a deadline only adds flakes.
settings.register_profile("farebox", deadline=None)
settings.load_profile("farebox")
