"""studioml-runner: turns GPU and CPU servers into a fleet that runs StudioML experiments.

See README.md for usage and docs/ for the architecture.
"""
__version__ = "0.1.0"
