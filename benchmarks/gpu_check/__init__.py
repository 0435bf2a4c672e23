"""One-command GPU check: correctness of every kernel variant, then the op and memory-mode sweeps.

``python -m benchmarks.gpu_check`` (or ``make gpu-check``); see :mod:`benchmarks.gpu_check.run` for the
command line and ``docs/gpu-check.md`` for what it runs. Modules:

* :mod:`.budget`: the wall-time budget and the ordered plan of cases it runs or skips;
* :mod:`.plan`: the cases of a real run (README GPU shapes) and of a dry run (tiny CPU shapes);
* :mod:`.correctness`: the float64-reference checks, run in a child process per dtype;
* :mod:`.results`: the results folder (``results.md``, CSVs, PNGs).
"""
