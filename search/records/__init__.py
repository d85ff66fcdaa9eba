"""Typed records that cross stages: the study's config, the winner, the split, the retrain and its registration.

Standard library, PyYAML and trainables.config/spec only (an import-linter contract in pyproject.toml holds
it): every stage reads them, and a record that imported a stage would tie that stage to all the others.
"""
