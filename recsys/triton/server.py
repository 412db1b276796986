"""Run the tritonserver binary that ``nvidia-pytriton`` bundles, without pytriton's Python API.

The wheel ships Triton with only the python backend, and its files are not laid out the way
Triton expects a backend directory: the python stub for each interpreter version sits in
``python_backend_stubs/<X.Y>/``. :func:`prepare_backend_directory` assembles a proper
``<dir>/python/`` out of symlinks, and :class:`TritonServer` runs the binary with explicit
model control restricted to holders of the admin key, loopback-only endpoints and an
environment in which the python stub embeds *this* interpreter (so models import the
platform's numpy, onnxruntime and tokenizers).

:meth:`TritonServer.command` and :meth:`TritonServer.environment` spawn nothing, so the stack
launcher can start a detached server from them; :meth:`TritonServer.start` is for tests and
scripts that own the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from recsys.config import load_settings
from recsys.credentials import triton_admin_key, triton_restriction_flags

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
"""Triton's default python-backend shared-memory prefix; every region we name starts with it."""

BINARY_ENV = "RECSYS_TRITONSERVER"
"""Overrides the tritonserver binary (e.g. a full Triton install) when set."""

DEFAULT_RESPONSE_CACHE_BYTES = 64 * 1024 * 1024
"""Size of Triton's local response cache (``--cache-config=local,size=...``). The cache only
serves models whose config enables ``response_cache``; 0 starts the server without a cache."""


KEY_IN_ARGV_ENV = "RECSYS_TRITON_KEY_IN_ARGV"
"""``1`` starts tritonserver with the admin key on its command line (no keyguard): only for
hosts without a C compiler where no untrusted local user exists (e.g. a container of its own)."""
KEY_PLACEHOLDER = "@RECSYS_TRITON_ADMIN_KEY@"
"""Stands for the admin key in the argv the kernel shows; keyguard.c fills it in before main."""
ARGV_SECRET_ENV = "RECSYS_TRITON_ARGV_SECRET"
"""Carries the admin key to keyguard.c (a process's environment is private to its user)."""
KEYGUARD_SOURCE = Path(__file__).with_name("keyguard.c")


class TritonStartError(RuntimeError):
    """tritonserver exited or never became live; the message carries the tail of its log."""


class KeyguardUnavailableError(TritonStartError):
    """The library that keeps the admin key out of ``/proc/<pid>/cmdline`` cannot be built."""


def _private_directory(path: Path) -> Path:
    """Create ``path`` (mode 0700) or accept it only if this user owns it and nobody else may
    write to it: the server loads code (backend symlinks, keyguard) from there, so a folder
    another user planted (e.g. a guessable name under /tmp) must never be used."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.lstat()
    if not path.is_dir() or path.is_symlink() or info.st_uid != os.getuid():
        raise TritonStartError(f"refusing to use {path}: it is not a folder owned by this user")
    if info.st_mode & 0o022:
        path.chmod(info.st_mode & ~0o022 & 0o7777)
    return path


def build_keyguard(target_dir: Path, timeout_s: float = 120) -> Path:
    """Compile ``keyguard.c`` into ``target_dir`` (once per source version) and return the
    shared library's path. Raises :class:`KeyguardUnavailableError` naming what is missing."""
    source = KEYGUARD_SOURCE.read_bytes()
    target_dir = _private_directory(Path(target_dir))
    library = target_dir / f"keyguard-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if library.is_file():
        return library
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise KeyguardUnavailableError(
            "no C compiler (cc/gcc) to build the keyguard that keeps the Triton admin key off "
            "the server's command line; install gcc, or set "
            f"{KEY_IN_ARGV_ENV}=1 where no untrusted local user exists"
        )
    tmp = target_dir / f".{library.name}.{os.getpid()}.tmp"
    result = subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(KEYGUARD_SOURCE)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise KeyguardUnavailableError(
            f"building the keyguard with {compiler} failed: {result.stderr.strip()[-500:]}"
        )
    os.replace(tmp, library)
    return library


