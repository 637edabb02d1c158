"""Data pipeline: readers, normalisation (also used at inference), label filters, tiling, splits,
prepared-dataset writer (`cellsam prepare`) and SYNTHETIC data generators."""
