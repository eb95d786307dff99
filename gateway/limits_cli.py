"""``modelgate keys set-plan``: give an API key a limits plan and per-key
overrides, taking effect on running workers without a restart.

Registered on the ``keys`` group by ``gateway.cli``; imports the CLI helpers
lazily (``gateway.cli`` imports this module).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import pydantic
import typer

from gateway.cli_common import ConfigOption

if TYPE_CHECKING:
    from gateway.config import Settings

OverridesOption = Annotated[
    str | None,
    typer.Option(
        "--overrides",
        help="JSON object of plan fields replacing the plan's for this key, e.g. "
        '\'{"quota": {"daily": 5000}}\'.',
    ),
]


def parse_overrides(text: str | None) -> dict[str, Any] | None:
    """The ``--overrides`` option as a dict (``None`` when absent).

    Raises
    ------
    ValueError
        Not a JSON object.
    """
    if not text:
        return None
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("--overrides must be a JSON object")
    return value


def overrides_or_exit(text: str | None) -> dict[str, Any] | None:
    """``--overrides`` checked against the plan fields, or exit 2 with one
    line per bad field: its path, the value given and what is allowed.

    Raises
    ------
    typer.Exit
        Code 2: not a JSON object, or a field the plan does not accept.
    """
    from gateway.config import PlanConfig

    try:
        overrides = parse_overrides(text)
    except ValueError as exc:
        # json.JSONDecodeError is a ValueError.
        typer.echo(f"error [BAD_ARGUMENT]: --overrides: {exc}", err=True)
        raise typer.Exit(2) from exc
    if overrides is None:
        return None
    try:
        PlanConfig.model_validate(overrides)
    except pydantic.ValidationError as exc:
        for line in describe_overrides_error(exc):
            typer.echo(f"error [BAD_ARGUMENT]: --overrides {line}", err=True)
        raise typer.Exit(2) from exc
    return overrides


def describe_overrides_error(exc: pydantic.ValidationError) -> list[str]:
    """One line per bad field of a plan override: ``path = value: rule``.

    Examples
    --------
    >>> from gateway.config import PlanConfig
    >>> try:
    ...     PlanConfig.model_validate({"in_flight": {"limit": 0}})
    ... except pydantic.ValidationError as exc:
    ...     describe_overrides_error(exc)
    ['in_flight.limit = 0: Input should be greater than or equal to 1']
    """
    from gateway.config import PlanConfig

    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(the object)"
        given = json.dumps(err.get("input"), default=str)
        if len(given) > 60:
            given = given[:59] + "…"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(PlanConfig.model_fields)
            rule = f"not a plan field (a plan has {allowed})"
        else:
            rule = err["msg"].removeprefix("Value error, ")
        lines.append(f"{path} = {given}: {rule}")
    return lines


async def known_plans(settings: Settings) -> list[str]:
    """The plans the workers run: the live configuration's newest version,
    or the settings file's before any was published. ``default`` is always
    known (without a definition it is the legacy one-window plan).

    Raises
    ------
    ModelgateError
        The configuration topic could not be read.
    """
    from gateway.liveconfig.service import ConfigService

    async with ConfigService(settings) as service:
        _, document = await service.current()
    return sorted({"default", *document.limits.plans})


def plan_or_exit(settings: Settings, plan: str) -> None:
    """Exit 2, listing the known plans, unless ``plan`` is one of them.

    A key naming a plan no configuration defines would silently run on the
    default plan (the worker's fallback for a plan removed later), so a
    typo would go unnoticed: define the plan first (``modelgate config set
    limits.plans=...`` or the settings file), then give it to keys.

    Raises
    ------
    typer.Exit
        Code 2 for an unknown plan, 1 when the configuration cannot be read.
    """
    from gateway.cli import _run

    if plan == "default":
        # Always known; and no need to reach Kafka for the usual case.
        return
    plans = _run(known_plans(settings))
    if plan not in plans:
        typer.echo(
            f"error [BAD_ARGUMENT]: no plan {plan!r} in the running configuration; "
            f"the plans are: {', '.join(plans)} (define it in limits.plans "
            "first: the settings file, or modelgate config set "
            "limits.plans='{...}' with every plan)",
            err=True,
        )
        raise typer.Exit(2)


def keys_set_plan(
    key_id: Annotated[str, typer.Argument(help="The key id.")],
    plan: Annotated[str, typer.Argument(help="A plan name from limits.plans.")],
    overrides: OverridesOption = None,
    config: ConfigOption = None,
) -> None:
    """Set a key's plan (and overrides; none if omitted). Workers apply it
    within auth.key_cache_ttl_s. The plan must be defined in the running
    configuration (exit 2, listing the plans, if not)."""
    from gateway.cli import _key_store, _run, _settings

    settings = _settings(config)
    parsed = overrides_or_exit(overrides)
    plan_or_exit(settings, plan)

    async def set_plan() -> bool:
        async with _key_store(settings) as store:
            return bool(await store.set_plan(key_id, plan, parsed))

    if not _run(set_plan()):
        typer.echo(f"error [NOT_FOUND]: no key {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"key {key_id}: plan {plan}")


def register(keys_app: typer.Typer) -> None:
    """Add ``set-plan`` to the ``keys`` command group."""
    keys_app.command("set-plan")(keys_set_plan)
