"""The record: the MLflow store, the study's parent run, the trials' child runs."""
