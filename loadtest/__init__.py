"""Load tests (Locust) and the side-by-side benchmark harness (`python -m loadtest.bench`)."""
