"""``modelgate keys set-plan``: give an API key a limits plan and per-key
overrides, taking effect on running workers without a restart.

Registered on the ``keys`` group by ``gateway.cli``; imports the CLI helpers
lazily (``gateway.cli`` imports this module).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from gateway.cli_common import ConfigOption

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


def keys_set_plan(
    key_id: Annotated[str, typer.Argument(help="The key id.")],
    plan: Annotated[str, typer.Argument(help="A plan name from limits.plans.")],
    overrides: OverridesOption = None,
    config: ConfigOption = None,
) -> None:
    """Set a key's plan (and overrides; none if omitted). Workers apply it
    within auth.key_cache_ttl_s."""
    from gateway.cli import _key_store, _run, _settings

    settings = _settings(config)

    async def set_plan() -> bool:
        async with _key_store(settings) as store:
            return bool(await store.set_plan(key_id, plan, parse_overrides(overrides)))

    if not _run(set_plan()):
        typer.echo(f"no key {key_id}", err=True)
        raise typer.Exit(1)
    if plan != "default" and plan not in settings.limits.plans:
        typer.echo(
            f"warning: plan {plan!r} is not in this configuration's limits.plans;"
            " workers use the default plan until it is defined",
            err=True,
        )
    typer.echo(f"key {key_id}: plan {plan}")


def register(keys_app: typer.Typer) -> None:
    """Add ``set-plan`` to the ``keys`` command group."""
    keys_app.command("set-plan")(keys_set_plan)
