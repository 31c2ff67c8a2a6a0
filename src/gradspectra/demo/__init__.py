"""The demo: generated data and small models used by ``gradspectra demo``, the examples and the benchmarks."""
