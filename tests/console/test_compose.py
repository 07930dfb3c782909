"""Compose files: what dao runs is read exactly, and everything else is refused by the key's name."""

from __future__ import annotations

import re

import pytest

from dao.console.apps.compose import ComposeError, Constraint, Healthcheck, Mount, Port, duration, parse

FULL = """
x-common: &common
  restart: always
services:
  web:
    <<: *common
    image: busybox:1
    command: ["httpd", "-f", "-p", "8080"]
    environment:
      MODE: prod
      DEBUG: false
    ports: ["8080:8080", "9000/udp"]
    healthcheck:
      test: ["CMD", "wget", "-q", "-O-", "http://127.0.0.1:8080/"]
      interval: 2s
      timeout: 1s
      retries: 5
      start_period: 1m30s
    deploy:
      replicas: 2
      placement:
        constraints: ["node.labels.region == eu", "node.hostname != build-01"]
      resources:
        reservations: {cpus: "0.25", memory: 64m}
        limits: {memory: 1g}
  db:
    image: busybox:1
    command: sh -c 'while true; do date >> /data/log; sleep 1; done'
    environment: ["A=1", "B=two=2"]
    volumes: ["data:/data", "cache:/cache:ro"]
volumes:
  data:
  cache: {}
"""


def test_a_full_file_is_read_exactly() -> None:
    app = parse(FULL)
    web, db = app.services["web"], app.services["db"]
    assert (web.image, web.restart, web.replicas, web.pull_policy) == ("busybox:1", "always", 2, "missing")
    assert web.command == ("httpd", "-f", "-p", "8080")
    assert web.environment == (("MODE", "prod"), ("DEBUG", "false"))
    assert web.ports == (Port(8080, 8080), Port(9000, None, "udp"))
    assert web.healthcheck == Healthcheck(("CMD", "wget", "-q", "-O-", "http://127.0.0.1:8080/"), 2, 1, 5, 90)
    assert web.constraints == (Constraint("labels.region", True, "eu"), Constraint("hostname", False, "build-01"))
    assert (web.cpus, web.memory, web.memory_limit) == (0.25, 64 * 2**20, 2**30)
    assert db.command == "sh -c 'while true; do date >> /data/log; sleep 1; done'"
    assert db.environment == (("A", "1"), ("B", "two=2"))
    assert db.mounts == (Mount("data", "/data"), Mount("cache", "/cache", True))
    assert app.volumes == ("cache", "data")
    assert web.constraints[0].holds({"region": "eu"}, "h", "id") and not web.constraints[0].holds({}, "h", "id")
    assert web.constraints[1].holds({}, "other", "id") and not web.constraints[1].holds({}, "build-01", "id")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("services: {web: {image: x, build: .}}", "services.web.build is not supported"),
        ("services: {web: {image: x, network_mode: host}}", "services.web.network_mode is not supported"),
        ("services: {web: {image: x, deploy: {mode: global}}}", "services.web.deploy.mode is not supported"),
        ("services: {web: {image: x}}\nnetworks: {a: {}}", "networks is not supported"),
        ("services: {web: {build: .}}", "services.web.build"),
        ("services: {web: {command: x}}", "services.web.image"),
        ("services: {web: {image: x, volumes: ['./src:/src']}}", "bind mounts are not supported"),
        ("services: {web: {image: x, volumes: ['data:/d']}}", "not declared"),
        ("services: {web: {image: x, ports: ['127.0.0.1:80:80']}}", "services.web.ports[0]"),
        ("services: {web: {image: x, ports: ['8000-8010:80']}}", "services.web.ports[0]"),
        ("services: {web: {image: x, restart: sometimes}}", "services.web.restart"),
        ("services: {web: {image: x, environment: [HOME]}}", "from the deployer's shell"),
        ("services: {web: {image: x, deploy: {replicas: 1000}}}", "deploy.replicas"),
        ("services: {web: {image: x, deploy: {placement: {constraints: ['node.role == manager']}}}}", "node.role"),
        ("services: {web: {image: x, healthcheck: {test: [RUN, x]}}}", "healthcheck.test"),
        ("services: {web: {image: x, deploy: {resources: {reservations: {memory: lots}}}}}", "memory"),
        ("services: {Web: {image: x}}", "services.Web"),
        ("services: []", "services"),
        ("- a\n- b", "a mapping"),
        ("services: {web: {image: x}", "not valid YAML"),
        ("volumes: {data: {driver: nfs}}\nservices: {web: {image: x}}", "volumes.data"),
    ],
)
def test_what_dao_does_not_run_is_refused_by_name(text: str, named: str) -> None:
    with pytest.raises(ComposeError) as info:
        parse(text)
    assert named in info.value.message, info.value.message


def test_hostile_yaml_is_refused_before_it_is_built() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )
    with pytest.raises(ComposeError, match="expands to more than"):
        parse(bomb + "services: {web: {image: x}}")
    with pytest.raises(ComposeError, match="over 256 KiB"):
        parse("services: {web: {image: x}}\n" + "#" * 300_000)
    with pytest.raises(ComposeError, match="not valid YAML"):
        parse("services: !!python/object/apply:os.system ['true']")


def test_durations() -> None:
    assert [duration(v, "d") for v in ("30s", "1m30s", "1h", "500ms", 2, "1m")] == [30, 90, 3600, 0.5, 2, 60]
    with pytest.raises(ComposeError):
        duration("soon", "d")


def test_dollar_dollar_is_a_literal_dollar_and_a_variable_is_refused() -> None:
    app = parse("services: {a: {image: x, command: 'echo $$n $$((1+1))', environment: {P: 'a$$b'}}}")
    assert app.services["a"].command == "echo $n $((1+1))"
    assert dict(app.services["a"].environment) == {"P": "a$b"}
    for text, where in (("command: 'echo $HOME'", "services.a.command"), ("image: 'x:${TAG}'", "services.a.image")):
        with pytest.raises(ComposeError, match=f"{re.escape(where)}: variable interpolation"):
            parse("services: {a: {image: x, " + text + "}}" if "command" in text else "services: {a: {" + text + "}}")
