"""compare.py's parts: the plan (which studies, what is done), the paired tests, the costs, the report."""
