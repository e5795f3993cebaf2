"""Process mechanics shared by the launcher and the engines: signals, process trees, parent death.

No torch or vllm here: the gateway side imports this module too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import stat
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import uvicorn

if TYPE_CHECKING:
    import psutil

# psutil is imported where it is used: the launcher first needs it once engines are starting,
# after the gateway listens (its import was ~0.09 s of the gateway's start on the H200 host).

STOP_GRACE = 15.0
LINE_LIMIT = 1 << 20  # the longest output line read whole (vLLM prints its config on one line)


class OutputPipe:
    """A child's stdout and stderr as one pipe, read line by line, closed by its owner.

    Not asyncio's own PIPE: that read end belongs to the subprocess transport, which closes it
    only at EOF, and a vLLM helper that inherited the write end keeps it open after the engine
    died; the read end was then left to the garbage collector (an unclosed file). Here the owner
    makes the pipe before the spawn (`write_end` goes to the child), `attach`es the read end to
    the loop after it, and `close`s it when done: `reader` then ends at once.
    """

    def __init__(self) -> None:
        self._read_end, self.write_end = os.pipe()
        self.reader = asyncio.StreamReader(limit=LINE_LIMIT)
        self._transport: asyncio.ReadTransport | None = None

    async def attach(self) -> None:
        """After the spawn: drop this process's copy of the write end; read the other end on the loop."""
        os.close(self.write_end)
        self.write_end = -1
        loop = asyncio.get_running_loop()
        pipe = os.fdopen(self._read_end, "rb", buffering=0)
        self._read_end = -1
        self._transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self.reader), pipe)

    def close(self) -> None:
        """Close both ends (whatever is still open here); the reader sees EOF."""
        for fd in (self._read_end, self.write_end):
            if fd >= 0:
                os.close(fd)
        self._read_end = self.write_end = -1
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self.reader.feed_eof()


class SignalFreeServer(uvicorn.Server):
    """uvicorn without its own signal handling: the process that runs it owns SIGINT/SIGTERM.
    (uvicorn re-raises a captured SIGTERM once it has shut down, which would kill the process
    before its own clean-up ran.)

    With `unix_socket`, it listens there too, beside its TCP address, until it shuts down: an
    engine on the gateway's machine is reached there (fleet.run.local.engine_socket says why).
    With `mux` too, a connection there that opens with fleet.wire.mux's MAGIC is `mux()`'s
    instead of HTTP's (the gateway's one connection for every request); those end as it shuts down."""

    def __init__(self, config: uvicorn.Config, unix_socket: str | None = None,
                 mux: Callable[[], Any] | None = None) -> None:
        super().__init__(config)
        self.unix_socket = unix_socket
        self.mux = mux
        self.mux_sides: weakref.WeakSet[Any] = weakref.WeakSet()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        if self.unix_socket is None or self.should_exit:
            return
        remove_socket_file(self.unix_socket)  # left by an engine on this port that was killed
        config, path = self.config, self.unix_socket

        def protocol() -> asyncio.Protocol:  # what uvicorn's startup makes for each TCP connection
            made: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state)
            return made

        def mux_side() -> asyncio.Protocol:
            assert self.mux is not None
            side = self.mux()
            self.mux_sides.add(side)
            return side  # type: ignore[no-any-return]

        factory: Callable[[], asyncio.Protocol] = protocol
        if self.mux is not None:
            from fleet.wire.mux import Sniffer

            factory = lambda: Sniffer(protocol, mux_side)  # noqa: E731
        try:
            server = await asyncio.get_running_loop().create_unix_server(factory, path=path, backlog=config.backlog)
        except OSError as e:  # the launcher's gateway would wait for it in vain: say so, and stop
            print(f"cannot listen on the Unix socket {path}: {e}", file=sys.stderr, flush=True)
            await self.shutdown()
            sys.exit(1)
        self.servers.append(server)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        try:
            await super().shutdown(sockets)
        finally:
            for side in list(self.mux_sides):
                side.close()
            if self.unix_socket is not None:
                remove_socket_file(self.unix_socket)


