"""Settings shared by every Hive Flow C service.

Each service subclasses :class:`HiveSettings` (through :class:`PostgresSettings`, as each has
a database of its own) in its own ``config.py`` with its own environment prefix, and
overrides the defaults that differ (name, ports)::

    class TicketSettings(PostgresSettings):
        model_config = SettingsConfigDict(env_prefix="HIVE_TICKETS_")

        service_name: str = "execution-ticket-service"
        grpc_port: int = 50052
        postgres_dsn: SecretStr = SecretStr("postgresql://localhost/tickets")

``HIVE_TICKETS_GRPC_PORT=1234`` then configures only that service. The settings object is
built once in ``__main__`` / ``app.py`` and passed down; never at module level.

A duration setting (its name ends in ``_seconds``, ``_hours`` or ``_ms``) must have an upper
bound, and a float one is a ``FiniteFloat``::

    sweep_interval_seconds: FiniteFloat = Field(default=2.0, gt=0, le=DAY)

An unbounded one was accepted up to ``inf`` and then overflowed where the service turned it
into a ``timedelta`` or a date (a traceback at start-up, or a background loop dead), instead
of being an invalid setting; a subclass declaring one is a ``TypeError`` at import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol, Self

from pydantic import (
    Field,
    FiniteFloat,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from hive_common.auth import DEFAULT_AUDIENCE, DEFAULT_ISSUER, TokenVerifier

LogFormat = Literal["auto", "json", "pretty"]

DEVELOPMENT_JWT_SECRET = "hive-flow-c-local-development-only-insecure-jwt-secret"
"""Default signing secret, fit only for a developer's machine; start-up warns loudly."""

MIN_JWT_SECRET_BYTES = 32
"""HS256 keys shorter than the hash output (32 bytes) are weak (RFC 7518, section 3.2)."""

MINUTE = 60
HOUR = 60 * MINUTE
DAY = 24 * HOUR
YEAR = 365 * DAY
"""Seconds in a minute, an hour, a day, a year: the units duration settings' bounds are
written in."""

TOKEN_TTL_LIMIT = 30 * DAY
"""The longest lifetime a token setting may give: a credential living longer than a month
is one nobody rotates."""

RETENTION_LIMIT = 5 * YEAR
"""The longest retention of a history setting (events kept for watchers)."""

DURATION_SUFFIXES = ("_seconds", "_hours", "_ms")
"""How a duration setting's name ends; each must have an upper bound (``le`` or ``lt``)."""

_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def unbounded_durations(settings: type[BaseSettings]) -> list[str]:
    """The duration settings of ``settings`` (named ``*_seconds``, ``*_hours``, ``*_ms``)
    without an upper bound (pydantic's ``le`` / ``lt``)."""
    return [
        name
        for name, field in settings.model_fields.items()
        if name.endswith(DURATION_SUFFIXES)
        and not any(
            getattr(rule, "le", None) is not None or getattr(rule, "lt", None) is not None
            for rule in field.metadata
        )
    ]


def normalise_log_level(value: object) -> object:
    """A log level setting in any case, ``WARN`` for ``WARNING``; ``ValueError`` for an
    unknown one (a settings validator of the services and the worker)."""
    if isinstance(value, str):
        upper = value.strip().upper()
        if upper == "WARN":
            upper = "WARNING"
        if upper not in _LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
        return upper
    return value


def invalid_settings_message(
    program: str, exc: ValidationError, env_prefix: str, flags: Mapping[str, str] | None = None
) -> str:
    """What ``program`` prints for invalid settings: one line per setting, named by its
    environment variable (and its command-line flag in ``flags``, by field), saying what
    is wrong; never the value given (it may be a secret, and pydantic's own text shows it)."""
    lines = [f"{program}: invalid settings:"]
    flags = flags or {}
    for error in exc.errors(include_url=False, include_input=False):
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a rule across settings: its message names them (env_name)
            lines.append(f"  {message}")
            continue
        name, *inner = error["loc"]
        setting = f"{env_prefix}{str(name).upper()}"
        if str(name) in flags:
            setting = f"{flags[str(name)]} / {setting}"
        where = "".join(f"[{i}]" for i in inner)
        lines.append(f"  {setting}{where}: {message}")
    return "\n".join(lines)


