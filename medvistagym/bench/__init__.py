"""Benchmarks: `medvistagym.bench.kernels` times the image kernels against Pillow and torch."""
