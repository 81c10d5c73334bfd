"""lazypull's benchmarks, run with `python -m perf [BENCHMARK] [options]` (`make bench`).

They report medians and write JSON next to the table; none of them asserts a time,
so a slow or busy machine makes a slow report, never a failure.
"""
