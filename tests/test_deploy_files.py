"""docker-compose.yml, the Procfile and the Dockerfile start only what this repository provides.

Docker does not run here, so these tests read the files the way Compose and a shell would:
variables interpolated (`${VAR:-default}`, `${VAR:?message}`), every command resolved against
the `trapq` Typer app or the `celery -A tasks` app with its real options, and the health checks,
dependencies, GPU reservation and Flower credentials that production relies on.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from celery import Celery
from celery.app.utils import find_app
from celery.bin.celery import celery as celery_cli
from flower.options import default_options as flower_options

from tasks.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CREDENTIALS = {
    "POSTGRES_PASSWORD": "pg-secret",
    "REDIS_PASSWORD": "redis-secret",
    "FLOWER_USER": "admin",
    "FLOWER_PASSWORD": "flower-secret",
}
VARIABLE = re.compile(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}|\$(\w+)")
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")


class MissingVariable(Exception):
    """A `${VAR:?message}` whose variable is unset: Compose and sh refuse to go on."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(4)
        value = env.get(name, "")
        if m.group(2) == ":-":
            return value or m.group(3)
        if m.group(2) == ":?" and not value:
            raise MissingVariable(f"{name}: {m.group(3)}")
        return value

    return VARIABLE.sub(one, text)


def trapq_leaf(argv: list[str]) -> Any:
    """The command `trapq *argv` runs, its arguments and options parsed (not run).

    Typer ships its own click, so groups are recognised by their `commands`, not their type.
    """
    import tasks.commands  # noqa: F401  (registers the commands, as tasks.cli.main does)
    from tasks.cli_app import app

    command = typer.main.get_command(app)
    args = list(argv)
    path = ["trapq"]
    while hasattr(command, "commands"):
        assert args, f"`{' '.join(path)}` needs a subcommand"
        name = args.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, f"`{' '.join(path)}` has no command {name!r}"
        command, path = sub, [*path, name]
    with command.make_context(" ".join(path), args):
        return command


def celery_flower_options(argv: list[str]) -> dict[str, str]:
    """Check `celery -A tasks flower ...` names this repository's app; return Flower's options."""
    assert argv[:2] == ["-A", "tasks"], f"celery must load -A tasks, not {argv[:2]}"
    app = find_app(argv[1])
    assert isinstance(app, Celery) and app.main == "trapq"
    assert argv[2] in celery_cli.commands, f"celery has no command {argv[2]!r}"
    assert argv[2] == "flower", "only Flower is started through the celery command"
    options: dict[str, str] = {}
    for arg in argv[3:]:
        name, _, value = arg.removeprefix("--").partition("=")
        name = name.replace("-", "_")
        assert arg.startswith("--") and name in flower_options, f"not a Flower option: {arg}"
        options[name] = value
    return options


