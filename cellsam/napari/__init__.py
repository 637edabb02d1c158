"""The napari plugin (``pip install "cellsam[napari]"``; npe2 manifest ``napari.yaml``).

Qt-free logic, testable without a display: :mod:`.segmentation` (Segment by blocks of tiles, with
progress and cancel points), :mod:`.prompts` (box / click prompts on cached tile embeddings and the
label edits they make), :mod:`.finetuning` (the web app's fine-tuning job, in a child process),
:mod:`.layers` (what layers mean for cellsam and what results become as layers). napari glue:
:mod:`._reader`, :mod:`._writer`, :mod:`._sample` and the dock widget :mod:`._widget`.
Importing this package imports neither napari nor Qt.
"""
