"""The ``cachefs`` command line: parsing and rendering only, logic lives in the library.

Every failure is a ``CachefsError``; ``CachefsGroup.invoke`` turns it into one line on
stderr and the error's own exit code (the table is in ``cachefs --help``), and prints
the traceback only with ``-v``. Commands that print data accept ``--json`` so scripts
never parse the human tables.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ..cache.location import default_cache_dir
from ..errors import EXIT_CODES, CacheCorrupt, CachefsError, MountError, UsageError
from .render import (
    PullProgress,
    human_bytes,
    render_layers,
    render_status,
    short_digest,
    table,
)

if TYPE_CHECKING:
    from ..cache.store import GlobalCache
    from ..maintenance.remove import RemoveReport
    from ..oci.auth import Credentials
    from ..pipeline.pull import PullResult

INTERNAL_ERROR_EXIT = 70  # EX_SOFTWARE: a bug, not a refusal
INTERRUPTED_EXIT = 130


def _version() -> str:
    from importlib import metadata as importlib_metadata  # ~20 ms: only --version needs it

    try:
        return importlib_metadata.version("cachefs")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _print_version(ctx: click.Context, wanted: bool) -> None:
    """``--version``, looked up only when asked: the package metadata lookup (and importing
    ``importlib.metadata``) cost every command ~25 ms when it ran at import time."""
    if wanted and not ctx.resilient_parsing:
        click.echo(f"cachefs, version {_version()}")
        ctx.exit()


def _exit_code_epilog() -> str:
    """The exit-code table, from ``errors.EXIT_CODES`` (one row per code: the class that
    defines it first, then the subclasses that inherit it)."""
    families: dict[int, list[str]] = {}
    for name, code in EXIT_CODES.items():
        families.setdefault(code, []).append(name)
    lines = ["\b", "Exit codes:", "  0    success"]
    lines += [f"  {code:<4} {', '.join(names)}" for code, names in sorted(families.items())]
    lines += [f"  {INTERNAL_ERROR_EXIT:<4} internal error (a bug: rerun with -v, report it)",
              f"  {INTERRUPTED_EXIT:<4} interrupted"]
    lines += ["", "Cache: --cache, else $CACHEFS_CACHE_DIR, else $MSB_HOME/cache, "
              "else ~/.microsandbox/cache (shared with msb).",
              "", "--cache, -q and -v also work after the command (cachefs pull -q REF); "
              "on `images`, -q means references only (docker's meaning)."]
    return "\n".join(lines)


@dataclass
class Context:
    cache_dir: Path
    quiet: bool
    verbose: int

    def cache(self) -> GlobalCache:
        """The cache for reading: no directories are created, and a missing one is said
        (a mistyped --cache must not look like an empty cache)."""
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise UsageError(f"cache path {self.cache_dir} is not a directory")
        if not self.cache_dir.exists():
            raise UsageError(f"cache directory {self.cache_dir} does not exist",
                             hint="check --cache or $CACHEFS_CACHE_DIR; pull or load "
                                  "creates it")
        from ..cache.store import GlobalCache  # lazily: not for --version

        return GlobalCache(self.cache_dir)

    def writable_cache(self) -> GlobalCache:
        from ..cache.store import GlobalCache

        return GlobalCache.new(self.cache_dir)

    def say(self, text: str) -> None:
        """Informational output (suppressed by ``-q``); data output uses ``click.echo``."""
        if not self.quiet:
            click.echo(text)

    def progress(self, verb: str = "pulling") -> PullProgress:
        return PullProgress(enabled=not self.quiet and sys.stderr.isatty(), verb=verb)


def _set_cache(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        _ctx(ctx).cache_dir = Path(os.path.abspath(value))  # as main() does


def _set_quiet(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        _ctx(ctx).quiet = True


def _set_verbose(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    if value:
        c = _ctx(ctx)
        c.verbose += value
        _log_level(c.verbose)


def _global_params() -> list[click.Option]:
    """``--cache``, ``-q``, ``-v`` as options of every command too (``cachefs pull -q REF``).

    A command's own option of the same name wins: ``images -q`` keeps docker's meaning,
    references only.
    """
    return [
        click.Option(["--cache", "global_cache"], type=click.Path(path_type=Path),
                     expose_value=False, callback=_set_cache,
                     help="The cache directory (as before the command)."),
        click.Option(["-q", "--quiet", "global_quiet"], is_flag=True, expose_value=False,
                     callback=_set_quiet, help="Print only results; no progress."),
        click.Option(["-v", "--verbose", "global_verbose"], count=True, expose_value=False,
                     callback=_set_verbose, help="More logging; tracebacks on errors."),
    ]


def _log_level(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.getLogger().setLevel(level)


class CachefsGroup(click.Group):
    """A group that renders ``CachefsError`` as one line and its exit code, and accepts
    the global options after the command as well as before it."""

    group_class = type  # nested groups (``erofs``) are CachefsGroups too

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None and not getattr(cmd, "_cachefs_globals", False):
            taken = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
            cmd.params.extend(p for p in _global_params() if not taken & set(p.opts))
            cmd._cachefs_globals = True  # type: ignore[attr-defined]
        return cmd

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CachefsError as err:
            self._fail(ctx, f"cachefs: {err.one_line()}", err.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            self._fail(ctx, "cachefs: interrupted", INTERRUPTED_EXIT)
        except BrokenPipeError:
            # `cachefs images | head`: the reader left; not an error worth a message.
            sys.stderr.close()
            ctx.exit(1)
        except OSError as err:
            where = f": {err.filename}" if err.filename else ""
            self._fail(ctx, f"cachefs: {err.strerror or err}{where}", CachefsError.exit_code)
        except Exception as err:
            self._fail(ctx, f"cachefs: internal error: {type(err).__name__}: "
                       f"{' '.join(str(err).split())} (rerun with -v for the traceback)",
                       INTERNAL_ERROR_EXIT)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        """click's own ``main``, except that a usage error is one line like every other
        refusal (click prints usage, a hint and the error on three)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as err:
            where = err.ctx.command_path if err.ctx is not None else "cachefs"
            click.echo(f"cachefs: {err.format_message()} (see: {where} --help)", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            err.show()
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)

    @staticmethod
    def _fail(ctx: click.Context, line: str, code: int) -> NoReturn:
        obj = ctx.find_object(Context)
        if obj is not None and obj.verbose:
            traceback.print_exc()
        click.echo(line, err=True)
        ctx.exit(code)


