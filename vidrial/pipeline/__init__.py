"""The power retention pipeline behind the public ops (docs/MATH.md sections 3-5), written once:

* checks.py    argument validation of every public op (errors name the argument, what was given, what is allowed)
* layout.py    the inference state's layout record (d_tile, D, dtype)
* forward.py   the training forward: routing (quadratic / chunked), padding, the kernel composition
* backward.py  the backward composition and its torch glue
* decoding.py  the inference step: decode launches per row group, cache absorption, prefill

Imports point one way: vidrial.ops / vidrial.inference -> vidrial.autograd -> vidrial.pipeline -> vidrial.kernels.
"""
