"""Tools around the bus: the command line, the demo, benchmarks, offline trace evaluation."""