def _ctx(ctx: click.Context) -> Context:
    return ctx.ensure_object(Context)


def _echo_json(doc: object) -> None:
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False, default=str))


@click.group(cls=CachefsGroup, epilog=_exit_code_epilog(),
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), default=None,
              help="The cache directory (msb's <MSB_HOME>/cache). Env: CACHEFS_CACHE_DIR.")
@click.option("-q", "--quiet", is_flag=True, help="Print only results; no progress.")
@click.option("-v", "--verbose", count=True, help="More logging; tracebacks on errors.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=lambda ctx, _param, value: _print_version(ctx, value),
              help="Show the version and exit.")
@click.pass_context
def main(ctx: click.Context, cache_dir: Path | None, quiet: bool, verbose: int) -> None:
    """cachefs: the microsandbox (msb 0.7.11) image cache, and a FUSE view of it."""
    # Absolute once, here at the edge: every command, the daemon it starts, the paths in
    # status.json and disk files then mean the same whatever the working directory.
    chosen = cache_dir if cache_dir is not None else default_cache_dir()
    ctx.obj = Context(Path(os.path.abspath(chosen)), quiet, verbose)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _log_level(verbose)


# ---------------------------------------------------------------------------------------
# pull / load
# ---------------------------------------------------------------------------------------


_no_msb_db_option = click.option(
    "--no-msb-db", is_flag=True,
    help="Do not record (rm: remove) the image in msb's database <cache>/../db/msb.db. "
         "By default a database of msb 0.7.11's schema gets the rows msb itself writes, "
         "so `msb image ls` lists the image.")


_json_result_option = click.option(
    "--json", "as_json", is_flag=True,
    help="Print the result as JSON on stdout (pull: one object, load: a list; shapes in "
         "README.md, JSON output). Progress still goes to a terminal's stderr.")


def _describe_result(result: PullResult) -> str:
    cached = " (already cached)" if result.cached else ""
    return f"{result.reference} {result.manifest_digest}{cached}"


def _result_doc(result: PullResult) -> dict[str, object]:
    return {
        "reference": str(result.reference),
        "manifest_digest": str(result.manifest_digest),
        "config_digest": result.metadata.config_digest,
        "cached": result.cached,
        "layers": len(result.metadata.layers),
        "fsmeta": str(result.fsmeta),
        "vmdk": str(result.vmdk),
    }


def _password(username: str | None, password_stdin: bool) -> Credentials | None:
    """--username's password: stdin, $CACHEFS_REGISTRY_PASSWORD, or asked on a terminal."""
    from ..oci.auth import Credentials

    if username is None:
        if password_stdin:
            raise UsageError("--password-stdin needs --username")
        return None
    if password_stdin:
        password: str | None = sys.stdin.readline().rstrip("\n")
    else:
        password = os.environ.get("CACHEFS_REGISTRY_PASSWORD")
    if password is None and sys.stdin.isatty():
        password = click.prompt(f"Password for {username}", hide_input=True, err=True)
    if password is None:
        raise UsageError("--username needs a password: --password-stdin, "
                         "$CACHEFS_REGISTRY_PASSWORD, or run on a terminal to be asked")
    return Credentials(username, password)


@main.command()
@click.argument("reference")
@click.option("--policy", type=click.Choice(["if-missing", "always", "never"]),
              default="if-missing", show_default=True,
              help="if-missing: use the cache when complete; always: re-resolve the "
                   "reference at the registry; never: cache only.")
