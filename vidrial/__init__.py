"""vidrial: kernel generation and autotuning for power retention."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy entry points load on first use, so `import vidrial` stays light (no torch/cupy).
    if name == "tune":
        from vidrial.tuning.tuner import tune

        return tune
    raise AttributeError(f"module 'vidrial' has no attribute {name!r}")
