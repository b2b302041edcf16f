"""The in-process backend: GLM-4.6V-Flash loaded with transformers in each worker, and its engine.

Nothing here imports torch at import time: the gunicorn master imports `gpus` only.
"""
