"""vidrial: kernel generation and autotuning for power retention."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy entry points load on first use, so `import vidrial` stays light (no torch/cupy).
    if name == "tune":
        from vidrial.tuning.tuner import tune

        return tune
    if name == "power_retention":
        from vidrial.ops import power_retention

        return power_retention
    if name == "power_retention_inference":
        from vidrial.inference import power_retention_inference

        return power_retention_inference
    if name == "nn":  # vidrial.nn.PowerRetention (the layer); `import vidrial.nn` works as well
        import importlib

        return importlib.import_module("vidrial.nn")
    raise AttributeError(f"module 'vidrial' has no attribute {name!r}")
