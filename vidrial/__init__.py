"""vidrial: kernel generation and autotuning for power retention."""
__version__ = "0.1.0"
