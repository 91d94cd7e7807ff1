"""Timeouts declared in proxy and server configs: nginx, Envoy, gunicorn."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from payscope.errors import InputError

NGINX_DEFAULT_MS = 60_000.0
ENVOY_ROUTE_DEFAULT_MS = 15_000.0


@dataclass
class DeclaredTimeout:
    """A timeout a config file sets on caller -> callee (``operation`` ``*`` = every operation)."""

    caller: str
    callee: str
    operation: str
    timeout_ms: float | None           # per try (read / route timeout)
    connect_ms: float | None = None
    retries: int | None = None
    total_ms: float | None = None      # the whole call including retries, where the config says
    file: str = ""
    where: str = ""                    # location, route, setting

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_UNITS = {"ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0, "": 1000.0}


def nginx_time_ms(value: str, where: str) -> float:
    """nginx time (``5s``, ``500ms``, ``1m30s``, bare seconds) in milliseconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|)", value.strip())
    if not parts or "".join(a + b for a, b in parts) != value.strip():
        raise InputError(f"{where}: {value!r} is not an nginx time such as 30s or 500ms")
    return sum(float(n) * _UNITS.get(u, 86_400_000.0) for n, u in parts)


def _nginx_tokens(text: str) -> list[tuple[str, int]]:
    tokens = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0]
        for token in re.findall(r"[{};]|\"[^\"]*\"|'[^']*'|[^\s{};]+", line):
            tokens.append((token.strip("\"'"), lineno))
    return tokens


def parse_nginx(text: str, path: str, service: str) -> list[DeclaredTimeout]:
    """proxy_*_timeout per location (inherited from server and http), mapped to the proxy_pass upstream."""
    tokens = _nginx_tokens(text)
    stack: list[dict[str, Any]] = [{"block": "main", "settings": {}}]
    directive: list[str] = []
    out: list[DeclaredTimeout] = []
    for token, lineno in tokens:
        where = f"{path}:{lineno}"
        if token == "{":
            block = {"block": directive[0] if directive else "", "args": directive[1:],
                     "settings": dict(stack[-1]["settings"]), "line": lineno}
            stack.append(block)
            directive = []
        elif token == "}":
            if len(stack) == 1:
                raise InputError(f"{where}: unbalanced '}}' in nginx config")
            block = stack.pop()
            if block["block"] == "location" and "proxy_pass" in block:
                out.append(_nginx_location(block, path, service))
        elif token == ";":
            if directive:
                name, args = directive[0], directive[1:]
                if name in ("proxy_read_timeout", "proxy_connect_timeout", "proxy_send_timeout",
                            "proxy_next_upstream_tries", "proxy_next_upstream_timeout"):
                    if not args:
                        raise InputError(f"{where}: {name} needs a value")
                    stack[-1]["settings"][name] = args[0] if name == "proxy_next_upstream_tries" \
                        else nginx_time_ms(args[0], where)
                elif name == "proxy_pass" and args:
                    stack[-1]["proxy_pass"] = args[0]
            directive = []
        else:
            directive.append(token)
    if len(stack) != 1:
        raise InputError(f"{path}: a '{{' is never closed in nginx config")
    return out


def _nginx_location(block: dict[str, Any], path: str, service: str) -> DeclaredTimeout:
    settings = block["settings"]
    target = re.sub(r"^[a-z]+://", "", block["proxy_pass"]).split("/")[0].split(":")[0]
    tries = settings.get("proxy_next_upstream_tries")
    return DeclaredTimeout(
        caller=service, callee=target, operation="*",
        timeout_ms=settings.get("proxy_read_timeout", NGINX_DEFAULT_MS),
        connect_ms=settings.get("proxy_connect_timeout", NGINX_DEFAULT_MS),
        retries=max(0, int(tries) - 1) if tries and str(tries) != "0" else None,
        total_ms=settings.get("proxy_next_upstream_timeout") or None,
        file=path, where=f"location {' '.join(block['args'])} (line {block['line']})")


def _duration_ms(value: Any, where: str) -> float:
    if isinstance(value, (int, float)):
        return float(value) * 1000
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)(ms|s|m|h)\s*", str(value))
    if not match:
        raise InputError(f"{where}: {value!r} is not a duration such as 15s or 0.25s")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_envoy(document: Any, path: str, service: str) -> list[DeclaredTimeout]:
    """Route ``timeout``, ``retry_policy`` and cluster ``connect_timeout`` from an Envoy config."""
    connect: dict[str, float] = {}
    routes: list[tuple[dict[str, Any], str]] = []

    def walk(node: Any, trail: str) -> None:
        if isinstance(node, dict):
            if "connect_timeout" in node and "name" in node:
                connect[str(node["name"])] = _duration_ms(node["connect_timeout"], f"{path}: cluster {node['name']}")
            if isinstance(node.get("route"), dict) and "cluster" in node["route"]:
                routes.append((node, trail))
            for key, value in node.items():
                walk(value, f"{trail}.{key}" if trail else str(key))
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{trail}[{i}]")

    walk(document, "")
    if not routes and not connect:
        raise InputError(f"{path}: no Envoy routes or clusters found")
    out = []
    for node, trail in routes:
        route = node["route"]
        cluster = str(route["cluster"])
        where = f"{path}: {trail}"
        timeout = _duration_ms(route["timeout"], where) if "timeout" in route else ENVOY_ROUTE_DEFAULT_MS
        policy = route.get("retry_policy") or {}
        retries = int(policy.get("num_retries", 1)) if policy else None
        per_try = _duration_ms(policy["per_try_timeout"], where) if "per_try_timeout" in policy else None
        match = node.get("match") or {}
        out.append(DeclaredTimeout(
            caller=service, callee=cluster, operation="*",
            timeout_ms=per_try if per_try is not None else (timeout or None),
            connect_ms=connect.get(cluster), retries=retries, total_ms=timeout or None, file=path,
            where=f"route {match.get('prefix') or match.get('path') or match.get('safe_regex', '')}".strip()))
    return out


def parse_gunicorn(text: str, path: str, service: str) -> list[DeclaredTimeout]:
    """gunicorn's worker ``timeout``: the longest any request to ``service`` may run before it is killed."""
    match = re.search(r"^\s*timeout\s*=\s*(\d+(?:\.\d+)?)\s*$", text, re.MULTILINE) or \
        re.search(r"--timeout[ =](\d+)", text)
    value = float(match.group(1)) * 1000 if match else 30_000.0
    return [DeclaredTimeout(caller="*", callee=service, operation="*", timeout_ms=value, file=path,
                            where="worker timeout" + ("" if match else " (gunicorn default)"))]


def detect_and_parse(path: Path, service: str | None) -> list[DeclaredTimeout]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    name = path.name.lower()
    if "gunicorn" in name or re.search(r"^\s*(workers|worker_class|bind)\s*=", text, re.MULTILINE):
        if not service:
            raise InputError(f"{path}: a gunicorn config needs --service (the service it runs)")
        return parse_gunicorn(text, str(path), service)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or "static_resources" in text:
        import yaml

        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
        return parse_envoy(document, str(path), service or "envoy")
    if re.search(r"\b(proxy_pass|location|upstream|server)\b", text):
        return parse_nginx(text, str(path), service or "nginx")
    raise InputError(f"{path}: not an nginx, Envoy or gunicorn config payscope knows")
