"""One module per pipeline stage: its logic, then the Prefect task that wraps it."""
