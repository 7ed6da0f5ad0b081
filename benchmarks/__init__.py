"""jxent benchmarks: the case registry, the CPU suite and the accelerator check."""