def remove_socket_file(path: str) -> None:
    """Remove a Unix socket's file, if there is one there (any other file stays)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def freeze_startup_heap() -> None:
    """Collect, then hide everything allocated so far from the cyclic garbage collector (gc.freeze).

    Once a process serves, what startup built lives as long as it: the gateway's modules, app and
    OpenAPI document; an engine process's vLLM and tokenizer (about 640,000 objects, whose full
    collection stalled its loop for 336-372 ms on the 2-core VM; `vllm serve` freezes its API
    server's heap the same way). Frozen, it is no longer traversed by full collections, and CPython's rule
    "collect everything when the pending objects reach a quarter of the long-lived ones" counts
    only what requests left behind: cyclic garbage (Litestar leaves some on every cancelled stream
    and every 400) is then collected in small, frequent passes instead of piling up to tens of
    thousands of objects between rare full ones (RSS steps of 5-10 % that pymalloc never returns).
    """
    gc.collect()
    gc.freeze()


def bound_cores(spec: str) -> set[int] | None:
    """The cores a `VLLM_CPU_OMP_THREADS_BIND` value names ("0-3,8", or "0-3|4-7" for tensor
    parallel ranks: all of them); None for "auto", "nobind" or anything else."""
    cores: set[int] = set()
    for part in spec.replace("|", ",").split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            return None
        cores.update(range(int(first), int(last if dash else first) + 1))
    return cores or None


def keep_to_bound_cores(env: Mapping[str, str] = os.environ) -> None:
    """Run this process (and what it spawns) on the cores its engine is bound to, before torch loads.

    MKL, as torch loads, pins the process to each core it may use in turn to count them; on a
    2-core VM a restarted replica hung for minutes in that probe, moving onto the core where the
    other replica's threads spun (sched_setaffinity never returned). Kept to its own cores, the
    probe never leaves them, and vLLM's own processes stay off the other engines' cores."""
    cores = bound_cores(env.get("VLLM_CPU_OMP_THREADS_BIND", ""))
    if cores and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):  # a core this process may not use: leave it as it was
            os.sched_setaffinity(0, cores & os.sched_getaffinity(0) or cores)


PARENT_DEATH_SIGNAL_ENV = "FLEET_PARENT_DEATH_SIGNAL"  # "SIGKILL": an engine whose parent's death is the end


def die_with_parent(env: Mapping[str, str] = os.environ) -> None:
    """Ask Linux to signal this process when its parent dies, even by SIGKILL: SIGTERM (a clean
    stop), or what $FLEET_PARENT_DEATH_SIGNAL names. A cluster's engine asks for SIGKILL: its host
    actor died, Ray kills it anyway, and a clean stop would take requests it cannot finish; its
    node's reaper (fleet.cluster.reaper) then stops the rest of its tree."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        sig = signal.Signals[env.get(PARENT_DEATH_SIGNAL_ENV, "SIGTERM")]
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def descendants(pid: int, *, strict: bool = False) -> list[psutil.Process]:
    """Every live descendant of a process.

    psutil reads /proc, which needs file descriptors: out of them (EMFILE), it raises a plain
    OSError, not a psutil.Error. Then the walk found nothing it can vouch for: [] (a caller that
    only takes note tries again later), or, with `strict`, the OSError (a caller that must know
    the tree is gone)."""
    import psutil

    try:
        children: list[psutil.Process] = psutil.Process(pid).children(recursive=True)
        return children
    except psutil.Error:
        return []
    except OSError:
        if strict:
            raise
        return []