def check_entry_point(argv: list[str]) -> None:
    program, rest = argv[0], argv[1:]
    if program == "trapq":
        trapq_leaf(rest)
    elif program == "celery":
        celery_flower_options(rest)
    else:
        pytest.fail(f"{argv}: not a trapq or celery command")


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def service_argv(service: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    words = [*service.get("entrypoint", []), *service["command"]]
    assert all(isinstance(w, str) for w in words), "use the exec (list) form for commands"
    return [interpolate(w, env) for w in words]


def service_env(service: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    return {k: interpolate(str(v), env) for k, v in service.get("environment", {}).items()}


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def procfile_argv(line: str, env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """What sh runs for a Procfile line: leading VAR=value assignments, then argv."""
    words = [interpolate(w, env) for w in shlex.split(line)]
    assignments: dict[str, str] = {}
    while words and ASSIGNMENT.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        assignments[name] = value
    return assignments, words


def trapq_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose()["services"].items() if "build" in s}


def test_every_compose_command_is_a_trapq_or_celery_entry_point_of_this_repository() -> None:
    services = trapq_services()
    assert {"migrate", "worker", "flower"} <= services.keys()
    for name, service in services.items():
        argv = service_argv(service, CREDENTIALS)
        try:
            check_entry_point(argv)
        except AssertionError as exc:
            pytest.fail(f"service {name}: {exc}")
    assert service_argv(services["migrate"], CREDENTIALS) == ["trapq", "db", "upgrade"]
    assert service_argv(services["worker"], CREDENTIALS)[:2] == ["trapq", "worker"]


def test_postgres_and_redis_health_checks_gate_migrate_and_the_worker() -> None:
    services = compose()["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    assert services["postgres"]["volumes"], "the job store needs a volume"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    worker_deps = services["worker"]["depends_on"]
    assert worker_deps["migrate"]["condition"] == "service_completed_successfully"
    assert worker_deps["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"


def test_worker_reserves_the_nvidia_gpus() -> None:
    worker = compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    argv = service_argv(worker, CREDENTIALS)
    assert argv[argv.index("--gpus") + 1] == "all"


def test_every_trapq_service_gets_valid_postgresql_and_redis_urls() -> None:
    for name, service in trapq_services().items():
        env = service_env(service, CREDENTIALS)
        settings = Settings(
            database_url=env["TRAPQ_DATABASE_URL"],
            broker_url=env["TRAPQ_BROKER_URL"],
            result_backend=env["TRAPQ_RESULT_BACKEND"],
        )
        assert settings.database_url.startswith("postgresql+psycopg://"), name
        assert settings.database_url.endswith("@postgres:5432/trapq"), name
        assert settings.broker_url == "redis://:redis-secret@redis:6379/0", name
        assert settings.result_backend == "redis://:redis-secret@redis:6379/1", name


def test_a_second_machine_points_its_worker_at_the_first_machines_services() -> None:
    worker = compose()["services"]["worker"]
    remote = {"POSTGRES_HOST": "10.0.0.5", "REDIS_HOST": "10.0.0.5"}
    env = service_env(worker, {**CREDENTIALS, **remote})
    assert "@10.0.0.5:5432/" in env["TRAPQ_DATABASE_URL"]
    assert env["TRAPQ_BROKER_URL"].startswith("redis://:redis-secret@10.0.0.5:6379/")


@pytest.mark.parametrize("missing", ["FLOWER_USER", "FLOWER_PASSWORD"])
def test_compose_refuses_to_start_flower_without_credentials(missing: str) -> None:
    flower = compose()["services"]["flower"]
    env = {k: v for k, v in CREDENTIALS.items() if k != missing}
    with pytest.raises(MissingVariable, match=missing):
        service_env(flower, env)


def test_flower_runs_with_basic_auth_persistent_state_and_a_published_port() -> None:
    flower = compose()["services"]["flower"]
    env = service_env(flower, CREDENTIALS)
    assert env["FLOWER_BASIC_AUTH"] == "admin:flower-secret"
    assert "FLOWER_UNAUTHENTICATED_API" not in env
    options = celery_flower_options(service_argv(flower, CREDENTIALS)[1:])
    assert "basic_auth" not in options, "the password belongs in the environment, not argv"
    assert options["persistent"] == "True"
    db_dir = str(Path(options["db"]).parent)
    assert any(v.endswith(":" + db_dir) for v in flower["volumes"]), "Flower's db on a volume"
    assert any(p.endswith(":" + options["port"]) for p in flower["ports"])
    assert all(p.startswith("${PUBLISH_ADDR:-127.0.0.1}:") for p in flower["ports"])
    assert options["tasks_columns"] == flower_columns()


def flower_columns() -> str:
    """The task columns Flower shows (the same in compose and the Procfile): the names say
    job and chunk, args the chunk id, the result its counts."""
    columns = compose()["services"]["flower"]["command"]
    [option] = [c for c in columns if c.startswith("--tasks_columns=")]
    value = option.split("=", 1)[1]
    assert {"name", "args", "result"} <= set(value.split(",")), value
    return value


def test_procfile_starts_the_worker_flower_and_migrates_on_release() -> None:
    entries = procfile()
    assert entries.keys() == {"release", "worker", "flower", "antenna", "serve", "metrics"}
    env = {**CREDENTIALS, "FLOWER_PORT": "5599"}
    for name, line in entries.items():
        _, argv = procfile_argv(line, env)
        try:
            check_entry_point(argv)
        except AssertionError as exc:
            pytest.fail(f"Procfile {name}: {exc}")
    assert procfile_argv(entries["release"], env)[1] == ["trapq", "db", "upgrade"]
    assert procfile_argv(entries["worker"], env)[1][:2] == ["trapq", "worker"]
    assert procfile_argv(entries["antenna"], env)[1] == ["trapq", "antenna"]
    assert procfile_argv(entries["serve"], env)[1] == ["trapq", "serve", "--port", "2000"]
    assert procfile_argv(entries["metrics"], env)[1] == ["trapq", "metrics", "--port", "9808"]
    assignments, argv = procfile_argv(entries["flower"], env)
    assert assignments == {"FLOWER_BASIC_AUTH": "admin:flower-secret"}
    options = celery_flower_options(argv[1:])
    assert options.pop("port") == "5599"
    assert options == {"tasks_columns": flower_columns()}


@pytest.mark.parametrize("missing", ["FLOWER_USER", "FLOWER_PASSWORD"])
def test_procfile_flower_refuses_to_start_without_credentials(missing: str) -> None:
    env = {k: v for k, v in CREDENTIALS.items() if k != missing}
    with pytest.raises(MissingVariable, match=missing):
        procfile_argv(procfile()["flower"], env)


def test_dockerfile_installs_the_torch_builds_pyproject_pins() -> None:
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("torch", "torchvision"):
        pin = next(p for p in pins if re.fullmatch(rf"{package}==[\d.]+", p))
        assert re.search(rf"pip install[^\n]*\s{re.escape(pin)}(\s|$)", dockerfile), pin
    copied = set(re.findall(r"^COPY (\S+) ", dockerfile, re.M))
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pattern in packages["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"the image lacks the {pattern} package"


def test_readme_settings_table_is_the_one_generated_from_settings() -> None:
    script = ROOT / "bench" / "settings_table.py"
    spec = importlib.util.spec_from_file_location("settings_table", script)
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert (ROOT / "README.md").is_file(), "README.md is missing; it holds the settings table"
    readme = (ROOT / "README.md").read_text()
    assert generator.settings_block() in readme, (
        "README.md's settings table is stale: run .venv/bin/python -m bench.settings_table "
        "--write README.md"
    )
    documented = set(re.findall(r"`(TRAPQ_[A-Z0-9_]+)`", generator.settings_table()))
    assert documented == {f"TRAPQ_{name.upper()}" for name in Settings.model_fields}



def test_every_compose_variable_is_documented_in_env_example() -> None:
    compose_text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{(\w+)", compose_text))
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?(\w+)=", example, re.M))
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"
    required = set(re.findall(r"\$\{(\w+):\?", compose_text))
    assert required <= set(re.findall(r"^(\w+)=", example, re.M)), "required ones uncommented"
