"""Running in production: logging (logs.py), Prometheus metrics (metrics.py), systemd's
notifications (systemd.py)."""
