"""Reading the configuration: YAML file → `${VAR}` interpolation → `<key>_file` secrets read →
`MQTT_STARTER_<SECTION>__<KEY>` overrides → validation against schema.py.

Every problem is reported with its key path, all at once (ConfigError, exit 78).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mqtt_starter.config.schema import Settings
from mqtt_starter.core.errors import ConfigError, ConfigProblem

ENV_PREFIX = "MQTT_STARTER_"
# Secrets that may also be given as `<key>_file`; the file's content (trailing newline cut) is used.
# qrs.jwt_file is not among them: the QRS client reads it itself, and again when it changes.
SECRET_KEYS = (
    ("mqtt", "password"),
    ("http", "token"),
    ("cloud", "api_key"),
    ("cloud", "client_secret"),
)
# A webhook's URL often holds its token (Slack, Mattermost, Teams): a secret like the HMAC key.
WEBHOOK_SECRET_KEYS = ("url", "secret")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _path(parts: tuple[Any, ...]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _interpolate(
    node: Any,
    env: Mapping[str, str],
    where: tuple[Any, ...],
    problems: list[ConfigProblem],
) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, env, (*where, k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env, (*where, i), problems) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                problems.append(
                    ConfigProblem(_path(where), f"environment variable {name} is not set")
                )
                return ""
            return env[name]

        return _VAR.sub(sub, node)
    return node


# Variables of the process, not settings: the configuration file's path (the container image
# sets it) and the event loop (ops/platform.py).
PROCESS_ENV = frozenset({"MQTT_STARTER_CONFIG", "MQTT_STARTER_LOOP"})


def _apply_env(data: dict[str, Any], env: Mapping[str, str], problems: list[ConfigProblem]) -> None:
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        if name in PROCESS_ENV:
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
        if (len(keys) < 2 and keys != ["watch_config"]) or not all(keys):
            problems.append(ConfigProblem(name, "expected MQTT_STARTER_<SECTION>__<KEY>"))
            continue
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                problems.append(
                    ConfigProblem(
                        ".".join(keys),
                        f"{name} sets a key inside a value that is not a section",
                    )
                )
                break
            node = child
        else:
            # Structured values ([...], {...}) are read as YAML; scalars stay text and pydantic
            # converts them ("8080" → 8080, "true" → True), so a numeric password stays text.
            node[keys[-1]] = yaml.safe_load(value) if value.strip()[:1] in "[{" else value


def _secret_nodes(data: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(where, key, node) of each section that may hold a secret as `<key>_file`."""
    nodes = [(section, key, data.get(section)) for section, key in SECRET_KEYS]
    alerts = data.get("alerts")
    hooks = alerts.get("webhooks") if isinstance(alerts, dict) else None
    if isinstance(hooks, list):
        for i, hook in enumerate(hooks):
            nodes += [(f"alerts.webhooks[{i}]", key, hook) for key in WEBHOOK_SECRET_KEYS]
    return nodes


def _read_secret_files(data: dict[str, Any], problems: list[ConfigProblem]) -> None:
    for section, key, node in _secret_nodes(data):
        if not isinstance(node, dict) or f"{key}_file" not in node:
            continue
        file_key = f"{section}.{key}_file"
        path = node.pop(f"{key}_file")
        if node.get(key) is not None:
            problems.append(
                ConfigProblem(file_key, f"give {section}.{key} or {key}_file, not both")
            )
            continue
        if path is None:
            continue
        try:
            node[key] = Path(str(path)).read_text("utf-8").rstrip("\r\n")
        except OSError as exc:
            problems.append(ConfigProblem(file_key, f"cannot read {path}: {exc.strerror}"))


def settings_from_mapping(data: Any, env: Mapping[str, str] | None = None) -> Settings:
    """Validated settings from parsed YAML (`data`) and the environment (`env`)."""
    env = os.environ if env is None else env
    problems: list[ConfigProblem] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem("", "the configuration must be a YAML mapping")])
    data = _interpolate(data, env, (), problems)
    _apply_env(data, env, problems)
    _read_secret_files(data, problems)
    sites = [k for k in ("qrs", "cloud") if data.get(k) is not None]
    if len(sites) != 1:
        # Said here, with the other problems: the model's own check runs only on valid input.
        problems.append(
            ConfigProblem(
                "qrs" if not sites else "cloud",
                "field required: `qrs` (client-managed Sense) or `cloud` (Qlik Cloud)"
                if not sites
                else "give `qrs` or `cloud`, not both: one daemon serves one site",
            )
        )
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            if not error["loc"] and len(sites) != 1:
                continue  # the site problem, said above
            loc = tuple(p for p in error["loc"] if p not in ("function-after", "function-before"))
            message = error["msg"].removeprefix("Value error, ")
            problems.append(ConfigProblem(_path(loc), message[:1].lower() + message[1:]))
        raise ConfigError(_in_section_order(problems)) from None
    if problems:
        raise ConfigError(problems)
    return settings


def _in_section_order(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    """Problems in the order of the sections they concern (stable within one)."""
    order = list(Settings.model_fields)

    def rank(problem: ConfigProblem) -> int:
        section = problem.path.split(".")[0].split("[")[0]
        return order.index(section) if section in order else len(order)

    return sorted(problems, key=rank)


def load_settings(path: Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from the YAML file at `path` (None: environment only)."""
    data: Any = {}
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text("utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                [
                    ConfigProblem(
                        "",
                        f"no configuration file at {path} (-c or MQTT_STARTER_CONFIG"
                        " names another)",
                    )
                ]
            ) from None
        except OSError as exc:
            raise ConfigError([ConfigProblem("", f"cannot read {path}: {exc.strerror}")]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([ConfigProblem("", f"{path} is not valid YAML: {exc}")]) from None
    return settings_from_mapping(data, env)


def file_problems(settings: Settings) -> list[ConfigProblem]:
    """Files the settings name that cannot be read; checked at start, not at validation, so that
    a configuration can be validated on another machine."""
    wanted: list[tuple[str, Path | None]] = []
    if settings.mqtt.tls.enabled:
        tls = settings.mqtt.tls
        wanted += [
            ("mqtt.tls.ca_file", tls.ca_file),
            ("mqtt.tls.cert_file", tls.cert_file),
            ("mqtt.tls.key_file", tls.key_file),
        ]
    if settings.cloud is not None:
        wanted.append(("cloud.ca_file", settings.cloud.ca_file))
    if settings.qrs is not None and settings.qrs.url.startswith("https"):
        wanted.append(("qrs.ca_file", settings.qrs.ca_file))
    if settings.qrs is not None and settings.qrs.auth == "certificate":
        wanted += [
            ("qrs.cert_file", settings.qrs.cert_file),
            ("qrs.key_file", settings.qrs.key_file),
        ]
    elif settings.qrs is not None:
        wanted.append(("qrs.jwt_file", settings.qrs.jwt_file))
    problems = []
    for key, path in wanted:
        if path is not None and not os.access(path, os.R_OK):
            problems.append(ConfigProblem(key, f"cannot read {path}"))
    return problems
