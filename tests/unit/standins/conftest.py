"""pytest fixtures for herd's lab stand-ins (defined in standins_lab.py)."""

from standins_lab import lab_models, start_emulator  # noqa: F401
