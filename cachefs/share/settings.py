"""Where ``--erofs-artifacts`` comes from when the command line does not say.

Order: the option, then ``$CACHEFS_EROFS_ARTIFACTS``, then the ``erofs-artifacts`` key of
the ``[pull]`` table in the first config file that exists among ``$CACHEFS_CONFIG``,
``$XDG_CONFIG_HOME/cachefs/config.toml`` (``~/.config/…``) and
``/etc/cachefs/config.toml``; else ``auto``. A bad value anywhere is a one-line
UsageError naming where it was found, never silently ``auto``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import UsageError
from .fetch import ENV, ArtifactPolicy


def config_files(environ: Mapping[str, str]) -> list[Path]:
    if environ.get("CACHEFS_CONFIG"):
        return [Path(environ["CACHEFS_CONFIG"])]
    xdg = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")).expanduser()
                                                / ".config")
    return [Path(xdg) / "cachefs" / "config.toml", Path("/etc/cachefs/config.toml")]


def artifact_policy(option: str | None = None,
                    environ: Mapping[str, str] | None = None) -> ArtifactPolicy:
    env = os.environ if environ is None else environ
    if option:
        return ArtifactPolicy.parse(option, "--erofs-artifacts")
    if env.get(ENV):
        return ArtifactPolicy.parse(env[ENV], f"${ENV}")
    for path in config_files(env):
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot read config {path}: {err}") from None
        import tomllib  # here: without a config file the parser is never loaded

        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"cannot read config {path}: {err}") from None
        table = doc.get("pull")
        value = table.get("erofs-artifacts") if isinstance(table, dict) else None
        if value is not None:
            return ArtifactPolicy.parse(str(value), f"{path} [pull] erofs-artifacts")
        return ArtifactPolicy.AUTO
    return ArtifactPolicy.AUTO