@click.option("--force", is_flag=True, help="Rebuild artifacts even when cached.")
@click.option("--insecure", is_flag=True,
              help="Plain HTTP only. Not needed for localhost, 127.0.0.0/8 and ::1 (HTTPS is "
                   "tried, then plain HTTP) nor for insecure = true in registries.conf.")
@click.option("--ca-certs", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Extra CA certificates (PEM) to trust for the registry.")
@click.option("--username", default=None,
              help="Registry user; the password is read from stdin (--password-stdin), "
                   "$CACHEFS_REGISTRY_PASSWORD, or asked on a terminal. Default: the logins "
                   "of cachefs/podman/docker login ($REGISTRY_AUTH_FILE, containers "
                   "auth.json, ~/.docker/config.json, helpers).")
@click.option("--password-stdin", is_flag=True, help="Read the registry password from stdin.")
@click.option("--platform", default=None,
              help="os/arch[/variant]; default: linux/<host arch>. A cached image of another "
                   "platform is used with a warning (--policy always fetches this one).")
@click.option("--erofs-artifacts", type=click.Choice(["auto", "never", "only"]), default=None,
              help="Use converted EROFS the registry holds for the image (see push-erofs): "
                   "auto (default) when present and sound, never, or only (fail otherwise). "
                   "Env: CACHEFS_EROFS_ARTIFACTS; config: [pull] erofs-artifacts.")
@_no_msb_db_option
@_json_result_option
@click.pass_context
def pull(ctx: click.Context, reference: str, policy: str, force: bool, insecure: bool,
         ca_certs: Path | None, username: str | None, password_stdin: bool,
         platform: str | None, erofs_artifacts: str | None, no_msb_db: bool,
         as_json: bool) -> None:
    """Pull REFERENCE from its registry into the cache.

    Layers download in parallel, resume after an interruption, and are verified against
    their digests before anything is published; a second pull of a complete image needs
    no network. Mirrors, blocked registries and short-name aliases come from
    registries.conf (see README, Configuration); the image keeps the name you asked for.
    """
    from ..heap import imports_uncollected
    from ..pipeline.worker_spawn import discard_prestarted, prestart

    prestart()  # layer workers start while trio and httpx import (issue 15)
    ctx.call_on_close(discard_prestarted)

    with imports_uncollected():
        import trio

        from ..oci.platform import format_platform, other_platform, parse_platform
        from ..oci.registries_conf import load_registries_conf
        from ..pipeline.pull import PullPolicy
        from ..reference import Reference
        from ..short_names import pull_short_name

    c = _ctx(ctx)
    wanted = parse_platform(platform) if platform is not None else None  # before anything
    Reference.parse(reference)  # a bad name never reaches the network or the cache
    credentials = _password(username, password_stdin)
    with c.progress() as progress:
        result = trio.run(functools.partial(
            pull_short_name, c.writable_cache(), reference, policy=PullPolicy(policy),
            force=force, insecure=insecure, ca_certs=ca_certs, credentials=credentials,
            platform=platform, progress=progress, registries=load_registries_conf(),
            msb_db=not no_msb_db, erofs_artifacts=erofs_artifacts))
    have = (other_platform(result.metadata.raw_config_json, wanted)
            if wanted is not None and result.cached else None)
    if have is not None:
        click.echo(f"cachefs: warning: {result.reference} is cached for "
                   f"{format_platform(have)}, not {platform}; `--policy always` pulls "
                   f"{platform}", err=True)
    if as_json:
        _echo_json(_result_doc(result))
    else:
        click.echo(_describe_result(result))


@main.command()
@click.argument("source", type=click.Path(exists=True, allow_dash=True, path_type=Path))
@click.option("-t", "--tag", default=None,
              help="One more reference for the (first) image; needed when it has no tag.")
@click.option("--platform", default=None, help="os/arch[/variant] to pick from a multi-"
              "platform OCI layout; default: linux/<host arch>.")
@click.option("--force", is_flag=True, help="Rebuild artifacts even when cached.")
@_no_msb_db_option
@_json_result_option
@click.pass_context
def load(ctx: click.Context, source: Path, tag: str | None, platform: str | None,
         force: bool, no_msb_db: bool, as_json: bool) -> None:
    """Load a docker-archive tar or an OCI layout (directory or tar) into the cache.

    Every tag in the archive becomes a reference; layers stream straight from the archive.
    SOURCE `-` (or a pipe such as /dev/stdin) reads the archive from standard input:
    `docker save IMAGE | cachefs load -`.
    """
    import trio

    from ..oci.archive import spooled_archive
    from ..oci.platform import parse_platform
    from ..pipeline.pull import load as do_load

    c = _ctx(ctx)
    if str(source) == "-" and sys.stdin.isatty():
        raise UsageError("load -: standard input is a terminal, not an archive",
                         hint="pipe one in: docker save IMAGE | cachefs load -")
    if platform is not None:
        parse_platform(platform)  # before reading anything
    if tag is not None:
        from ..reference import Reference

        Reference.parse(tag)
    cache = c.writable_cache()
    with spooled_archive(source, cache.tmp_dir()) as archive, c.progress("loading") as progress:
        results = trio.run(functools.partial(
            do_load, cache, archive, tag=tag, platform=platform, force=force,
            progress=progress, msb_db=not no_msb_db))
    if as_json:
        _echo_json([_result_doc(r) for r in results])
        return
    for r in results:
        click.echo(_describe_result(r))


# ---------------------------------------------------------------------------------------
# images / inspect
# ---------------------------------------------------------------------------------------

_msb_db_option = click.option(
    "--msb-db", type=click.Path(path_type=Path), default=None,
    help="msb's database (default: <cache>/../db/msb.db).")


@main.command()
@click.option("--json", "as_json", is_flag=True,
              help="A JSON list, one object per image (README.md, JSON output).")
@click.option("-q", "--quiet", "only_refs", is_flag=True,
              help="Only references, one a line (docker's images -q).")
@_msb_db_option
@click.pass_context
def images(ctx: click.Context, as_json: bool, only_refs: bool, msb_db: Path | None) -> None:
    """List cached images (cachefs's records, msb's database, and loose metadata).

    STATE is `ready` when every artifact a VM needs is there and sound, else
    `incomplete`, with what is missing or broken (`cachefs verify` says more,
    `verify --repair` rebuilds fsmeta and VMDK). SOURCES says who names the image:
    cachefs, msb's database, or only its json.
    """
    from ..maintenance import image_summary, list_images

    cache = _ctx(ctx).cache()
    rows = [image_summary(cache, info) for info in list_images(cache, msb_db)]
    if as_json:
        _echo_json(rows)
        return
    if only_refs:
        for row in rows:
            click.echo(row["reference"] or row["key"])
        return
    click.echo(table(
        ["REFERENCE", "DIGEST", "LAYERS", "SIZE", "STATE", "SOURCES"],
        [[r["reference"] or f"<unnamed {str(r['key'])[:12]}>", short_digest(r["manifest_digest"]),
          r["layers"], human_bytes(r["size_bytes"]), r["state"], ",".join(r["sources"])]
         for r in rows],
        right=(2, 3),
    ))


@main.command(name="inspect")
@click.argument("reference")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: the `images --json` fields plus config, platform, "
                   "layers and artifact paths.")