class WarningLogger(Protocol):
    """Anything with a structlog-style ``warning(event, **fields)`` method."""

    def warning(self, event: str | None = ..., *args: Any, **fields: Any) -> Any: ...


class HiveSettings(BaseSettings):
    """Base settings: logging, bind address, ports, JWT, start-up wait, shutdown grace, HTTP
    keep-alive.

    Environment variables are ``<env_prefix><FIELD>`` (case-insensitive); the base prefix is
    ``HIVE_`` and each service sets its own (``HIVE_TICKETS_``, ``HIVE_REGISTRY_``,
    ``HIVE_ORCHESTRATOR_``). Empty variables count as unset, so ``HIVE_X_METRICS_PORT=``
    keeps the service's own default: ``None`` (``/metrics`` on the HTTP app) here and in the
    registry and the orchestrator, but 9092 in the ticket service, whose separate metrics
    listener cannot be turned off.
    """

    model_config = SettingsConfigDict(
        env_prefix="HIVE_",
        env_ignore_empty=True,
        extra="ignore",
        validate_default=True,
        # pydantic's own text of an error shows the value given: a secret, for some.
        hide_input_in_errors=True,
    )

    service_name: str = "hive-service"
    log_level: str = "INFO"
    log_format: LogFormat = "auto"
    host: str = "0.0.0.0"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    http_port: int = Field(default=8000, ge=0, le=65535)
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Own port for /metrics; None serves /metrics on the HTTP app.",
    )
    jwt_secret: SecretStr = SecretStr(DEVELOPMENT_JWT_SECRET)
    jwt_accepted_secret: SecretStr | None = Field(
        default=None,
        description=(
            "A second secret whose tokens are valid too (it signs nothing): the other one "
            "while the JWT secret is rotated."
        ),
    )
    jwt_issuer: str = DEFAULT_ISSUER
    jwt_audience: str = DEFAULT_AUDIENCE
    startup_timeout_seconds: FiniteFloat = Field(
        default=60.0,
        gt=0,
        le=DAY,
        description="How long start-up waits for the service's PostgreSQL database.",
    )
    shutdown_grace_seconds: FiniteFloat = Field(default=10.0, ge=0, le=HOUR)
    http_keep_alive_seconds: int = Field(
        default=75,
        ge=1,
        le=HOUR,
        description=(
            "How long an idle HTTP connection is kept open. Longer than the clients' and "
            "load balancers' own idle timeouts (httpx 5 s, AWS ALB 60 s), so that they, not "
            "the server, close it: a request sent as the server closes fails."
        ),
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        # Checked once here rather than remembered at each new setting: an unbounded
        # duration is accepted up to inf and overflows later, far from the settings.
        unbounded = unbounded_durations(cls)
        if unbounded:
            raise TypeError(
                f"{cls.__name__}: duration settings need an upper bound (le=...): "
                + ", ".join(unbounded)
            )

    @field_validator("log_level", mode="before")
    @classmethod
    def _normalise_log_level(cls, value: object) -> object:
        return normalise_log_level(value)

    @field_validator("jwt_secret", "jwt_accepted_secret")
    @classmethod
    def _check_jwt_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < MIN_JWT_SECRET_BYTES:
            raise ValueError(f"must be at least {MIN_JWT_SECRET_BYTES} bytes for HS256")
        return value

    def cross_field_violations(self) -> list[str]:
        """The rules across settings these settings break, one message each, naming the
        environment variables (:meth:`env_name`). A subclass with rules of its own extends
        it (``violations = super().cross_field_violations()``, then appends its own); all
        of them are reported together, one error each. They are checked only once every
        setting is valid on its own (pydantic builds nothing to check them on before)."""
        return []

    @model_validator(mode="after")
    def _check_cross_field_rules(self) -> Self:
        violations = self.cross_field_violations()
        if violations:
            # One error per rule (a ValueError would be one error for the first only).
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError("settings_rule", violation),
                        loc=(),
                        input=None,
                    )
                    for violation in violations
                ],
            )
        return self

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable that sets ``field``: ``env_name("grpc_port")`` is
        ``HIVE_TICKETS_GRPC_PORT`` in the ticket service. What a rule across settings
        names in its message (``invalid_settings_message`` prints that message as it is);
        ``KeyError`` for a name that is not a setting, so a typo fails every test that
        builds the settings instead of naming a variable that does not exist."""
        if field not in cls.model_fields:
            raise KeyError(f"{cls.__name__} has no setting {field!r}")
        return f"{cls.model_config.get('env_prefix', '')}{field.upper()}"

    def token_verifier(self) -> TokenVerifier:
        """What checks the tokens this service is given: signed with ``jwt_secret`` or
        ``jwt_accepted_secret``, for ``jwt_audience``, issued by ``jwt_issuer``."""
        accepted = self.jwt_accepted_secret
        return TokenVerifier(
            secret=self.jwt_secret.get_secret_value(),
            audience=self.jwt_audience,
            issuers=[self.jwt_issuer],
            accepted_secrets=[accepted.get_secret_value()] if accepted else [],
        )

    @property
    def uses_development_jwt_secret(self) -> bool:
        """True when no real secret was configured."""
        return self.jwt_secret.get_secret_value() == DEVELOPMENT_JWT_SECRET

    def warn_if_insecure(self, logger: WarningLogger) -> bool:
        """Log a loud warning when the development JWT secret is in use; True if it is.

        Call once at start-up, after logging is configured.
        """
        if not self.uses_development_jwt_secret:
            return False
        prefix = self.model_config.get("env_prefix", "")
        logger.warning(
            "INSECURE_DEVELOPMENT_JWT_SECRET",
            service=self.service_name,
            detail=(
                "tokens are signed with the public development secret; anyone can forge them. "
                f"Set {prefix}JWT_SECRET to a random value of at least "
                f"{MIN_JWT_SECRET_BYTES} bytes outside local development."
            ),
        )
        return True


class PostgresSettings(HiveSettings):
    """A service with a PostgreSQL database of its own: the DSN (a secret, as it usually
    carries a password: ``repr(settings)`` shows ``**********``) and its pool's sizes."""

    postgres_dsn: SecretStr = SecretStr("postgresql://localhost/postgres")
    postgres_pool_min_size: int = Field(default=2, ge=1)
    postgres_pool_max_size: int = Field(default=10, ge=1)

    @field_validator("postgres_dsn")
    @classmethod
    def _check_postgres_dsn(cls, secret: SecretStr) -> SecretStr:
        # Parsed only at start-up before: a traceback (exit 1), or start-up retrying it as
        # "not ready" until its timeout. Imported here: the hive CLI reads this module, and
        # psycopg would double its start-up time.
        from hive_common.postgres import dsn_problem

        problem = dsn_problem(secret.get_secret_value())
        if problem is not None:
            raise ValueError(f"not a PostgreSQL connection string: {problem}")
        return secret

    def cross_field_violations(self) -> list[str]:
        violations = super().cross_field_violations()
        if self.postgres_pool_min_size > self.postgres_pool_max_size:
            name = self.env_name
            violations.append(
                f"{name('postgres_pool_min_size')} must not exceed {name('postgres_pool_max_size')}"
            )
        return violations


__all__ = [
    "DAY",
    "DEVELOPMENT_JWT_SECRET",
    "DURATION_SUFFIXES",
    "HOUR",
    "MINUTE",
    "MIN_JWT_SECRET_BYTES",
    "RETENTION_LIMIT",
    "TOKEN_TTL_LIMIT",
    "YEAR",
    "HiveSettings",
    "LogFormat",
    "PostgresSettings",
    "WarningLogger",
    "normalise_log_level",
    "unbounded_durations",
]
