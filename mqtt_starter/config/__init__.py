"""The configuration: the models (schema.py), reading a file (load.py), and the reference
page written from the models (reference.py). The package re-exports the names callers use."""

from mqtt_starter.config.load import (
    ENV_PREFIX,
    SECRET_KEYS,
    file_problems,
    load_settings,
    settings_from_mapping,
)
from mqtt_starter.config.schema import (
    AllowList,
    CloudSettings,
    CustomPropertySelector,
    HttpSettings,
    LogSettings,
    MonitorScope,
    MonitorSettings,
    MqttSettings,
    PolicySettings,
    QrsSettings,
    ReconnectSettings,
    RetrySettings,
    RouteSettings,
    Settings,
    StatusSettings,
    TlsSettings,
)

__all__ = [
    "ENV_PREFIX",
    "SECRET_KEYS",
    "AllowList",
    "CloudSettings",
    "CustomPropertySelector",
    "HttpSettings",
    "LogSettings",
    "MonitorScope",
    "MonitorSettings",
    "MqttSettings",
    "PolicySettings",
    "QrsSettings",
    "ReconnectSettings",
    "RetrySettings",
    "RouteSettings",
    "Settings",
    "StatusSettings",
    "TlsSettings",
    "file_problems",
    "load_settings",
    "settings_from_mapping",
]