@_msb_db_option
@click.pass_context
def inspect_cmd(ctx: click.Context, reference: str, as_json: bool, msb_db: Path | None) -> None:
    """Show one image: digests, config, layers and the paths of its artifacts."""
    from ..maintenance import find_image, inspect_image, list_images

    cache = _ctx(ctx).cache()
    doc = inspect_image(cache, find_image(list_images(cache, msb_db), reference))
    if as_json:
        _echo_json(doc)
        return
    for key in ("reference", "typed", "manifest_digest", "config_digest", "architecture",
                "os", "variant", "created", "state", "metadata_path"):
        click.echo(f"{key + ':':17} {'-' if doc.get(key) is None else doc.get(key)}")
    click.echo(f"{'sources:':17} {', '.join(doc['sources'])}")
    if doc.get("missing"):
        click.echo(f"{'missing:':17} {', '.join(doc['missing'])}")
    for name in ("fsmeta", "vmdk"):
        if name in doc:
            click.echo(f"{name + ':':17} {doc[name]['path']}")
    click.echo("layers (bottom first):")
    click.echo(render_layers(doc["layer_details"]))
    config = {k: v for k, v in (doc.get("config") or {}).items()
              if v not in (None, [], {})}
    if config:
        click.echo("config:")
        for key, value in config.items():
            click.echo(f"  {key}: {json.dumps(value, ensure_ascii=False)}")


# ---------------------------------------------------------------------------------------
# rm / gc / df / verify
# ---------------------------------------------------------------------------------------


def _print_removals(c: Context, report: RemoveReport, verb: str) -> None:
    for r in report.removed:
        c.say(f"{verb} {r.kind:8} {human_bytes(r.size):>10}  {r.path}")
    for s in report.skipped:
        c.say(f"skipped {s.path}: {s.reason}")


@main.command()
@click.argument("references", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True,
              help="Ignore unknown references; and where cachefs does not write msb's "
                   "database (--no-msb-db, another msb version) remove images it lists, "
                   "leaving their rows. Never overrides leases, running pulls or sandboxes.")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True,
              help="A JSON report: references removed, files with kind and size, skips.")
@_msb_db_option
@_no_msb_db_option
@click.pass_context
def rm(ctx: click.Context, references: tuple[str, ...], force: bool, dry_run: bool,
       as_json: bool, msb_db: Path | None, no_msb_db: bool) -> None:
    """Remove images, and the layers no other image uses.

    In msb 0.7.11's database the images' rows go too, as `msb image rm` removes them.
    An image being read (a VM through the view: a lease), pulled or published is refused
    with exit 11 naming who holds it; one a sandbox uses, with exit 24.
    """
    from ..maintenance.remove import remove_images

    c = _ctx(ctx)
    report = remove_images(c.cache(), list(references), force=force, msb_db=msb_db,
                           dry_run=dry_run, write_msb_db=not no_msb_db)
    if as_json:
        _echo_json(report.to_json())
        return
    _print_removals(c, report, "would remove" if dry_run else "removed")
    for name in report.images:
        click.echo(f"{'would remove' if dry_run else 'removed'} {name}")
    c.say(f"{'would reclaim' if dry_run else 'reclaimed'} {human_bytes(report.bytes_reclaimed)}")


