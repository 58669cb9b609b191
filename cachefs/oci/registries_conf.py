"""containers-registries.conf(5), version 2: where a reference is really pulled from.

The reference a user types is the image's *logical* name: it stays the cache key, the view
path and what ``images`` shows, as in podman. This module answers, for that name, which
*physical* locations to try (mirrors in order, then the primary ``location``), whether they
may speak plain HTTP, and whether the name is blocked. It reads the same files podman and
skopeo read, in the same order, with the same merge rules (facts from containers/image's
``sysregistriesv2`` and its man pages):

* the main file is ``$CONTAINERS_REGISTRIES_CONF`` (or ``$REGISTRIES_CONFIG_PATH``) when set
  (it must exist), else ``$HOME/.config/containers/registries.conf`` when it exists, else
  ``/etc/containers/registries.conf`` (may be missing);
* then the ``*.conf`` drop-ins of ``/etc/containers/registries.conf.d`` and
  ``$HOME/.config/containers/registries.conf.d`` in name order — only the user directory
  when the user's main file was chosen. Drop-ins must be v2;
* later files replace ``[[registry]]`` tables with the same ``prefix``,
  ``unqualified-search-registries`` and ``short-name-mode`` when they set them, and single
  ``[aliases]`` (an empty value erases one). The machine-written
  ``short-name-aliases.conf`` wins over every alias in registries.conf files.

A ``[[registry]]`` table is chosen by the longest ``prefix`` that the repository name
(``host[:port]/path``, without tag or digest) starts with, followed by ``/``, ``:``, ``@``
or the end; ``*.example.com`` matches any subdomain. Unlike containers/image (which calls
its behaviour unintended), a bare ``example.com`` does not cover ``example.com:5000``.
``location`` replaces the matched prefix; a mirror's ``location`` does the same. Docker
Hub names carry their ``library/`` (``docker.io/library/debian``), so a prefix of
``docker.io`` covers them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InvalidReference, RegistryBlocked
from ..reference import Reference

SYSTEM_CONF = Path("/etc/containers/registries.conf")
SYSTEM_CONF_DIR = Path("/etc/containers/registries.conf.d")
USER_CONF = Path(".config/containers/registries.conf")
USER_CONF_DIR = Path(".config/containers/registries.conf.d")
SHORT_NAME_ALIASES = Path("containers/short-name-aliases.conf")
MAX_CONF_BYTES = 1 << 20  # a registries.conf is a few KiB; refuse anything absurd
PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")
SHORT_NAME_MODES = ("enforcing", "permissive", "disabled")


@dataclass(frozen=True)
class Endpoint:
    """A physical location: a registry host with an optional namespace below it."""

    location: str
    insecure: bool | None = None  # None: not set (the loopback fallback stays on)
    pull_from_mirror: str = "all"


@dataclass(frozen=True)
class RegistryEntry:
    """One ``[[registry]]`` table after validation."""

    prefix: str
    endpoint: Endpoint
    blocked: bool = False
    mirrors: tuple[Endpoint, ...] = ()
    mirror_by_digest_only: bool = False
    origin: str = ""


@dataclass(frozen=True)
class PullSource:
    """Where to try a logical reference: the rewritten (physical) reference and its TLS rule."""

    reference: Reference
    insecure: bool | None
    mirror: bool


@dataclass(frozen=True)
class RegistriesConf:
    """The merged configuration; an empty one (no files) changes nothing."""

    registries: tuple[RegistryEntry, ...] = ()
    unqualified_search: tuple[str, ...] = ()
    short_name_mode: str = "permissive"
    aliases: Mapping[str, tuple[str | None, str]] = field(default_factory=dict)
    files: tuple[Path, ...] = ()

    def find(self, name: str) -> RegistryEntry | None:
        """The table with the longest prefix matching ``name`` (``host[:port]/repo``)."""
        best: RegistryEntry | None = None
        for entry in self.registries:
            if _prefix_match(name, entry.prefix) >= 0 and (
                    best is None or len(entry.prefix) > len(best.prefix)):
                best = entry
        return best

    def where(self) -> str:
        return ", ".join(str(p) for p in self.files) or "registries.conf"

    def pull_sources(self, ref: Reference) -> list[PullSource]:
        """Mirrors (as ``pull-from-mirror`` allows), then the primary location; never empty.

        Raises RegistryBlocked when the reference, or every location for it, is blocked.
        """
        entry = self.find(ref.name)
        if entry is None:
            return [PullSource(ref, None, mirror=False)]
        if entry.blocked:
            raise RegistryBlocked(f"{ref}: registry {entry.prefix} is blocked in {entry.origin}")
        digested = ref.digest is not None
        mirrors = [m for m in entry.mirrors
                   if (digested if entry.mirror_by_digest_only else
                       m.pull_from_mirror == "all"
                       or (m.pull_from_mirror == "digest-only") == digested)]
        sources: list[PullSource] = []
        for endpoint, is_mirror in [*((m, True) for m in mirrors), (entry.endpoint, False)]:
            physical = _rewrite(ref, entry.prefix, endpoint.location)
            other = self.find(physical.name) if physical.name != ref.name else None
            if other is not None and other.blocked:
                continue
            sources.append(PullSource(physical, endpoint.insecure, is_mirror))
        if not sources:
            raise RegistryBlocked(f"{ref}: every location for {entry.prefix} is blocked in "
                                  f"{self.where()}")
        return sources

    def insecure_for(self, host: str) -> bool | None:
        """The ``insecure`` setting of the table for a registry host (None: not set)."""
        entry = self.find(host)
        return None if entry is None else entry.endpoint.insecure

    def expand_short_name(self, text: str) -> list[str]:
        """The fully-qualified references a typed name stands for, in the order to try.

        A qualified name (``host/...``) is itself. A short one is its alias when there is one,
        else one candidate per ``unqualified-search-registries`` entry; with no search
        registries it is Docker Hub, as docker and msb do (podman refuses).
        """
        if is_qualified(text):
            return [text]
        name, suffix = _split_suffix(text)
        alias = self.aliases.get(name)
        if alias is not None:
            value, _origin = alias
            if value is not None:
                return [value + suffix]
        if not self.unqualified_search:
            return [text]
        if self.short_name_mode == "enforcing" and len(self.unqualified_search) > 1:
            raise InvalidReference(
                f"short name {text!r} is ambiguous: it may come from any of "
                f"{', '.join(self.unqualified_search)} and short-name-mode is enforcing",
                hint="use a fully-qualified reference or add an [aliases] entry",
            )
        return [f"{registry}/{text}" for registry in self.unqualified_search]


def is_qualified(text: str) -> bool:
    """Whether a typed reference names its registry (the rule docker and podman share)."""
    first, sep, _ = text.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def _split_suffix(text: str) -> tuple[str, str]:
    """``name:tag@digest`` → (``name``, ``:tag@digest``)."""
    name, at, digest = text.partition("@")
    suffix = at + digest
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        name, suffix = name[:colon], name[colon:] + suffix
    return name, suffix


def _prefix_match(ref: str, prefix: str) -> int:
    """Length of ``ref`` the prefix covers, or -1 (containers/image's refMatchingPrefix)."""
    if prefix.startswith("*."):
        index = ref.find(prefix[1:])
        if index < 0 or "/" in ref[:index]:
            return -1
        index += len(prefix) - 1
        return index if index == len(ref) or ref[index] in ":/@" else -1
    if ref == prefix:
        return len(prefix)
    if not ref.startswith(prefix) or ref[len(prefix)] not in ":/@":
        return -1
    if ref[len(prefix)] == ":" and "/" not in prefix:
        return -1  # a port, not a tag: example.com does not cover example.com:5000
    return len(prefix)


def _rewrite(ref: Reference, prefix: str, location: str) -> Reference:
    if not location:  # a wildcard table without location: settings only, no rewrite
        return ref
    text = str(ref)
    cut = _prefix_match(text, prefix)
    if cut < 0:
        return ref
    try:
        return Reference.parse(location + text[cut:])
    except InvalidReference as err:
        raise ConfigError(f"registries.conf: location {location!r} for prefix {prefix!r} "
                          f"does not make a valid reference of {ref}: {err}") from None


# loading ---------------------------------------------------------------------------------


def conf_files(environ: Mapping[str, str] | None = None) -> tuple[Path, bool, list[Path]]:
    """(main file, must it exist, drop-in directories) in podman's precedence."""
    env = os.environ if environ is None else environ
    home = Path(env.get("HOME") or Path.home())
    override = env.get("CONTAINERS_REGISTRIES_CONF") or env.get("REGISTRIES_CONFIG_PATH")
    if override:
        return Path(override), True, [SYSTEM_CONF_DIR, home / USER_CONF_DIR]
    if (home / USER_CONF).exists():
        return home / USER_CONF, False, [home / USER_CONF_DIR]
    return SYSTEM_CONF, False, [SYSTEM_CONF_DIR, home / USER_CONF_DIR]


def short_name_aliases_file(environ: Mapping[str, str] | None = None) -> Path:
    """podman's machine-written aliases: /var/cache for root, else the XDG cache home."""
    env = os.environ if environ is None else environ
    if os.geteuid() == 0:
        return Path("/var/cache") / SHORT_NAME_ALIASES
    cache = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(cache) / SHORT_NAME_ALIASES


def load_registries_conf(environ: Mapping[str, str] | None = None) -> RegistriesConf:
    """Read and merge every file podman would, or raise ConfigError naming the bad one."""
    main, required, dirs = conf_files(environ)
    merged = _Merged()
    doc = _read_toml(main, required)
    if doc is not None:
        merged.update(_parse(doc, main, allow_v1=True), main)
    for directory in dirs:
        try:
            names = sorted(p for p in directory.iterdir()
                           if p.name.endswith(".conf") and not p.is_dir())
        except FileNotFoundError:
            continue
        except OSError as err:
            raise ConfigError(f"cannot read {directory}: {err.strerror}") from None
        for path in names:
            doc = _read_toml(path, False)
            if doc is not None:
                merged.update(_parse(doc, path, allow_v1=False), path)
    aliases_file = short_name_aliases_file(environ)
    doc = _read_toml(aliases_file, False)
    if doc is not None:
        merged.aliases.update(_parse_aliases(doc.get("aliases", {}), aliases_file))
        merged.files.append(aliases_file)
    return RegistriesConf(
        registries=tuple(merged.registries[p] for p in sorted(merged.registries)),
        unqualified_search=tuple(merged.search),
        short_name_mode=merged.mode,
        aliases=dict(merged.aliases),
        files=tuple(merged.files),
    )


@dataclass(eq=False, repr=False)
class _Parsed:
    registries: dict[str, RegistryEntry]
    search: list[str] | None
    mode: str | None
    aliases: dict[str, tuple[str | None, str]]


@dataclass(eq=False, repr=False)
class _Merged:
    registries: dict[str, RegistryEntry] = field(default_factory=dict)
    search: list[str] = field(default_factory=list)
    mode: str = "permissive"
    aliases: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def update(self, parsed: _Parsed, path: Path) -> None:
        self.registries.update(parsed.registries)
        if parsed.search is not None:
            self.search = parsed.search
        if parsed.mode is not None:
            self.mode = parsed.mode
        self.aliases.update(parsed.aliases)
        self.files.append(path)


def _read_toml(path: Path, required: bool) -> dict[str, Any] | None:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONF_BYTES + 1)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"registries configuration {path} does not exist",
                              hint="check $CONTAINERS_REGISTRIES_CONF") from None
        return None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    if len(data) > MAX_CONF_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONF_BYTES} bytes; refusing it")
    import tomllib  # here: a machine without these files never loads the parser

    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def _parse(doc: dict[str, Any], path: Path, *, allow_v1: bool) -> _Parsed:
    v1 = doc.get("registries")
    if isinstance(v1, dict) and v1:
        if not allow_v1:
            raise ConfigError(f"{path}: drop-in files must use the version 2 format")
        if any(k in doc for k in ("registry", "unqualified-search-registries", "aliases")):
            raise ConfigError(f"{path}: mixes the version 1 and version 2 formats")
        doc = _v1_to_v2(v1, path)
    registries: dict[str, RegistryEntry] = {}
    tables = doc.get("registry", [])
    if not isinstance(tables, list):
        raise ConfigError(f"{path}: [[registry]] must be an array of tables")
    for table in tables:
        entry = _parse_registry(table, path)
        registries.setdefault(entry.prefix, entry)  # first of a duplicated prefix wins
    _check_conflicts(list(registries.values()), path)
    search = doc.get("unqualified-search-registries")
    if search is not None:
        if not isinstance(search, list) or not all(isinstance(s, str) for s in search):
            raise ConfigError(f"{path}: unqualified-search-registries must be a list of strings")
        search = [_location(s, path, "unqualified-search-registries") for s in search]
        for s in search:
            if "/" in s or not s:
                raise ConfigError(f"{path}: invalid unqualified-search-registries entry {s!r}")
    mode = doc.get("short-name-mode") or None
    if mode is not None and mode not in SHORT_NAME_MODES:
        raise ConfigError(f"{path}: invalid short-name-mode {mode!r}")
    return _Parsed(registries, search, mode, _parse_aliases(doc.get("aliases", {}), path))


