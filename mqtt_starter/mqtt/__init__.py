"""The broker link: the only code that imports the MQTT library (link.py)."""
