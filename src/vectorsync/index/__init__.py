"""Index versions, re-index and the backfill manager (see versions.py, reindex.py)."""
