"""Reference servers the benchmark compares the service against: the HTTP ceiling and a naive torch app."""
