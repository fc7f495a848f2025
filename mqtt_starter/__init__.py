"""mqtt-starter: start Qlik Sense tasks when a machine publishes an MQTT message."""

__version__ = "0.1.0"
