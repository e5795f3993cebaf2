"""Process trees (fleet.run.process): stop_process_tree past a SIGTERM that is ignored, the
engine's last act (reap_children) that ends its helpers without waiting out one that ignores
SIGTERM, and an engine kept to the cores it is bound to. Trees left behind by an engine's owner
are test_owner.py's; by a whole fleet, test_launcher.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
from fake_engine import fake_command
from fleets import ROOT
from owners import family, kill_all, model, wait_gone

from fleet.run.process import stop_process_tree


async def _spawn_sigterm_ignoring_tree() -> tuple[asyncio.subprocess.Process, list[psutil.Process]]:
    """A fake engine (own session, like the launcher makes) ignoring SIGTERM, with a child that does too."""
    cfg = model(fake_ignore_sigterm=True, fake_spawn_child=True)
    proc = await asyncio.create_subprocess_exec(
        *fake_command(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cfg.port}", timeout=2) as http:
        async with asyncio.timeout(20):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        children = (await http.get("/fake/stats")).json()["children"]
    tree = family(proc.pid)
    assert len(children) == 1 and {p.pid for p in tree} == {proc.pid, *children}
    return proc, tree


def test_stop_process_tree_sigkills_a_tree_that_ignores_sigterm_after_the_grace() -> None:
    async def scenario() -> None:
        proc, tree = await _spawn_sigterm_ignoring_tree()
        try:
            began = time.monotonic()
            await stop_process_tree(proc, grace=0.5)
            took = time.monotonic() - began
            assert 0.5 <= took < 8, took  # the grace, not the 15 s default
            assert proc.returncode == -signal.SIGKILL
            assert wait_gone(tree) == []
        finally:
            kill_all(tree)

    asyncio.run(scenario())


REAPING_ENGINE = """
import json, os, signal, subprocess, sys, time
import psutil
from fleet.run.process import ignores_sigterm, reap_children
# a helper as multiprocessing's resource tracker is: SIGTERM ignored, it ends when its pipe closes
tracker = subprocess.Popen([sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                            "print('ready', flush=True); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
tracker.stdout.readline()
began = time.monotonic()
reap_children(grace=5.0)
print(json.dumps({"took": time.monotonic() - began, "plain_alive": psutil.pid_exists(plain.pid), "tracker_alive": tracker.poll() is None,
                  "tracker": tracker.pid, "ignores": [ignores_sigterm(tracker.pid), ignores_sigterm(os.getpid())]}), flush=True)
os._exit(0)
"""


def test_an_engines_last_act_ends_its_helpers_without_waiting_out_one_that_ignores_sigterm() -> None:
    """reap_children terminates the engine's helpers, but a helper that ignores SIGTERM (multiprocessing's
    resource tracker) is not waited for: it cost every engine stop the whole grace. It ends by itself
    once the engine has exited."""
    import json

    out = subprocess.run([sys.executable, "-c", REAPING_ENGINE], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["took"] < 2.0, seen  # not the 5 s grace
    assert not seen["plain_alive"]  # terminated (and reaped) as before
    assert seen["tracker_alive"] and seen["ignores"] == [True, False]
    helper = []
    with contextlib.suppress(psutil.NoSuchProcess):
        helper.append(psutil.Process(seen["tracker"]))
    assert wait_gone(helper) == []  # its pipe closed with the engine


def test_an_engine_keeps_to_the_cores_it_is_bound_to() -> None:
    from fleet.run.process import bound_cores

    assert bound_cores("0-3,8") == {0, 1, 2, 3, 8}
    assert bound_cores("0-1|2-3") == {0, 1, 2, 3}  # tensor parallel ranks: all of them
    assert bound_cores("auto") is bound_cores("nobind") is bound_cores("") is None
    probe = "import os; from fleet.run.process import keep_to_bound_cores; keep_to_bound_cores(); print(sorted(os.sched_getaffinity(0)))"
    last = max(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(last)},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"[{last}]"