def ignores_sigterm(pid: int) -> bool:
    """True if the process ignores SIGTERM (the SigIgn mask in /proc/PID/status), as
    multiprocessing's resource tracker does: it ends by itself once the last process holding its
    pipe exits, after unlinking what they leaked."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next((line.split()[1] for line in f if line.startswith("SigIgn:")), "0")
    except OSError:
        return False
    return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)


class Tree:
    """A process tree to stop: its process group (the leader's pid; None: no group of its own) and
    the descendants seen, some of which may have left the group (vLLM's helpers, orphans once the
    engine died). The one way fleet signals a tree: the group by killpg, which needs no file
    descriptor, and each descendant by psutil, which checks it is still the process it was before
    it signals it. An OSError on the way (EMFILE: psutil cannot read /proc) is kept in `errors`,
    never raised half-way: everything that can be signalled is."""

    def __init__(self, group: int | None, members: Iterable[psutil.Process] = ()) -> None:
        self.group = group
        self.members: dict[int, psutil.Process] = {p.pid: p for p in members}
        self.errors: list[OSError] = []

    def note(self, root: int) -> None:
        """Add the live descendants of `root` (a walk that cannot read /proc is an error kept)."""
        try:
            for p in descendants(root, strict=True):
                self.members.setdefault(p.pid, p)
        except OSError as e:
            self.errors.append(e)

    def signal(self, sig: int) -> list[psutil.Process]:
        """`sig` to the group and each member; the members signalled (not those already gone, nor
        those psutil could not check: no use waiting for them)."""
        import psutil

        if self.group is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.group, sig)
        signalled = []
        for p in list(self.members.values()):
            try:
                p.send_signal(sig)
                signalled.append(p)
            except psutil.Error:  # gone already
                pass
            except OSError as e:
                self.errors.append(e)
        return signalled

    def group_alive(self) -> bool:
        if self.group is None:
            return False
        try:
            os.killpg(self.group, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists (not ours to signal)
            pass
        return True

    def alive(self) -> bool:
        """Whether anything of it still runs."""
        return self.group_alive() or any(_running(p) for p in self.members.values())

    def stop_blocking(self, grace: float = STOP_GRACE, poll: float = 0.05) -> None:
        """SIGTERM, wait up to `grace` s for everything to end, SIGKILL what is left: for a process
        with no event loop (an engine's last act, the cluster's reaper). Children of this process
        are reaped as they end (psutil.wait_procs)."""
        import psutil

        deadline = time.monotonic() + grace
        try:
            psutil.wait_procs(self.signal(signal.SIGTERM), timeout=grace)
        except OSError as e:
            self.errors.append(e)
        while self.alive() and time.monotonic() < deadline:  # members of the group it never saw
            time.sleep(poll)
        try:
            psutil.wait_procs(self.signal(signal.SIGKILL), timeout=1.0)
        except OSError as e:
            self.errors.append(e)


def _running(p: psutil.Process) -> bool:
    import psutil

    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except (psutil.Error, OSError):
        return False


def reap_children(grace: float = 5.0) -> None:
    """Stop this process's descendants (vLLM's helpers): SIGTERM, SIGKILL those still alive after `grace`.

    A helper that ignores SIGTERM (multiprocessing's resource tracker) is left to end by itself
    when this process exits: waiting for it here cost every engine stop the whole grace, and
    killing it would leave behind the shared memory it exists to clean up."""
    family = descendants(os.getpid())  # the engine's last act: best effort (OSError too), the launcher kills the rest
    Tree(None, [p for p in family if not ignores_sigterm(p.pid)]).stop_blocking(grace)


async def wait_exit(proc: asyncio.subprocess.Process, poll: float = 0.05, until: asyncio.Event | None = None) -> int | None:
    """The exit code, as soon as the process exits (None if `until` is set first). Not `proc.wait()`:
    asyncio wakes it only once the stdout pipe is closed too (CPython 3.11-3.13), and a child that
    inherited it keeps it open."""
    while proc.returncode is None:
        if until is not None and until.is_set():
            return None
        await asyncio.sleep(poll)
    return proc.returncode


async def stop_process_tree(
    proc: asyncio.subprocess.Process, grace: float = STOP_GRACE, also: Iterable[psutil.Process] = (),
    now: asyncio.Event | None = None,
) -> None:
    """SIGTERM the process group, wait `grace` seconds (less if `now` is set meanwhile), then SIGKILL
    whatever is left of the tree.

    `also`: descendants seen earlier. Once the engine died, those that left its group are orphans
    that neither its group nor its process tree reaches any more.

    An OSError on the way (EMFILE: psutil cannot read /proc to walk the tree or to check a
    process before signalling it) does not stop it half-way: it signals all it can (the group
    needs no file descriptor), then raises the first such error, since a descendant may be left;
    the caller decides whether to try again."""
    import psutil

    tree = Tree(proc.pid, also)
    tree.note(proc.pid)
    tree.signal(signal.SIGTERM)  # the group, and descendants that left it
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace):
            await wait_exit(proc, until=now)
    tree.note(proc.pid)
    killed = tree.signal(signal.SIGKILL)
    await wait_exit(proc)
    try:
        await asyncio.get_running_loop().run_in_executor(None, lambda: psutil.wait_procs(killed, timeout=grace))
    except OSError as e:
        tree.errors.append(e)
    if tree.errors:
        raise tree.errors[0]
