"""Benchmarks and diagnoses of the Selfie scripts; run each from the repository as `python -m benchmarks.NAME`."""
