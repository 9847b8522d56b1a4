"""Benchmarks and optimizer comparisons (``orthotorch compare`` / ``orthotorch bench``)."""
