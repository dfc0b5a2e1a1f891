"""Benchmarks and the soak: long runs that do not belong in the test suite.

A package so that its scripts share one copy of what they start (`tests.support`) and of
each other: the wrappers `bench/run` and `bench/soak` run them as `python -m bench.<name>`
from the repository root, with the project's `.venv` unless told otherwise.
"""
