"""Benchmark harness for the ChatGLM2-6B model files: load time, memory, prefill and decode speed.

Run `python -m bench --help` from the repository root. Nothing is downloaded: the harness writes a
random-weight checkpoint of the released shapes and layout under `bench/cache/` and reuses it.
"""
