"""``cellsam bench``: per-stage timing and memory of the segmentation pipeline.

Modules:

- :mod:`.timing`: repeat statistics (median, IQR, min, max), a per-stage timer, peak-memory probes.
- :mod:`.pipeline`: synthetic scenes with a chosen number of cells and our pipeline timed stage by stage
  (the real :func:`cellsam.inference.segment.segment_prepared`, instrumented from outside).
- :mod:`.research`: loads research tooling from the source checkout's ``benchmarks/``: there,
  ``reference_pipeline.py`` is the reference CellSAM design built from Meta's ``segment_anything`` with the
  same weights (two encoder passes, one mask-decoder call per box) and a mask-parity check
  (``--reference``; not installed with the package).
- :mod:`.cellpose_ref`: Cellpose 3 inference (network + mask building) on the same scenes, when importable.
- :mod:`.report`: machine information, JSON and markdown reports, scaling plot.
- :mod:`.busy`: ``--busy-neighbour N``, CPU-burning neighbour processes during a second timing pass and the
  busy / quiet ratio per configuration.
- :mod:`.prompts`: ``cellsam bench --prompts``, the time of one point / box prompt on an image whose
  embedding is cached (the labeling server's route, its model call and ``Predictor.predict``).

Nothing here runs at import time; heavy dependencies are imported lazily.
"""