def _pytriton_server_root() -> Path | None:
    """``site-packages/pytriton/tritonserver`` of the installed wheel, found without importing
    pytriton (whose import pulls in much more than we use)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    return root if root.is_dir() else None


def find_tritonserver() -> Path:
    """Locate the tritonserver binary: ``$RECSYS_TRITONSERVER``, then the one bundled with
    ``nvidia-pytriton``, then ``tritonserver`` on PATH."""
    override = os.environ.get(BINARY_ENV)
    if override:
        path = Path(override).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"${BINARY_ENV}={override} is not an executable file")
        return path
    root = _pytriton_server_root()
    if root is not None and (root / "bin" / "tritonserver").is_file():
        return root / "bin" / "tritonserver"
    found = shutil.which("tritonserver")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "tritonserver not found: install nvidia-pytriton (it bundles the binary), put "
        f"tritonserver on PATH, or set ${BINARY_ENV}"
    )


def _python_backend_sources() -> dict[str, Path]:
    """The three files a ``python`` backend directory needs, from the pytriton wheel."""
    root = _pytriton_server_root()
    if root is None:
        raise FileNotFoundError("nvidia-pytriton is not installed; no python backend available")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root
        / "backends"
        / "python"
        / "triton_python_backend_utils.py",
        "triton_python_backend_stub": root
        / "python_backend_stubs"
        / version
        / "triton_python_backend_stub",
    }
    missing = [str(path) for path in sources.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"python backend files missing for Python {version}: {', '.join(missing)}"
        )
    return sources


def prepare_backend_directory(target: Path) -> Path:
    """Create (idempotently) ``target/python/`` holding symlinks to the bundled python backend
    library, its utils module and the stub for the running interpreter version; return
    ``target`` for ``--backend-directory``.

    Each link is swapped in with ``os.replace`` so a server starting concurrently never sees a
    missing or half-made link.
    """
    target = Path(target)
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, source in _python_backend_sources().items():
        link = python_dir / name
        if link.is_symlink() and Path(os.readlink(link)) == source:
            continue
        tmp = python_dir / f".{name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(source)
        os.replace(tmp, link)
    return target


def _tritonserver_pids() -> list[int]:
    """PIDs of every running tritonserver on this machine (any user), from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "tritonserver":
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def cleanup_shared_memory(prefix: str | None = None) -> list[Path]:
    """Remove python-backend shared-memory regions that a dead server left in /dev/shm.

    A SIGKILLed server (or stub) cannot unlink its regions, and they pin RAM until reboot. With
    ``prefix`` (the server's own ``shm-region-prefix-name``) only that server's regions go;
    without it, every ``triton_python_backend_shm_region_*`` goes, but only while no
    tritonserver runs, so a live server's memory is never pulled from under it.
    """
    if prefix is None:
        if _tritonserver_pids():
            log.info("tritonserver still running; leaving shared-memory regions alone")
            return []
        prefix = SHM_PREFIX
    if not prefix.startswith(SHM_PREFIX) or "/" in prefix:
        raise ValueError(f"refusing to clean shared memory with prefix {prefix!r}")
    removed = []
    for path in SHM_DIR.glob(f"{prefix}*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    if removed:
        log.info("removed %d stale shared-memory regions", len(removed))
    return removed


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class TritonServer:
    """One tritonserver process serving ``model_repository`` with explicit model control.

    Endpoints bind to ``host`` (loopback by default: the control API can load arbitrary code
    from the repository, so it must not face the network). On top of that, the model-repository
    API (load, unload, index) over both gRPC and HTTP refuses requests that lack the admin key
    header, so a process that can reach the port but is not the pipeline cannot swap models;
    inference, health and metadata stay open. ``admin_key`` defaults to the platform's key
    (:func:`recsys.credentials.triton_admin_key`, generated on first use);
    ``restrict_model_control=False`` turns the restriction off.

    Triton has no file or environment option for the key, only its command line, which every
    local user can read in ``/proc/<pid>/cmdline``. So the argv holds
    :data:`KEY_PLACEHOLDER` and the key travels in the (owner-only) environment to
    ``keyguard.c``, preloaded into the server, which fills it in before ``main`` without
    touching the bytes the kernel shows. ``RECSYS_TRITON_KEY_IN_ARGV=1`` opts out.
    """

    def __init__(
        self,
        model_repository: Path | str,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        log_path: Path | str | None = None,
        workdir: Path | str | None = None,
        *,
        log_verbose: int = 0,
        exit_timeout_s: int = 10,
        admin_key: str | None = None,
        restrict_model_control: bool = True,
        response_cache_bytes: int = DEFAULT_RESPONSE_CACHE_BYTES,
        query_sample_dir: Path | str | None = None,
        query_sample_rate: float | None = None,
    ) -> None:
        if isinstance(response_cache_bytes, bool) or int(response_cache_bytes) < 0:
            raise ValueError(f"response_cache_bytes must be >= 0, got {response_cache_bytes!r}")
        self.response_cache_bytes = int(response_cache_bytes)
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self.http_port = int(http_port)
        self.grpc_port = int(grpc_port)
        self.metrics_port = int(metrics_port)
        default_workdir = Path(tempfile.gettempdir()) / f"recsys-triton-{self.grpc_port}"
        self.workdir = Path(workdir).resolve() if workdir else default_workdir
        self.log_path = Path(log_path) if log_path else self.workdir / "tritonserver.log"
        self.log_verbose = log_verbose
        self.exit_timeout_s = exit_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self.query_sample_dir = Path(query_sample_dir).resolve() if query_sample_dir else None
        self.query_sample_rate = query_sample_rate
        if restrict_model_control and admin_key is None:
            admin_key = triton_admin_key(load_settings(), create=True)
        self._admin_key = admin_key if restrict_model_control else None
        self.key_in_argv = os.environ.get(KEY_IN_ARGV_ENV, "").strip() == "1"

    def __repr__(self) -> str:  # never show the admin key
        return f"TritonServer({str(self.model_repository)!r}, grpc={self.grpc_url!r})"

    @property
    def admin_key(self) -> str | None:
        """The key model-control calls must carry (None when model control is unrestricted)."""
        return self._admin_key

    @property
    def backend_directory(self) -> Path:
        return self.workdir / "backends"

    @property
    def shm_prefix(self) -> str:
        """Per-server shared-memory prefix, so stopping one server cleans only its regions.
        Derived from the ports, which no two live servers on one host can share."""
        return f"{SHM_PREFIX}{self.http_port}_{self.grpc_port}_"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def _guards_key(self) -> bool:
        return self._admin_key is not None and not self.key_in_argv

    def command(self) -> list[str]:
        """The tritonserver argv. Spawns nothing; it does (idempotently) create the private
        work folder and its backend directory of symlinks, without which this command could
        not start.

        The key appears as :data:`KEY_PLACEHOLDER` (the keyguard in :meth:`environment` fills
        it in); with ``RECSYS_TRITON_KEY_IN_ARGV=1`` it is the key itself, so record argvs only
        through :func:`recsys.credentials.redact_command`."""
        _private_directory(self.workdir)
        prepare_backend_directory(self.backend_directory)
        binary = find_tritonserver()
        return [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.backend_directory}",
            "--model-control-mode=explicit",
            # Our configs are complete; auto-complete would start one extra python stub per load.
            "--disable-auto-complete-config",
            # No CUDA here: do not reserve pinned host memory for GPU transfers.
            "--pinned-memory-pool-byte-size=0",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--metrics-config=summary_latencies=true",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self._cache_flags(binary),
            *(triton_restriction_flags(self._argv_key) if self._admin_key else []),
        ]

    @property
    def _argv_key(self) -> str:
        return KEY_PLACEHOLDER if self._guards_key else str(self._admin_key)

    def _cache_flags(self, binary: Path) -> list[str]:
        """The response-cache flags: none when ``response_cache_bytes`` is 0. Triton looks for
        cache libraries in ``/opt/tritonserver/caches`` unless told otherwise; the pytriton
        wheel (and any install laid out like ``<root>/bin/tritonserver``) keeps them in
        ``<root>/caches``, so that folder is passed when it holds the local cache."""
        if not self.response_cache_bytes:
            return []
        flags = [f"--cache-config=local,size={self.response_cache_bytes}"]
        caches = binary.resolve().parent.parent / "caches"
        if (caches / "local").is_dir():
            flags.append(f"--cache-directory={caches}")
        return flags

    def environment(self) -> dict[str, str]:
        """Variables to set on top of the caller's environment (not a full environment).

        The python stub embeds ``libpython`` and finds its ``sys.prefix`` by looking up
        ``python3`` on PATH, so this interpreter's ``bin`` goes first on PATH (models then see
        this virtualenv's packages) and its ``libpython`` directory goes first on
        LD_LIBRARY_PATH (otherwise a system libpython of the same version is picked up and
        mixes standard libraries).
        """
        bin_dir = str(Path(sys.executable).parent)
        lib_dirs = [d for d in (sysconfig.get_config_var("LIBDIR"),) if d and Path(d).is_dir()]
        root = _pytriton_server_root()
        if root is not None and (root.parent.parent / "nvidia_pytriton.libs").is_dir():
            lib_dirs.append(str(root.parent.parent / "nvidia_pytriton.libs"))
        path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        ld_path = os.environ.get("LD_LIBRARY_PATH", "")
        return {
            "PATH": os.pathsep.join([bin_dir, path]),
            "LD_LIBRARY_PATH": os.pathsep.join([*lib_dirs, *([ld_path] if ld_path else [])]),
            **self._query_sampling_environment(),
            **self._keyguard_environment(),
        }

    def _keyguard_environment(self) -> dict[str, str]:
        """``LD_PRELOAD`` of the keyguard and the key for it to fill in (it removes both from
        the server's environment before ``main``, so the python stubs inherit neither).
        Empty when model control is unrestricted or the key is on the command line."""
        if not self._guards_key:
            return {}
        library = build_keyguard(self.workdir / "keyguard")
        return {"LD_PRELOAD": str(library), ARGV_SECRET_ENV: str(self._admin_key)}

    def _query_sampling_environment(self) -> dict[str, str]:
        """``RECSYS_QUERY_SAMPLE_DIR`` / ``_RATE`` for the model's query sampler (the python
        stubs inherit the server's environment); empty when sampling is not configured."""
        if self.query_sample_dir is None:
            return {}
        env = {"RECSYS_QUERY_SAMPLE_DIR": str(self.query_sample_dir)}
        if self.query_sample_rate is not None:
            env["RECSYS_QUERY_SAMPLE_RATE"] = repr(float(self.query_sample_rate))
        return env

    def is_live(self, timeout_s: float = 2.0) -> bool:
        """True when the HTTP endpoint reports the server live."""
        try:
            with urllib.request.urlopen(
                f"{self.http_url}/v2/health/live", timeout=timeout_s
            ) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout_s: float = 60) -> None:
        """Spawn the server and wait until it is live; raise :class:`TritonStartError` with its
        log tail if it exits or is not live within ``timeout_s``."""
        if self._process is not None and self._process.poll() is None:
            raise TritonStartError(f"this TritonServer already runs (pid {self._process.pid})")
        busy = [
            port
            for port in (self.http_port, self.grpc_port, self.metrics_port)
            if _port_in_use(self.host, port)
        ]
        if busy:
            raise TritonStartError(
                f"cannot start tritonserver: port(s) {busy} on {self.host} already in use"
            )
        self.model_repository.mkdir(parents=True, exist_ok=True)
        _private_directory(self.workdir)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self.command()
        env = {**os.environ, **self.environment()}
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                command,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(self.workdir),
                start_new_session=True,
            )
        log.info("tritonserver started (pid %d, log %s)", self._process.pid, self.log_path)
        deadline = time.monotonic() + timeout_s
        while not self.is_live():
            code = self._process.poll()
            if code is not None:
                self._process = None
                cleanup_shared_memory(self.shm_prefix)
                raise TritonStartError(
                    f"tritonserver exited with code {code}; log {self.log_path}:\n"
                    f"{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TritonStartError(
                    f"tritonserver not live after {timeout_s:.0f}s; log {self.log_path}:\n"
                    f"{_tail(self.log_path)}"
                )
            time.sleep(0.2)

    def stop(self, timeout_s: float = 15) -> None:
        """SIGTERM the server (it unloads models and stops its python stubs), SIGKILL its whole
        process group if it is still there after ``timeout_s``, then remove this server's
        shared-memory regions."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver (pid %d) ignored SIGTERM; killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process is not None:
            # Stubs share the group; make sure none outlives the server.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        cleanup_shared_memory(self.shm_prefix)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
