"""``twistd gitstratum-standalone``: options and the service tree of the embedded default."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import stat
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

from gitstratum.cache.disk import DiskPackCache
from gitstratum.core.limits import Limits
from gitstratum.frontend.admission import AdmissionPolicy, RateLimit
from gitstratum.frontend.auth import bootstrap_admin
from gitstratum.frontend.http_guard import HTTPLimits
from gitstratum.frontend.metrics import Metrics
from gitstratum.frontend.service import build_frontend
from gitstratum.frontend.ssh import host_key_fingerprints, load_or_create_host_keys
from gitstratum.frontend.threads import thread_runner
from gitstratum.standalone.workers import WorkerSupervisor, bind_tcp, parse_worker_fds
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
from gitstratum.storage.lmdb_objects import LMDBObjectStore

__all__ = ["Options", "makeService", "StandaloneService", "make_private", "worker_argv"]

_LIMIT_OPTIONS = [
    ("max-pack-bytes", "max_pack_bytes", int, "Largest push body (commands plus pack) accepted."),
    ("max-object-bytes", "max_object_bytes", int, "Largest inflated object accepted in a push."),
    (
        "max-inflated-bytes",
        "max_inflated_bytes",
        int,
        "Largest total inflated size of one pushed pack.",
    ),
    ("max-delta-depth", "max_delta_depth", int, "Longest delta chain a push may create."),
    ("max-pack-objects", "max_pack_objects", int, "Most objects in one pushed pack."),
    ("max-request-bytes", "max_request_bytes", int, "Largest upload-pack request body (inflated)."),
    ("max-empty-packets", "max_empty_packets", int, "Consecutive empty pkt-lines before refusing."),
    ("max-push-commands", "max_push_commands", int, "Most ref updates in one push."),
    ("max-ref-bytes", "max_ref_bytes", int, "Longest ref name a push may create."),
    ("max-haves", "max_haves", int, "Most 'have' lines in one negotiation request."),
    ("max-wants", "max_wants", int, "Most 'want' lines in one request."),
    ("idle-timeout", "idle_timeout", float, "Seconds before an idle HTTP connection is dropped."),
]

# Stream limits and push policy; what the server creates is its user's alone.
_LIMIT_OPTIONS += [
    (
        "stream-idle-timeout",
        "stream_idle_timeout",
        float,
        "Seconds an SSH or git:// session may send and receive nothing (mid-request or"
        " mid-pack) before it gets an error and is closed; 0 turns the limit off.",
    ),
]
#: on/off limits: (flag, Limits attribute, help)
_LIMIT_FLAGS = [
    (
        "allow-delete-current",
        "allow_delete_current",
        "Let a push delete the branch HEAD points to (refused by default, as git does).",
    ),
]
#: what the server creates is its user's alone, whatever umask it was started with
PRIVATE_UMASK = 0o077


def make_private(path: str) -> int:
    """Take group and other permissions off *path* and everything under it; return how many
    paths changed.  Symbolic links are left alone (and not followed), and so is anything
    another user owns (it is not the server's to change)."""
    changed = 0
    me = os.geteuid()

    def tighten(p: str) -> None:
        nonlocal changed
        try:
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and st.st_uid == me and st.st_mode & 0o077:
                os.chmod(p, stat.S_IMODE(st.st_mode) & 0o700)
                changed += 1
        except FileNotFoundError:
            pass  # removed meanwhile (a pack-cache entry replaced by a running worker)

    if not os.path.lexists(path):
        return 0
    tighten(path)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            tighten(os.path.join(root, name))
    return changed


def _secure_data_dir(options: Any, data_dir: str, log: Logger) -> None:
    """Before anything is created: umask 077, and any looser existing path made private.

    A worker only sets the umask (it has it from the supervisor anyway): the supervisor
    walked the directory before starting it, and other workers are writing there.
    """
    os.umask(PRIVATE_UMASK)
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    if options["worker-fds"]:
        return
    dirs = {"--data-dir": data_dir}
    cache_dir = options["pack-cache-dir"]
    if cache_dir and os.path.isdir(cache_dir):
        dirs["--pack-cache-dir"] = os.path.abspath(cache_dir)
    for option, path in dirs.items():
        if os.stat(path).st_mode & stat.S_ISVTX:
            # A shared directory such as /tmp: only the entries we create are ours (umask 077).
            log.warn(
                "Not changing the permissions of shared {option} {dir}", option=option, dir=path
            )
            continue
        changed = make_private(path)
        if changed:
            log.warn(
                "Made {count} paths under {path} private (0700/0600)", count=changed, path=path
            )


def worker_argv(options: Options, data_dir: str) -> list[str]:
    """The options a worker process is started with: the supervisor's own, but for
    ``--workers``/``--worker-fds``, with an absolute data directory; flags only when set."""
    flags = {name for name, _, _ in _LIMIT_FLAGS}
    argv = []
    for name, value in sorted(options.items()):
        if name in ("workers", "worker-fds") or value is None:
            continue
        if name in flags:
            argv += [f"--{name}"] if value else []
            continue
        if name == "data-dir":
            value = data_dir
        argv.append(f"--{name}={value}")
    return argv


# What an HTTP client may send before its request is routed (HTTPLimits).
_HTTP_LIMIT_OPTIONS = [
    ("http-max-uri-bytes", "max_uri_bytes", int, "Longest HTTP request URI (longer: 414)."),
    (
        "http-max-header-bytes",
        "max_header_bytes",
        int,
        "Most bytes of HTTP request headers (more: 431).",
    ),
    ("http-max-headers", "max_headers", int, "Most HTTP request header fields (more: 431)."),
    (
        "http-header-timeout",
        "header_timeout",
        float,
        "Seconds an HTTP client may take to send a request's headers (slower: 408, closed).",
    ),
    ("api-max-body-bytes", "api_max_body_bytes", int, "Largest admin API request body (413)."),
    ("api-max-json-depth", "api_max_json_depth", int, "Deepest admin API JSON nesting (400)."),
]


def _http_limits(options: usage.Options) -> HTTPLimits:
    """The HTTPLimits the options give; UsageError for a limit of zero or less."""
    for name, _, _, _ in _HTTP_LIMIT_OPTIONS:
        if options[name] <= 0:
            raise usage.UsageError(f"--{name} must be positive")
    return HTTPLimits(**{attr: options[name] for name, attr, _, _ in _HTTP_LIMIT_OPTIONS})


class Options(usage.Options):
    optParameters: list[list[Any]] = [
        ["data-dir", "d", "gitstratum-data", "Directory for the stores, spool and admin token."],
        ["http", None, "tcp:8080", "Smart-HTTP endpoint (a Twisted strports description)."],
        ["ssh", None, "tcp:2222", "Git-over-SSH endpoint; 'none' turns SSH off."],
        [
            "git",
            None,
            None,
            "git:// (anonymous, read-only, public repositories) endpoint; off unless given.",
        ],
        ["ssh-login-timeout", None, 30.0, "Seconds an SSH client may take to log in.", float],
        [
            "ssh-max-auth-attempts",
            None,
            6,
            "Failed SSH logins before the connection is dropped.",
            int,
        ],
        [
            "git-request-timeout",
            None,
            30.0,
            "Seconds a git:// client may take to name its request.",
            float,
        ],
        ["compression-level", None, 6, "zlib level for objects that must be recompressed.", int],
        ["threads", None, 8, "Worker threads for storage, packing and hashing.", int],
        [
            "workers",
            None,
            os.cpu_count() or 1,
            "Worker processes sharing the listening sockets (tcp: endpoints only when > 1).",
            int,
        ],
        ["worker-fds", None, None, "Internal: listening sockets inherited from the supervisor."],
        [
            "sendfile",
            None,
            "on",
            "Send complete pack-cache entries with sendfile(2) over plain TCP: on or off.",
        ],
        # -- the pack cache and admission control (issue 4) --
        ["pack-cache-dir", None, None, "Pack cache directory (default: DATA_DIR/pack-cache)."],
        [
            "pack-cache-bytes",
            None,
            2 * 1024**3,
            "Bytes of packs the cache may keep (least recently used go first); 0 turns it off.",
            int,
        ],
        [
            "pack-cache-max-age",
            None,
            None,
            "Seconds after which a cached pack is dropped and rebuilt (default: never).",
            float,
        ],
        [
            "pack-cache-min-occurrences",
            None,
            1,
            "Cache a pack from its Nth request on (pre-warm always caches).",
            int,
        ],
        [
            "max-builds",
            None,
            4,
            "Pack builds at once; a fetch needing another gets 429/ERR (0: unlimited).",
            int,
        ],
        ["rate-per-user", None, 0.0, "Fetches a second per user, sustained (0: unlimited).", float],
        ["burst-per-user", None, 20.0, "Fetches a user may make at once, above the rate.", float],
        [
            "rate-per-ip",
            None,
            0.0,
            "Fetches a second per client IP, sustained (0: unlimited).",
            float,
        ],
        [
            "burst-per-ip",
            None,
            20.0,
            "Fetches a client IP may make at once, above the rate.",
            float,
        ],
        [
            "prewarm-refs",
            None,
            "",
            "After a push, pre-warm clone packs for HEAD's branch and for refs matching these"
            " comma-separated globs (e.g. 'refs/heads/release/*'); 'none' turns pre-warm off.",
        ],
    ]
    optParameters += [[name, None, None, doc, kind] for name, _, kind, doc in _LIMIT_OPTIONS]
    optFlags: list[list[Any]] = [[name, None, doc] for name, _, doc in _LIMIT_FLAGS]
    optParameters += [
        [name, None, getattr(HTTPLimits(), attr), doc, kind]
        for name, attr, kind, doc in _HTTP_LIMIT_OPTIONS
    ]

    def postOptions(self) -> None:
        _http_limits(self)
        try:
            self.admission_policy()
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["sendfile"] not in ("on", "off"):
            raise usage.UsageError("--sendfile must be on or off")
        if self["pack-cache-bytes"] < 0:
            raise usage.UsageError("--pack-cache-bytes cannot be negative")
        if self["pack-cache-min-occurrences"] < 1:
            raise usage.UsageError("--pack-cache-min-occurrences must be at least 1")
        max_age = self["pack-cache-max-age"]
        if max_age is not None and max_age <= 0:
            raise usage.UsageError("--pack-cache-max-age must be positive")

    def limits(self) -> Limits:
        given = {attr: self[name] for name, attr, _, _ in _LIMIT_OPTIONS if self[name] is not None}
        given.update({attr: bool(self[name]) for name, attr, _ in _LIMIT_FLAGS})
        return Limits(**given)

    def admission_policy(self) -> AdmissionPolicy:
        """The admission limits; ValueError for impossible ones."""
        if self["max-builds"] < 0:
            raise ValueError("--max-builds cannot be negative")
        for name in ("rate-per-user", "rate-per-ip"):
            if self[name] < 0:
                raise ValueError(f"--{name} cannot be negative")
        for name in ("burst-per-user", "burst-per-ip"):
            if self[name] < 1:
                raise ValueError(f"--{name} must be at least 1")
        return AdmissionPolicy(
            max_builds=self["max-builds"],
            per_user=RateLimit(self["rate-per-user"], self["burst-per-user"]),
            per_ip=RateLimit(self["rate-per-ip"], self["burst-per-ip"]),
        )

    def prewarm_refs(self) -> tuple[str, ...] | None:
        """Globs of refs to pre-warm besides HEAD's branch; None when pre-warm is off."""
        value = (self["prewarm-refs"] or "").strip()
        if value.lower() == "none":
            return None
        return tuple(p.strip() for p in value.split(",") if p.strip())


class StandaloneService(MultiService):
    """Opens the LMDB stores, bootstraps the admin user, then serves HTTP; closes the stores last."""

    log = Logger()

    def __init__(self, options: Options, reactor: Any = None):
        super().__init__()
        self.options = options
        self._reactor = reactor
        self.frontend: Any = None
        self.metadata: LMDBMetadataStore | None = None
        self.objects: LMDBObjectStore | None = None
        self.pack_cache: DiskPackCache | None = None

    def startService(self) -> None:
        if self._reactor is None:
            from twisted.internet import reactor as default_reactor

            self._reactor = default_reactor
        reactor: Any = self._reactor
        data_dir = os.path.abspath(self.options["data-dir"])
        _secure_data_dir(self.options, data_dir, self.log)
        if self.options["workers"] > 1 and not self.options["worker-fds"]:
            self._supervise(reactor, data_dir)
            super().startService()
            return
        if self.options["worker-fds"]:
            _die_with_parent()
        limits = self.options.limits()
        self.metadata = LMDBMetadataStore(os.path.join(data_dir, "metadata"))
        self.objects = LMDBObjectStore(os.path.join(data_dir, "objects"))
        self._bootstrap(self.metadata, data_dir)
        reactor.suggestThreadPoolSize(self.options["threads"])
        run = thread_runner(reactor, reactor.getThreadPool())
        spool_dir = os.path.join(data_dir, "spool")
        os.makedirs(spool_dir, mode=0o700, exist_ok=True)
        metrics = Metrics()
        policy = self.options.admission_policy()
        if self.options["pack-cache-bytes"] > 0:
            cache_dir = self.options["pack-cache-dir"] or os.path.join(data_dir, "pack-cache")
            self.pack_cache = DiskPackCache(
                os.path.abspath(cache_dir),
                max_bytes=self.options["pack-cache-bytes"],
                max_age=self.options["pack-cache-max-age"],
                min_occurrences=self.options["pack-cache-min-occurrences"],
                # No more builders than builds admitted: the rest would only queue.
                builders=policy.max_builds or self.options["threads"],
                on_event=metrics.pack_cache_event,
            )
            self.log.info("Pack cache: {dir}", dir=cache_dir)
        frontend = build_frontend(
            self.metadata,
            self.objects,
            run=run,
            limits=limits,
            spool_dir=spool_dir,
            compression_level=self.options["compression-level"],
            metrics=metrics,
            cache=self.pack_cache,
            admission=policy,
            prewarm_refs=self.options.prewarm_refs(),
            call_from_thread=reactor.callFromThread,
            sendfile=self.options["sendfile"] == "on",
            http_limits=_http_limits(self.options),
        )
        self.frontend = frontend
        site = frontend.site(spool_dir=spool_dir, http_limits=_http_limits(self.options))
        self._listen("http", site, reactor)
        if self.options["ssh"] not in (None, "", "none"):
            host_keys = load_or_create_host_keys(data_dir)
            for kind, fingerprint in sorted(host_key_fingerprints(host_keys).items()):
                self.log.info(
                    "SSH host key {kind}: {fingerprint}",
                    kind=kind.decode(),
                    fingerprint=fingerprint,
                )
            factory = frontend.ssh_factory(
                host_keys,
                login_timeout=self.options["ssh-login-timeout"],
                max_auth_attempts=self.options["ssh-max-auth-attempts"],
                clock=reactor,
            )
            self._listen("ssh", factory, reactor)
        if self.options["git"]:
            daemon = frontend.git_daemon_factory(
                request_timeout=self.options["git-request-timeout"], clock=reactor
            )
            self._listen("git", daemon, reactor)
        super().startService()

    def _bootstrap(self, metadata: LMDBMetadataStore, data_dir: str) -> None:
        token_path = bootstrap_admin(metadata, data_dir)
        if token_path is not None:
            self.log.info("Created user 'admin'; its token is in {path}", path=token_path)
        else:
            self.log.info("Admin token: {path}", path=os.path.join(data_dir, "admin-token"))

    def _endpoints(self) -> dict[str, str]:
        """The enabled services and their endpoint descriptions."""
        out = {"http": self.options["http"]}
        if self.options["ssh"] not in (None, "", "none"):
            out["ssh"] = self.options["ssh"]
        if self.options["git"]:
            out["git"] = self.options["git"]
        return out

    def _listen(self, name: str, factory: Any, reactor: Any) -> None:
        """Serve *factory* on the named endpoint, or on the socket a supervisor handed down."""
        inherited = parse_worker_fds(self.options["worker-fds"] or "")
        if name in inherited:
            fd, family = inherited[name]
            service: IService = _AdoptedPort(reactor, fd, family, factory)
        else:
            service = strports.service(self.options[name], factory, reactor=reactor)
        service.setName(name)
        service.setServiceParent(self)

    def _supervise(self, reactor: Any, data_dir: str) -> None:
        """Bind every endpoint, do the one-time start-up work, then run the workers."""
        metadata = LMDBMetadataStore(os.path.join(data_dir, "metadata"))
        try:
            self._bootstrap(metadata, data_dir)
        finally:
            metadata.close()
        endpoints = self._endpoints()
        if "ssh" in endpoints:
            load_or_create_host_keys(data_dir)  # once, before workers race to make them
        sockets = {name: bind_tcp(desc) for name, desc in endpoints.items()}
        supervisor = WorkerSupervisor(
            reactor=reactor,
            count=self.options["workers"],
            worker_argv=worker_argv(self.options, data_dir),
            sockets=sockets,
            metrics_dir=os.path.join(data_dir, "metrics"),
        )
        supervisor.setName("workers")
        supervisor.setServiceParent(self)
        self.log.info(
            "Supervising {count} workers on {endpoints}",
            count=self.options["workers"],
            endpoints=", ".join(f"{k}={v}" for k, v in sorted(endpoints.items())),
        )

    def stopService(self) -> Any:
        d = super().stopService()

        def close(result: Any) -> Any:
            # The cache first: it waits for builds that still read the stores.
            if self.pack_cache is not None:
                self.pack_cache.close()
            for store in (self.metadata, self.objects):
                if store is not None:
                    store.close()
            return result

        return d.addBoth(close)


class _AdoptedPort(Service):
    """Listens on a socket inherited from the supervisor, as strports.service would."""

    def __init__(self, reactor: Any, fd: int, family: int, factory: Any):
        self.reactor, self.fd, self.family, self.factory = reactor, fd, family, factory
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


def _die_with_parent() -> None:
    """Ask Linux to end this worker when its supervisor goes (a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def makeService(options: Options) -> IService:
    return StandaloneService(options)