def _v1_to_v2(v1: dict[str, Any], path: Path) -> dict[str, Any]:
    tables: dict[str, dict[str, Any]] = {}

    def names(kind: str) -> list[str]:
        value = (v1.get(kind) or {}).get("registries", [])
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ConfigError(f"{path}: registries.{kind}.registries must be a list of strings")
        return value

    for name in names("block"):
        tables.setdefault(name, {"location": name})["blocked"] = True
    for name in names("insecure"):
        tables.setdefault(name, {"location": name})["insecure"] = True
    return {"registry": list(tables.values()), "unqualified-search-registries": names("search")}


def _location(value: object, path: Path, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {what} must be a string")
    value = value.rstrip("/")
    if value.startswith(("http://", "https://")):
        raise ConfigError(f"{path}: {what} {value!r}: URI schemes are not supported")
    return value


def _flag(table: dict[str, Any], key: str, path: Path) -> bool | None:
    value = table.get(key)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{path}: {key} must be true or false")
    return value


def _parse_registry(table: object, path: Path) -> RegistryEntry:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [[registry]] entries must be tables")
    location = _location(table.get("location", ""), path, "location")
    prefix = _location(table.get("prefix", ""), path, "prefix") or location
    if not prefix:
        raise ConfigError(f"{path}: a [[registry]] sets neither location nor prefix")
    if prefix.startswith("*."):
        if any(c in prefix for c in "/@:"):
            raise ConfigError(f"{path}: wildcard prefix {prefix!r} must look like *.example.com")
    elif not location:
        raise ConfigError(f"{path}: [[registry]] {prefix!r} has no location (only a "
                          "*.example.com prefix may omit it)")
    if table.get("pull-from-mirror"):
        raise ConfigError(f"{path}: pull-from-mirror is only valid in [[registry.mirror]] "
                          f"(registry {prefix!r})")
    by_digest = bool(_flag(table, "mirror-by-digest-only", path))
    mirrors = []
    for mirror in table.get("mirror", []) or []:
        if not isinstance(mirror, dict):
            raise ConfigError(f"{path}: [[registry.mirror]] entries must be tables")
        where = _location(mirror.get("location", ""), path, "mirror location")
        if not where:
            raise ConfigError(f"{path}: a mirror of {prefix!r} has no location")
        usage = mirror.get("pull-from-mirror") or "all"
        if usage not in PULL_FROM_MIRROR:
            raise ConfigError(f"{path}: unsupported pull-from-mirror {usage!r} for mirror "
                              f"{where!r}")
        if by_digest and mirror.get("pull-from-mirror"):
            raise ConfigError(f"{path}: {prefix!r} sets mirror-by-digest-only and its mirror "
                              f"{where!r} sets pull-from-mirror; choose one")
        mirrors.append(Endpoint(where, _flag(mirror, "insecure", path), usage))
    return RegistryEntry(
        prefix=prefix,
        endpoint=Endpoint(location, _flag(table, "insecure", path)),
        blocked=bool(_flag(table, "blocked", path)),
        mirrors=tuple(mirrors),
        mirror_by_digest_only=by_digest,
        origin=str(path),
    )


def _check_conflicts(entries: list[RegistryEntry], path: Path) -> None:
    """One location cannot be both secure and insecure, blocked and not (podman refuses)."""
    seen: dict[str, RegistryEntry] = {}
    for entry in entries:
        key = entry.endpoint.location or entry.prefix
        other = seen.setdefault(key, entry)
        for attr in ("insecure", "blocked"):
            mine = entry.endpoint.insecure if attr == "insecure" else entry.blocked
            theirs = other.endpoint.insecure if attr == "insecure" else other.blocked
            if bool(mine) != bool(theirs):
                raise ConfigError(f"{path}: registry {key!r} is defined several times with "
                                  f"conflicting {attr!r} settings")


def _parse_aliases(table: object, path: Path) -> dict[str, tuple[str | None, str]]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [aliases] must be a table")
    out: dict[str, tuple[str | None, str]] = {}
    for name, value in table.items():
        if not isinstance(value, str):
            raise ConfigError(f"{path}: alias {name!r} must be a string")
        if is_qualified(name) or any(c in name for c in ":@"):
            raise ConfigError(f"{path}: alias name {name!r} must be a short name without "
                              "tag or digest")
        if value and (not is_qualified(value) or "@" in value
                      or ":" in value.rsplit("/", 1)[-1]):
            raise ConfigError(f"{path}: alias {name!r} = {value!r} must be a fully-qualified "
                              "name without tag or digest")
        out[name] = (value or None, str(path))
    return out


__all__ = [
    "Endpoint",
    "PullSource",
    "RegistriesConf",
    "RegistryEntry",
    "conf_files",
    "is_qualified",
    "load_registries_conf",
]
