"""Speed benchmarks of vugen against plain-PyTorch references measured in the same run (``make bench``).

Run ``python -m benchmarks.run --help``. To add a benchmark ``foo``: write ``benchmarks/foo.py`` with
``add_arguments(parser)``, ``configure(settings, args)`` and ``rows(settings, config) -> list[Row]`` (see
:class:`benchmarks.common.Benchmark`, and ``benchmarks/decoder.py`` for an example), then add the line
``"foo": foo,`` to ``BENCHMARKS`` in ``benchmarks/run.py``.
"""