@main.command()
@click.option("--dry-run", is_flag=True, help="Show what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True,
              help="A JSON report: files removed with kind and size, and what was skipped.")
@_msb_db_option
@click.pass_context
def gc(ctx: click.Context, dry_run: bool, as_json: bool, msb_db: Path | None) -> None:
    """Remove layers, fsmeta and VMDKs no image uses, and abandoned temporary files.

    Anything a lease, a running pull or a download holds is skipped, never waited for.
    A dry run takes no locks and needs only read access to the cache. If what is in use
    cannot be read (manifests/, a metadata file, msb's database), gc deletes nothing.
    """
    from ..maintenance.remove import collect_garbage

    c = _ctx(ctx)
    report = collect_garbage(c.cache(), dry_run=dry_run, msb_db=msb_db)
    if as_json:
        _echo_json(report.to_json())
        return
    _print_removals(c, report, "would remove" if dry_run else "removed")
    verb = "would reclaim" if dry_run else "reclaimed"
    click.echo(f"{verb} {report.bytes_reclaimed} bytes "
               f"({human_bytes(report.bytes_reclaimed)}) in {len(report.removed)} files")


@main.command()
@click.option("--json", "as_json", is_flag=True,
              help="Bytes and files by kind, and per-image usage, as one JSON object.")
@_msb_db_option
@click.pass_context
def df(ctx: click.Context, as_json: bool, msb_db: Path | None) -> None:
    """Bytes used by kind (layers, fsmeta, vmdk, manifests, tmp) and per image."""
    from ..maintenance.usage import KINDS, disk_usage

    usage = disk_usage(_ctx(ctx).cache(), msb_db)
    if as_json:
        _echo_json(usage.to_json())
        return
    click.echo(table(
        ["KIND", "FILES", "BYTES", "SIZE"],
        [*([k, usage.files_by_kind[k], usage.by_kind[k], human_bytes(usage.by_kind[k])]
           for k in KINDS),
         ["total", sum(usage.files_by_kind.values()), usage.total, human_bytes(usage.total)]],
        right=(1, 2, 3),
    ))
    if usage.images:
        click.echo()
        click.echo(table(
            ["IMAGE", "LAYERS", "UNIQUE", "SHARED"],
            [[i.name, i.layers, human_bytes(i.unique_bytes), human_bytes(i.shared_bytes)]
             for i in usage.images],
            right=(1, 2, 3),
        ))


@main.command()
@click.argument("reference", required=False)
@click.option("--repair", is_flag=True, help="Rebuild fsmeta and VMDK from the layers.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: ok, and each image's problems (with --deep: each "
                   "layer's and the fsmeta's comparison).")
@_msb_db_option
@click.option("--deep", is_flag=True,
              help="Re-convert REFERENCE's layers from their original blobs (downloaded "
                   "when not cached) and prove its EROFS and fsmeta byte-identical.")
@click.option("--insecure", is_flag=True, help="With --deep: plain HTTP to the registry.")
@click.pass_context
def verify(ctx: click.Context, reference: str | None, repair: bool, as_json: bool,
           msb_db: Path | None, deep: bool, insecure: bool) -> None:
    """Check every artifact of one image (or all) without a kernel; exit 10 on problems."""
    from ..maintenance.verify import ImageCheck
    from ..maintenance.verify import verify as run_verify

    c = _ctx(ctx)
    if deep:
        _verify_deep(c, reference, as_json=as_json, insecure=insecure)
        return

    def show(check: ImageCheck) -> None:
        if as_json:
            return
        state = "ok" if check.ok else "PROBLEMS"
        click.echo(f"{check.name}: {state}{' (repaired)' if check.repaired else ''}")
        for p in check.problems:
            fix = "repairable: cachefs verify --repair" if p.repairable else "pull/load again"
            click.echo(f"  {p.artifact}: {p.message} [{fix}]")

    cache = c.cache()  # a cache that does not exist has nothing to verify or repair
    if repair:
        cache = c.writable_cache()
    report = run_verify(cache, reference, repair=repair, msb_db=msb_db, on_image=show)
    if as_json:
        _echo_json(report.to_json())
    elif not report.images:
        c.say(f"no images in {cache.root}")
    if not report.ok:
        bad = sum(1 for i in report.images if not i.ok)
        raise CacheCorrupt(f"{bad} of {len(report.images)} image(s) have problems",
                           hint=None if repair else "try `cachefs verify --repair`")


