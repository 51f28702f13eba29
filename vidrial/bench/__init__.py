"""`vidrial bench`: vidrial against its peers (retention/Triton, PyTorch SDPA, fla's gated linear
attention) for forward, forward+backward and decode, in one process on the current GPU.

    cases.py     each benchmark case as data (shape, callables per implementation, FLOPs, bytes), presets
    peers.py     the peers, each behind a try/except that records "skipped: reason"
    ceilings.py  device copy bandwidth (read+write) and 8192^3 bf16 matmul, measured in the same run
    runner.py    correctness check, then timing (vidrial.tuning.measure.time_cuda), several input sets
    report.py    JSON, printed table, markdown table, PNG plots (matplotlib, optional)

Nothing here imports torch at module import time (the CLI parser and the CPU tests stay light).
"""
