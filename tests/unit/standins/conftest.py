"""pytest fixtures for herd's lab stand-ins (defined in standins_lab.py)."""

from standins_lab import lab_models, start_emulator, start_registry  # noqa: F401
