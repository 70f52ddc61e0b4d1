"""What runs inside a model's process: the worker, its batching scheduler, the llama.cpp backend and its samplers.

With the CPU-kernel probe's child and the benchmark runner (each in a process of its own), the
only code that drives llama.cpp. The server's process never imports it: the two sides meet in
`sovereign.engine.wire`, which holds the types they share.
"""
