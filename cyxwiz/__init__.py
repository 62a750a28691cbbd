"""CyxWiz: train ML models on other people's GPUs. The ``cyxwiz`` command lives in :mod:`cyxwiz.cli`."""

__version__ = "0.1.0"
