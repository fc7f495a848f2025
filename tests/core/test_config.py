"""The configuration model: defaults, interpolation, secrets from files, environment, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from mqtt_starter.config import (
    QrsSettings,
    Settings,
    file_problems,
    load_settings,
    settings_from_mapping,
)
from mqtt_starter.core.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "config" / "mqtt-starter.yaml"
MINIMAL = {"qrs": {"url": "https://sense:4242"}}


def qrs(settings: Settings) -> QrsSettings:
    assert settings.qrs is not None
    return settings.qrs


def problems(data: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data, env or {})
    return [str(p) for p in info.value.problems]


def test_the_example_is_valid_and_equals_the_defaults() -> None:
    example = load_settings(EXAMPLE, env={})
    assert example == Settings.model_validate(
        MINIMAL | {"qrs": {"url": "https://sense.example.com:4242"}}
    )


def test_every_field_has_a_description() -> None:
    def walk(model: type[object], path: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            if not field.description:
                missing.append(f"{path}{name}")
            annotation = field.annotation
            for candidate in (annotation, *getattr(annotation, "__args__", ())):
                if hasattr(candidate, "model_fields"):
                    missing += walk(candidate, f"{path}{name}.")
        return missing

    assert walk(Settings, "") == []


def test_all_errors_at_once_with_their_key_paths() -> None:
    assert problems(
        {
            "mqtt": {"port": 0, "colour": "red", "protocol": 4},
            "policy": {"on_running": "maybe"},
            "routes": [{"topic": "a/+"}],
        }
    ) == [
        "mqtt.port: input should be greater than or equal to 1",
        "mqtt.protocol: input should be '5' or '3.1.1'",
        "mqtt.colour: extra inputs are not permitted",
        "qrs: field required: `qrs` (client-managed Sense) or `cloud` (Qlik Cloud)",
        "policy.on_running: input should be 'skip' or 'start'",
        "routes[0]: a route needs at least one of task_ids, tags, custom_properties, names,"
        " or payload_as",
    ]


def test_interpolation_and_missing_variables() -> None:
    settings = settings_from_mapping(
        {"qrs": {"url": "https://${HOST}:4242", "user_id": "${USER_ID}"}},
        {"HOST": "sense", "USER_ID": "svc"},
    )
    assert (qrs(settings).url, qrs(settings).user_id) == ("https://sense:4242", "svc")
    assert problems({"qrs": {"url": "${NOPE}"}}) == [
        "qrs.url: environment variable NOPE is not set",
        "qrs.url: an http(s) URL without query or fragment",
    ]


def test_environment_overrides() -> None:
    settings = settings_from_mapping(
        MINIMAL,
        {
            "MQTT_STARTER_MQTT__PORT": "8883",
            "MQTT_STARTER_MQTT__TLS__ENABLED": "true",
            "MQTT_STARTER_MQTT__PASSWORD": "123456",
            "MQTT_STARTER_QRS__URL": "https://other:4242",
            "MQTT_STARTER_MQTT__REPLY_TOPIC_ALLOW": '["replies/#"]',
            "MQTT_STARTER_WATCH_CONFIG": "true",
            # The process's own variables, not settings:
            "MQTT_STARTER_CONFIG": "/config/mqtt-starter.yaml",
            "MQTT_STARTER_LOOP": "asyncio",
            "UNRELATED": "x",
        },
    )
    assert settings.watch_config
    assert (settings.mqtt.port, settings.mqtt.tls.enabled, qrs(settings).url) == (
        8883,
        True,
        "https://other:4242",
    )
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "123456"
    assert settings.mqtt.reply_topic_allow == ["replies/#"]
    assert problems(MINIMAL, {"MQTT_STARTER_PORT": "1"}) == [
        "MQTT_STARTER_PORT: expected MQTT_STARTER_<SECTION>__<KEY>"
    ]


def test_secrets_from_files(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    settings = settings_from_mapping(
        {
            "mqtt": {"password_file": str(tmp_path / "pw")},
            "qrs": {"url": "https://s:4242", "auth": "jwt", "jwt_file": str(tmp_path / "pw")},
        },
        {},
    )
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "s3cret"
    # The QRS client reads qrs.jwt_file itself, and again when it changes.
    assert (qrs(settings).jwt, qrs(settings).jwt_file) == (None, tmp_path / "pw")
    assert "s3cret" not in repr(settings)
    assert problems(
        {
            "mqtt": {"password": "x", "password_file": str(tmp_path / "pw")},
            "qrs": {"url": "https://s:4242"},
            "http": {"token_file": str(tmp_path / "missing")},
        }
    ) == [
        "mqtt.password_file: give mqtt.password or password_file, not both",
        f"http.token_file: cannot read {tmp_path / 'missing'}: No such file or directory",
    ]


def test_cross_field_checks() -> None:
    assert problems(
        {
            "qrs": {"url": "https://s:4242", "auth": "jwt"},
            "mqtt": {"tls": {"cert_file": "/c.pem"}, "base_topic": "a/#", "shared_group": "a/b"},
        }
    ) == [
        "mqtt.tls: cert_file and key_file go together",
        "mqtt.base_topic: no wildcards, no leading $ or /, no trailing /",
        "mqtt.shared_group: a non-empty name without / + #",
        "qrs: auth: jwt needs `jwt` or `jwt_file`",
    ]


def test_route_templates_must_fit_the_filter() -> None:
    assert problems(
        MINIMAL
        | {"routes": [{"topic": "a/+/b", "tags": ["x-{2}"]}, {"topic": "a/#/b", "tags": ["y"]}]}
    ) == [
        "routes[0]: {2} in 'x-{2}': the topic has 1 wildcard level(s)",
        "routes[1]: 'a/#/b': # must be the last level",
    ]


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    settings = settings_from_mapping(
        {"qrs": {"url": "https://s:4242", "cert_file": str(tmp_path / "nope.pem")}}, {}
    )
    assert [str(p) for p in file_problems(settings)] == [
        "qrs.ca_file: cannot read /etc/mqtt-starter/root.pem",
        f"qrs.cert_file: cannot read {tmp_path / 'nope.pem'}",
        "qrs.key_file: cannot read /etc/mqtt-starter/client_key.pem",
    ]


def test_yaml_and_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("mqtt: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_settings(bad, {})
    with pytest.raises(ConfigError) as missing:
        load_settings(tmp_path / "missing.yaml", {})
    assert [str(p) for p in missing.value.problems] == [
        f"no configuration file at {tmp_path / 'missing.yaml'} (-c or MQTT_STARTER_CONFIG"
        " names another)"
    ]
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path, {})
    bad.write_text(yaml.safe_dump(["a list"]))
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_settings(bad, {})


@pytest.mark.parametrize("name", ["*.corp.example", "sense node", "-sense", "sense."])
def test_server_name_must_be_a_host_name(name: str) -> None:
    assert problems({"qrs": {"url": "https://10.0.0.5:4242", "server_name": name}}) == [
        "qrs.server_name: a host name (letters, digits, dots and hyphens)"
    ]


def test_server_name_and_chain_only_verification() -> None:
    settings = settings_from_mapping(
        {"qrs": {"url": "https://10.0.0.5:4242", "server_name": "sense-node1.corp.example"}}, {}
    )
    assert (qrs(settings).server_name, qrs(settings).verify_hostname) == (
        "sense-node1.corp.example",
        True,
    )


def test_butler_migration_settings_are_checked() -> None:
    assert problems(
        MINIMAL
        | {
            "http": {"enabled": True, "tls": {"cert_file": "/c.pem"}},
            "routes": [
                {"topic": "qliksense/start_task", "payload_as": "task_id", "tags": ["x"]},
                {"topic": "qliksense/start", "payload_as": "guid"},
            ],
        }
    ) == [
        "routes[0]: payload_as takes the selector from the payload: no task_ids, tags,"
        " custom_properties, names or when on the same route",
        "routes[1].payload_as: input should be 'task_id', 'name' or 'tag'",
        "http.tls: give both cert_file and key_file (HTTPS), or neither (HTTP)",
    ]


def test_an_endpoint_beyond_loopback_needs_a_token_or_allow_no_token() -> None:
    assert problems(MINIMAL | {"http": {"enabled": True, "host": "0.0.0.0"}}) == [
        "http: host '0.0.0.0' is beyond loopback and there is no token: set http.token, or"
        " http.allow_no_token: true to accept that anyone who reaches the port can start tasks"
    ]
    open_ = {"http": {"enabled": True, "host": "0.0.0.0", "allow_no_token": True}}
    assert settings_from_mapping(MINIMAL | open_, {}).http.allow_no_token


def test_chains_that_would_loop_or_have_no_monitor_are_refused() -> None:
    def chain(**fields: object) -> dict[str, object]:
        return {"name": "c", "after": {"names": ["Reload HR"]},
                "start": {"names": ["Reload Stock"]}, **fields}  # fmt: skip

    assert problems(
        MINIMAL
        | {
            "monitor": {"enabled": True},
            "chains": [
                chain(start={"names": ["reload hr"]}),
                chain(name="d", after={"task_ids": ["ABC"]}, start={"task_ids": [" abc "]}),
                chain(name="bad/name"),
            ],
        }
    ) == [
        "chains[0]: start names 'reload hr', one of its own `after` tasks: the chain would loop",
        "chains[1]: start names 'abc', one of its own `after` tasks: the chain would loop",
        "chains[2].name: letters, digits, `_`, `.` and `-` (it is a topic level)",
    ]
    assert problems(MINIMAL | {"chains": [chain()]}) == [
        "chains: a chain is fired by the monitor: set monitor.enabled"
    ]


def test_webhooks_are_checked_and_their_secrets_read_from_files(tmp_path: Path) -> None:
    monitor = {"monitor": {"enabled": True}}
    hook = {"name": "ops", "url": "https://hooks.example.com/T0KEN"}
    assert problems(
        MINIMAL
        | monitor
        | {"alerts": {"webhooks": [hook | {"url": "ftp://T0KEN@x"}, hook | {"name": "a b"}]}}
    ) == [
        "alerts.webhooks[0].url: an http:// or https:// URL with a host",
        "alerts.webhooks[1].name: letters, digits, `_`, `.` and `-`",
    ]
    assert problems(MINIMAL | {"alerts": {"webhooks": [hook]}}) == [
        "alerts.webhooks: alerts are sent by the monitor: set monitor.enabled"
    ]
    assert problems(MINIMAL | monitor | {"alerts": {"webhooks": [hook, hook]}}) == [
        "alerts.webhooks: each webhook needs a name of its own"
    ]
    url, secret = tmp_path / "url", tmp_path / "secret"
    url.write_text("https://hooks.example.com/FROM-FILE\n")
    secret.write_text("hmac-key\n")
    from_files = {"name": "ops", "url_file": str(url), "secret_file": str(secret)}
    settings = settings_from_mapping(MINIMAL | monitor | {"alerts": {"webhooks": [from_files]}}, {})
    [read] = settings.alerts.webhooks
    assert (read.url.get_secret_value(), read.secret) == (
        "https://hooks.example.com/FROM-FILE",
        SecretStr("hmac-key"),
    )
    assert "FROM-FILE" not in repr(settings) and "hmac-key" not in repr(settings)
