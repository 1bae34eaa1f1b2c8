"""Speed benchmarks of vugen against plain-PyTorch references measured in the same run (``make bench``).

Run ``python -m benchmarks.run --help``. To add a benchmark ``foo``: write ``benchmarks/foo.py`` with a config
dataclass of :func:`~benchmarks.common.flag` fields, its ``PRESETS`` and ``rows(settings, config) -> list[Row]``
measuring inside :func:`~benchmarks.common.quiet_workspace`, ending in ``BENCHMARK = Benchmark("foo", FooConfig,
PRESETS, rows)`` (see :class:`benchmarks.common.Benchmark`, and ``benchmarks/decoder.py`` for an example), then add
``foo.BENCHMARK`` to ``BENCHMARKS`` in ``benchmarks/run.py``.
"""
