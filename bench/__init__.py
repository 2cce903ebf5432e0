"""Side-by-side benchmarks against other training stacks (not installed with the package)."""
