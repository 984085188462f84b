"""Jobs: what a task does between its operator and the hook (one request, a batch, their ledgers)."""
