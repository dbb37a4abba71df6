"""Daemon configuration: command-line flags, a TOML file over them, the shared flags.

Configuration (``parse_args_with_config``)
    Every option is a command-line flag; a TOML file may set any of them too.
    Precedence, lowest first: the parser's defaults < the TOML file < flags
    given explicitly on the command line. TOML keys are the flags' long names
    with ``-`` or ``_`` (``control``, ``failover-timeout``/``failover_timeout``),
    at top level. An unknown key or a value of the wrong type is a
    ``ConfigError`` naming the file and key. The default config file may be
    absent; a file named explicitly must exist. Named tables (``tables=``,
    e.g. ``[witness]``) are skipped here and read by their own module.
"""

from __future__ import annotations

import argparse
import logging
import tomllib
from collections.abc import Callable, Sequence
from typing import Any, cast

from xenbind.errors import ConfigError

log = logging.getLogger(__name__)


def load_toml(path: str, *, must_exist: bool) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict ({} if absent and not ``must_exist``)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        if must_exist:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action for every optional flag (help/version excluded)."""
    out = {}
    for a in parser._actions:  # argparse offers no public iterator
        if not a.option_strings or a.dest in ("help", "version") or a.dest is argparse.SUPPRESS:
            continue
        out[a.dest] = a
    return out


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The dests the command line set explicitly (parse again with no defaults)."""
    actions = _option_actions(parser)
    saved = {d: a.default for d, a in actions.items()}
    saved_parser_defaults = dict(parser._defaults)
    try:
        for a in actions.values():
            a.default = argparse.SUPPRESS
        parser._defaults.clear()
        ns, _ = parser.parse_known_args(argv)
    finally:
        for d, a in actions.items():
            a.default = saved[d]
        parser._defaults.update(saved_parser_defaults)
    return set(vars(ns))


def _convert(path: str, key: str, action: argparse.Action, value: Any) -> Any:
    where = f"config file {path}: key {key!r}"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert_one(where, action, v) for v in value]
    return _convert_one(where, action, value)


def _convert_one(where: str, action: argparse.Action, value: Any) -> Any:
    if isinstance(value, dict | list):
        raise ConfigError(f"{where}: expected a single value, got {value!r}")
    if isinstance(value, bool) and action.type not in (None, bool):
        raise ConfigError(f"{where}: expected a value, got {value!r}")
    # argparse also allows a registered type's name here; this project's
    # parsers give callables only
    conv = cast("Callable[[Any], Any] | None", action.type)
    result: Any  # what the option's type makes of the value
    try:
        if conv is None:
            result = value if isinstance(value, str) else str(value)
        elif conv in (int, float) and isinstance(value, int | float):
            if conv is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            result = conv(value)
        else:
            result = conv(str(value)) if not isinstance(value, str) else conv(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError, ConfigError) as e:
        raise ConfigError(f"{where}: invalid value {value!r} ({e})") from None
    if isinstance(value, str) and isinstance(result, int | float) and not isinstance(result, bool):
        # a TOML string is never a number: `interval = "100"` is a typo the
        # file's reader should hear about, not a value quietly converted
        raise ConfigError(f"{where}: expected a number, got the string {value!r} (write {value})")
    return result if action.choices is None else _choice(where, action, result)


def _choice(where: str, action: argparse.Action, result: Any) -> Any:
    assert action.choices is not None
    if result not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{where}: {result!r} is not one of {choices}")
    return result


def parse_args_with_config(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    *,
    config_dest: str = "config",
    default_config: str | None = None,
    tables: Sequence[str] = (),
) -> argparse.Namespace:
    """Parse ``argv`` with defaults < TOML file < explicit flags.

    The file is the value of the ``config_dest`` option (``--config``) if
    given, else ``default_config`` (which may be absent). The returned
    namespace has ``config`` set to the file actually read, or None.
    ``tables``: top-level keys left to their own readers when they hold a
    TOML table (``("witness",)``: daemonkit.witness reads ``[witness]``);
    such a key holding anything else is still an error.
    """
    args = parser.parse_args(argv)
    explicit = _explicit_dests(parser, argv)
    path = getattr(args, config_dest, None)
    named = config_dest in explicit and path is not None
    if not named:
        path = default_config
    setattr(args, config_dest, None)
    if path is None:
        return args
    data = load_toml(path, must_exist=named)
    if not data:
        return args
    actions = _option_actions(parser)
    for key, value in data.items():
        if key in tables and isinstance(value, dict):
            continue  # its own reader's (e.g. daemonkit.witness.load_witness_config)
        dest = key.replace("-", "_")
        if dest == config_dest or dest not in actions:
            known = ", ".join(sorted(d.replace("_", "-") for d in actions if d != config_dest))
            raise ConfigError(f"config file {path}: unknown key {key!r} (known keys: {known})")
        if dest in explicit:
            continue  # the command line wins
        setattr(args, dest, _convert(path, key, actions[dest], value))
    setattr(args, config_dest, path)
    return args


def add_daemon_arguments(
    parser: argparse.ArgumentParser, *, config: str, control: str, insecure_help: str
) -> None:
    """The options both daemons have: --config (``config`` used if it exists),
    --control (default ``control``), --sim-dir, --insecure (what plaintext means
    for this daemon: ``insecure_help``), --metrics (daemonkit.metrics) and
    --control-group."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=config,
        help=f"TOML configuration file (default {config}, used if it exists)",
    )
    parser.add_argument(
        "--control",
        metavar="PATH",
        default=control,
        help=f"control socket remusctl talks to (default {control}; mode 0600, "
        "0660 with --control-group)",
    )
    parser.add_argument(
        "--sim-dir",
        metavar="DIR",
        help="use the simulated host whose directory is DIR instead of Xen",
    )
    parser.add_argument("--insecure", action="store_true", help=insecure_help)
    parser.add_argument(
        "--metrics",
        metavar="ADDRESS",
        help="serve Prometheus metrics at http://ADDRESS/metrics: PORT (on 127.0.0.1), "
        "HOST:PORT or [V6]:PORT (default: off)",
    )
    add_control_group_argument(parser)


def add_control_group_argument(parser: argparse.ArgumentParser) -> None:
    """``--control-group GROUP`` (TOML ``control-group``): who else may use the control socket."""
    parser.add_argument(
        "--control-group",
        metavar="GROUP",
        help="also let members of GROUP use the control socket (mode 0660, "
        "owned by GROUP); default: only root and the daemon's user "
        "(mode 0600). Every client is checked with SO_PEERCRED",
    )
