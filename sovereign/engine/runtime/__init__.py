"""What runs inside a model's process: the worker, its batching scheduler, the llama.cpp backend and its samplers.

The only package that imports llama_cpp (the CPU-kernel probe's child and the benchmark runner
drive llama.cpp too, each in a process of its own). The server's process never imports it: the
two sides meet in `sovereign.engine.wire`, which holds the types they share.
"""
