"""Benchmarks: see bench/README.md. Run as `python -m bench.<script>` from the repository root."""
