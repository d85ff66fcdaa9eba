"""compare.py's parts: the plan (which studies, what is done), the statistics, the costs, the report."""
