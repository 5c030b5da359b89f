"""Lung Vision web: the worklist pages, the JSON API and Prometheus metrics."""
