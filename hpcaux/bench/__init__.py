"""`hpcaux bench`: the compared methods side by side in one run, and the cost model."""
