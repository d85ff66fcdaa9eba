"""Pure statistics of a tested model, shared by the final run and the comparison: intervals, ROC-AUC, ECE,
calibration, per-image predictions and the number formatters.

Arrays in, numbers and text out (numpy, scipy, scikit-learn): no torch, no MLflow, and nothing
of search/ but its errors, so the final run's report and compare.py compute and write a score
the same way, and each can be tested on arrays built by hand.
"""