# ---------------------------------------------------------------------------------------
# mount / umount / status
# ---------------------------------------------------------------------------------------


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--allow-other", is_flag=True, help="Let other users (and QEMU as another "
              "user) see the mount; needs user_allow_other in /etc/fuse.conf for non-root.")
@_msb_db_option
@click.option("--foreground", is_flag=True,
              help="Serve in this process until SIGTERM/SIGINT (what systemd runs).")
@click.option("--notify", is_flag=True,
              help="Tell systemd READY=1 once the mount is live and STOPPING=1 on shutdown "
                   "($NOTIFY_SOCKET).")
@click.option("--symlinks", is_flag=True,
              help="Serve fsmeta.erofs and layers/* as symlinks into the cache: faster warm "
                   "reads for a VMM running as the cache's owner, but no leases protect "
                   "their readers and other users cannot follow them.")
@click.option("--create", is_flag=True,
              help="Create the cache directory if it does not exist (else: refuse, so a "
                   "mistyped --cache is not served as an empty cache).")
@click.pass_context
def mount(ctx: click.Context, mountpoint: Path, allow_other: bool, msb_db: Path | None,
          foreground: bool, notify: bool, symlinks: bool, create: bool) -> None:
    """Mount the view of the cache at MOUNTPOINT.

    Without --foreground a daemon is started and this returns once the mount is live; if
    it cannot start, its reason (e.g. fusermount3's) is printed. It then logs to
    ~/.local/state/cachefs/view-*.log ($XDG_STATE_HOME; the journal under systemd), which
    `cachefs status --mountpoint MOUNTPOINT` names. Every disk file (disk.vmdk and its
    extents, rootfs.img) is served with the daemon's rights and holds msb leases while
    open, so `cachefs rm`/`gc` and `msb image rm` leave a running VM's image alone.
    """
    from .. import sdnotify
    from ..view.daemon import mount as view_mount

    if notify and not foreground:
        raise UsageError("--notify needs --foreground: systemd must supervise the process "
                         "that serves the mount")
    c = _ctx(ctx)
    if not create and not c.cache_dir.is_dir():
        raise UsageError(f"cache directory {c.cache_dir} does not exist",
                         hint="pass --create to create it, or check --cache / "
                              "$CACHEFS_CACHE_DIR")
    cache = c.writable_cache()

    def ready() -> None:
        if notify:
            sdnotify.ready(f"serving {cache.root} at {mountpoint}")
        if not foreground:
            c.say(f"mounted {cache.root} at {mountpoint}")
        logging.getLogger("cachefs").info("view of %s live at %s", cache.root, mountpoint)

    def stopping() -> None:
        if notify:
            sdnotify.stopping()

    view_mount(cache, mountpoint, allow_other=allow_other, msb_db=msb_db,
               foreground=foreground, ready=ready, stopping=stopping, links=symlinks)


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("-z", "--lazy", is_flag=True, help="Detach now, clean up when no longer busy.")
@click.pass_context
def umount(ctx: click.Context, mountpoint: Path, lazy: bool) -> None:
    """Unmount the view at MOUNTPOINT (the daemon then exits)."""
    from ..view.daemon import umount as view_umount

    view_umount(mountpoint, lazy=lazy)
    _ctx(ctx).say(f"unmounted {mountpoint}")


@main.command()
@click.option("--mountpoint", type=click.Path(path_type=Path), envvar="CACHEFS_MOUNTPOINT",
              default=None, help="Read the live view's status.json here. "
                                 "Env: CACHEFS_MOUNTPOINT.")
@click.option("--json", "as_json", is_flag=True,
              help="The view's status.json document.")
@_msb_db_option
@click.pass_context
def status(ctx: click.Context, mountpoint: Path | None, as_json: bool,
           msb_db: Path | None) -> None:
    """What the view sees: its status.json when mounted, otherwise computed now.

    With --mountpoint (the service's health check) nothing mounted there is a failure,
    not a silent fallback to computing the status from the cache.
    """
    doc: Mapping[str, Any]  # a mounted view's status.json, or status_document's
    source = "computed"
    if mountpoint is not None:
        from ..view.health import require_live_view

        require_live_view(mountpoint)
    if mountpoint is not None and (mountpoint / "status.json").is_file():
        try:
            doc = json.loads((mountpoint / "status.json").read_bytes())
            source = f"view at {mountpoint}"
        except (OSError, ValueError) as err:
            raise MountError(f"cannot read {mountpoint}/status.json: {err}") from None
    else:
        from ..view.model import scan_cache
        from ..view.status import status_document

        doc = status_document(scan_cache(_ctx(ctx).cache(), msb_db))
    if as_json:
        _echo_json(doc)
        return
    click.echo(render_status(doc, source))
    if doc.get("log"):
        click.echo(f"view log: {doc['log']}")
    if doc.get("leases", "ok") != "ok":
        click.echo(f"warning: {doc['leases']}")


# ---------------------------------------------------------------------------------------
# low-level: erofs / vmdk
# ---------------------------------------------------------------------------------------


@main.group()
def erofs() -> None:
    """Low-level EROFS tools working on loose files (no cache involved)."""


@erofs.command(name="from-tar")
@click.argument("blob", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def erofs_from_tar(blob: Path, out: Path) -> None:
    """Convert a layer blob (gzip/zstd/plain tar) to a layer EROFS; print its diff_id."""
    from ..maintenance.lowlevel import erofs_from_tar as convert

    click.echo(str(convert(blob, out)))


_device_option = click.option(
    "--device", "devices", multiple=True, type=click.Path(exists=True, path_type=Path),
    help="A layer EROFS for an fsmeta's device table, in order (repeat).")


@erofs.command(name="ls")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_device_option
@click.option("--json", "as_json", is_flag=True, help="A JSON list, one object per entry.")
def erofs_ls(image: Path, devices: tuple[Path, ...], as_json: bool) -> None:
    """List every entry of an EROFS image (type, mode, owner, size, mtime, links, xattrs)."""
    from ..erofs.listing import format_ls_line, list_entries
    from ..erofs.reader import ErofsImage

    with ErofsImage.open(image, devices=list(devices) or None) as img:
        entries = list_entries(img)
    if as_json:
        _echo_json(entries)
        return
    for entry in entries:
        click.echo(format_ls_line(entry))


@erofs.command(name="cat")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("path")
@_device_option
def erofs_cat(image: Path, path: str, devices: tuple[Path, ...]) -> None:
    """Write the contents of regular file PATH inside IMAGE to stdout."""
    from ..erofs.listing import cat_file
    from ..erofs.reader import ErofsImage

    out = sys.stdout.buffer  # click 8.5 deprecates get_binary_stream, which returned this
    with ErofsImage.open(image, devices=list(devices) or None) as img:
        for chunk in cat_file(img, os.fsencode(path)):
            out.write(chunk)
    out.flush()


@erofs.command(name="fsmeta")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("layers", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--msb-quirks", is_flag=True,
              help="Merge exactly as msb (nested whiteouts leak as 0:0 devices).")
@click.pass_context
def erofs_fsmeta(ctx: click.Context, out: Path, layers: tuple[Path, ...],
                 msb_quirks: bool) -> None:
    """Build the merged fsmeta OUT from layer EROFS images, bottom layer first."""
    from ..maintenance.lowlevel import fsmeta_from_layers

    blocks = fsmeta_from_layers(out, list(layers), msb_quirks=msb_quirks)
    _ctx(ctx).say(f"{out}: {blocks} blocks, {len(layers)} layers")


@main.command(name="vmdk")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("extents", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--relative-to", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write extent paths relative to DIR (where the VMDK will be read from).")
@click.pass_context
def vmdk_cmd(ctx: click.Context, out: Path, extents: tuple[Path, ...],
             relative_to: Path | None) -> None:
    """Write a flat VMDK descriptor OUT over EXTENT files (fsmeta first, then layers)."""
    from ..maintenance.lowlevel import vmdk_for_extents

    vmdk_for_extents(out, list(extents), relative_to=relative_to)
    _ctx(ctx).say(f"{out}: {len(extents)} extents")


# ---------------------------------------------------------------------------------------
# login / logout
# ---------------------------------------------------------------------------------------

_authfile_option = click.option(
    "--authfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="The auth file to edit. Default: $REGISTRY_AUTH_FILE, else "
         "$XDG_RUNTIME_DIR/containers/auth.json (where podman login writes).")


@main.command()
@click.argument("registry")
@click.option("-u", "--username", default=None, help="Registry user (prompted on a terminal).")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from stdin (it is never taken as an argument).")
@click.option("--insecure", is_flag=True, help="Plain HTTP to the registry.")
@click.option("--ca-certs", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Extra CA certificates (PEM) to trust for the registry.")
@_authfile_option
@click.pass_context
def login(ctx: click.Context, registry: str, username: str | None, password_stdin: bool,
          insecure: bool, ca_certs: Path | None, authfile: Path | None) -> None:
    """Check a username and password at REGISTRY (host[:port]) and remember them.

    They are written where podman login writes them, so podman, skopeo, buildah and
    cachefs share the login; a password the registry refuses is not stored.
    """
    import trio

    from ..oci.auth import Credentials
    from ..oci.login import login as do_login

    tty = sys.stdin.isatty()
    if username is None:
        if not tty:
            raise UsageError("login needs --username when stdin is not a terminal")
        username = click.prompt("Username", err=True)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif tty:
        password = click.prompt("Password", hide_input=True, err=True)
    else:
        raise UsageError("login reads the password from a terminal or --password-stdin")
    if not username or not password:
        raise UsageError("login needs a non-empty username and password")
    path = trio.run(functools.partial(do_login, registry, Credentials(username, password),
                                      insecure=insecure, ca_certs=ca_certs, authfile=authfile))
    _ctx(ctx).say(f"Login Succeeded! ({path})")


@main.command()
@click.argument("registry", required=False)
@click.option("-a", "--all", "everything", is_flag=True, help="Forget every registry's login.")
@_authfile_option
@click.pass_context
def logout(ctx: click.Context, registry: str | None, everything: bool,
           authfile: Path | None) -> None:
    """Forget the login for REGISTRY in the file cachefs/podman login writes."""
    from ..oci.login import logout as do_logout

    if (registry is None) == (not everything):
        raise UsageError("logout needs a REGISTRY or --all (not both)")
    path = do_logout(None if everything else registry, authfile=authfile)
    _ctx(ctx).say(f"Removed login credentials for {registry or 'all registries'} ({path})")


# ---------------------------------------------------------------------------------------
# push-erofs / verify --deep (EROFS artifacts in the registry)
# ---------------------------------------------------------------------------------------


def _artifact_client(insecure: bool, ca_certs: Path | None, username: str | None,
                     password_stdin: bool) -> Any:
    from ..oci.auth import Credentials
    from ..oci.registry import RegistryClient

    credentials = None
    if username is not None:
        password = (sys.stdin.readline().rstrip("\n") if password_stdin
                    else os.environ.get("CACHEFS_REGISTRY_PASSWORD"))
        if password is None:
            raise UsageError("--username needs a password: --password-stdin or "
                             "$CACHEFS_REGISTRY_PASSWORD")
        credentials = Credentials(username, password)
    elif password_stdin:
        raise UsageError("--password-stdin needs --username")
    from ..oci.registries_conf import load_registries_conf

    return RegistryClient(insecure=insecure, ca_certs=ca_certs, credentials=credentials,
                          registries=load_registries_conf())


@main.command(name="push-erofs")
@click.argument("reference")
@click.option("--insecure", is_flag=True, help="Plain HTTP to the registry (local registries).")
@click.option("--ca-certs", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Extra CA certificates (PEM) to trust for the registry.")
@click.option("--username", default=None,
              help="Registry user with push access; password from --password-stdin or "
                   "$CACHEFS_REGISTRY_PASSWORD. Default: the logins of cachefs/podman/docker "
                   "login, as for pull.")
@click.option("--password-stdin", is_flag=True, help="Read the registry password from stdin.")
@click.option("--chunk-size", type=click.IntRange(min=1 << 20), default=None,
              help="Upload blobs larger than this in PATCH chunks of this size (bytes; "
                   "default 64 MiB); smaller ones go in one PUT.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: the artifact, how its referrer was recorded, and the "
                   "blobs skipped, mounted and uploaded (README.md, JSON output).")
@click.pass_context
def push_erofs_cmd(ctx: click.Context, reference: str, insecure: bool, ca_certs: Path | None,
                   username: str | None, password_stdin: bool, chunk_size: int | None,
                   as_json: bool) -> None:
    """Push REFERENCE's converted EROFS (layers + fsmeta) to its repository.

    The image must be in the cache and its manifest in the registry. The EROFS travel
    zstd-compressed as one OCI 1.1 artifact whose subject is the image's platform
    manifest, found by `cachefs pull` through the referrers API or the referrers tag
    schema (`sha256-<hex>`, for registries without the API). Pushing again changes
    nothing. Whoever can push here decides what hosts pulling with artifacts get: see
    `cachefs verify --deep`.
    """
    import trio

    from ..share.push import push_erofs

    c = _ctx(ctx)

    async def run() -> Any:
        async with _artifact_client(insecure, ca_certs, username, password_stdin) as client:
            return await push_erofs(c.cache(), reference, client, chunk_size=chunk_size,
                                    say=lambda text: None if as_json else c.say(text))

    report = trio.run(run)
    if as_json:
        _echo_json(report.to_json())
    elif report.unchanged:
        click.echo(f"{report.reference}: artifact {report.artifact} already in the registry "
                   f"({report.mechanism}); nothing pushed")
    else:
        s = report.stats
        click.echo(f"{report.reference}: pushed artifact {report.artifact} ({report.mechanism}; "
                   f"{len(s.uploaded)} uploaded, {len(s.mounted)} mounted, {len(s.skipped)} "
                   "already there)")


def _verify_deep(c: Context, reference: str | None, *, as_json: bool, insecure: bool) -> None:
    import trio

    from ..share.reconvert import verify_deep

    if reference is None:
        raise UsageError("--deep needs a REFERENCE")

    async def run() -> Any:
        async with _artifact_client(insecure, None, None, False) as client:
            return await verify_deep(c.cache(), reference, client)

    report = trio.run(run)
    if as_json:
        _echo_json(report.to_json())
    else:
        for p in report.layers:
            state = "identical" if p.identical else "DIFFERENT"
            click.echo(f"layer {p.diff_id} ({p.origin}): {state}")
        click.echo(f"fsmeta: {'identical' if report.fsmeta_identical else 'DIFFERENT'}")
    if not report.ok:
        raise CacheCorrupt(f"{report.reference}: cached EROFS differ from a conversion of the "
                           "image's layer blobs",
                           hint=f"cachefs pull --force --erofs-artifacts never {reference}")


if __name__ == "__main__":  # pragma: no cover
    main()
