"""Processes for the tests, forked from one server that imported torch and the project once per run.

Starting a fresh interpreter costs 2 to 6 CPU-seconds of imports (torch, then transformers'
modeling code, which imports torch.distributed.tensor): more than most tests compute, and the
suite starts hundreds of processes. Python's "forkserver" start method solves this the standard
way: one server process, started on first use, imports PRELOAD and then forks a child for every
process a test asks for, so each starts in milliseconds with the modules loaded (copy on write).
The server runs no test code and starts no threads, so forking it is safe; every child is a fresh
process of its own: one that crashes, hangs or leaves a collective half done cannot leak into the
next test, and the helpers here kill what outlives its time limit.

Three kinds of process, each as real as what it stands for:
- `context()`: the multiprocessing context `support.spawn.run` starts its gloo ranks with.
- `python(args)`: `python -m module ...` as a command line runs it (`runpy`, the module's own
  `if __name__ == "__main__"`, its exit status, its stdout and stderr), as a CompletedProcess.
- `torchrun(launcher_args)`: torch's own torchrun (`torch.distributed.run.main`: its parser, its
  rendezvous, its elastic agent with restarts, its exit status); only its workers start by
  forking the agent, already loaded, instead of exec'ing a new interpreter (the agent's
  `start_method` for a function entrypoint). A worker runs the module as `python -u -m` would.

Where "forkserver" does not exist (Windows), `context()` falls back to "spawn", and the two
helpers to plain subprocesses.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback

from support.paths import ROOT

# Imported once by the server. experiments.train pulls in transformers' modeling code and datasets.
PRELOAD = ["torch", "torch.distributed", "torch.distributed.run", "ddp_from_scratch", "ddp_native", "experiments.train"]
TIMEOUT_S = 180


def available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


def context():
    """The multiprocessing context for test processes: "forkserver" with PRELOAD, else "spawn"."""
    if not available():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts, on the first process
    return ctx


def stop() -> None:
    """Stop the server and wait for it (at the end of a pytest run, conftest.py).

    Its children are its own to reap, so their CPU time reaches pytest's, and `/usr/bin/time`'s,
    only through it: a server left to exit after pytest (its "alive" pipe closes) is nobody's child
    by then, and a suite's measured CPU time would leave out nearly all of the work."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if available() and server is not None and hasattr(server, "_stop"):  # _stop: CPython's own, for its tests
        server._stop()


def _module_argv(args: list[str]) -> tuple[str, list[str]]:
    """`[-u] -m module rest...` -> (module, rest): the command lines the tests and torchrun build."""
    args = [a for a in args if a != "-u"]
    if len(args) < 2 or args[0] != "-m":
        raise ValueError(f"expected a command line `-m module ...`, got {args[:3]}")
    return args[1], args[2:]


def _run_module(args: list[str]) -> int:
    """Run `python -u <args>` in this process: the module as __main__, its exit status returned."""
    import torch

    module, rest = _module_argv(args)
    # What the interpreter reads at start-up but this already-started process cannot: the thread
    # count (torchrun and the tests set OMP_NUM_THREADS) and -u (unbuffered output, so nothing
    # printed before a crash is lost).
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.stdout.reconfigure(line_buffering=True, write_through=True)
    sys.stderr.reconfigure(line_buffering=True, write_through=True)
    sys.argv = [module, *rest]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0


def _torchrun_worker(*args: str) -> None:
    """The entrypoint torchrun's agent forks for each rank: `python -u -m module ...` in-process.
    A nonzero exit status ends the worker with that status, as the interpreter would."""
    code = _run_module(list(args))
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _forked_launch(config, entrypoint):
    """torch.distributed.run's `elastic_launch`, with workers forked from the agent (see module docstring)."""
    from torch.distributed.launcher.api import elastic_launch

    config.start_method = "fork"
    return elastic_launch(config=config, entrypoint=_torchrun_worker)


def _child(kind: str, args: list[str], env: dict, cwd: str, out: str | None, err: str | None) -> None:
    """In the forked child: the environment, the directory and fds 1, 2 of a subprocess; then run.
    `out`/`err` None: keep the parent's (a subprocess that does not capture its output)."""
    for fd, path in ((1, out), (2, err)):
        if path is not None:
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(target, fd)
            os.close(target)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    subprocess.run = _run_python_forked  # the command's own `python -m ...` children: forked too
    try:
        if kind == "python":
            code = _run_module(args)
        else:
            import torch.distributed.run as torchrun_cli

            torchrun_cli.elastic_launch = _forked_launch  # the one name its run() launches through
            sys.stdout.reconfigure(line_buffering=True, write_through=True)
            sys.argv = ["torchrun", *args]
            torchrun_cli.main(args)  # raises (exit status 1, as the command's) when a worker failed
            code = 0
    except BaseException:  # noqa: BLE001 - a crash of the child is reported as the interpreter would
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter finalization: see support/spawn.py on gloo's threads at exit


_real_run = subprocess.run


def _run_python_forked(cmd, *popenargs, **kwargs):
    """`subprocess.run` inside a forked child: a `python -m module ...` or `python -m torch.distributed.run
    ...` command (what experiments.compare and the bench parts launch) runs in a child forked from this
    already-loaded process; any other command, or one with options this does not model, as usual."""
    modelled = {"capture_output", "text", "env", "cwd", "timeout", "check"}
    if (
        popenargs
        or not kwargs.keys() <= modelled
        or not isinstance(cmd, (list, tuple))
        or len(cmd) < 3
        or cmd[0] != sys.executable
        or cmd[1:2] != ["-m"]
    ):
        return _real_run(cmd, *popenargs, **kwargs)
    cmd = list(cmd)
    kind, args = ("torchrun", cmd[3:]) if cmd[2] == "torch.distributed.run" else ("python", cmd[1:])
    env = dict(os.environ) if kwargs.get("env") is None else kwargs["env"]
    r = Forked(
        kind, args, env, kwargs.get("cwd") or os.getcwd(), capture=kwargs.get("capture_output", False), fork=True
    )
    r = r.wait(kwargs.get("timeout"))
    r.args = cmd
    if not kwargs.get("text"):
        r.stdout, r.stderr = (None if x is None else x.encode() for x in (r.stdout, r.stderr))
    if kwargs.get("check"):
        r.check_returncode()
    return r


class Forked:
    """One process started by `start` (forked from the server, or a plain subprocess where there is
    none), its stdout and stderr in files until `wait` reads them."""

    def __init__(self, kind: str, args: list[str], env: dict | None, cwd, capture: bool = True, fork: bool = False):
        """`capture`: stdout and stderr to files (else the parent's); `fork`: fork this process (a child
        that is itself forked from the server, single-threaded) rather than ask the server."""
        self.args = [kind, *args]
        self._tmp = tempfile.TemporaryDirectory(prefix="forked-")
        self._out, self._err = (os.path.join(self._tmp.name, n) if capture else None for n in ("stdout", "stderr"))
        env = {**os.environ, **(env or {})}
        if available():
            ctx = multiprocessing.get_context("fork") if fork else context()
            self._process = ctx.Process(target=_child, args=(kind, list(args), env, str(cwd), self._out, self._err))
            self._process.start()
            self.pid = self._process.pid
        else:  # the interpreter itself, as the command line says
            cmd = (
                [sys.executable, *args] if kind == "python" else [sys.executable, "-m", "torch.distributed.run", *args]
            )
            with contextlib.ExitStack() as files:
                out, err = (files.enter_context(open(p, "w")) if p else None for p in (self._out, self._err))
                self._process = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env)
            self.pid = self._process.pid

    def _returncode(self, timeout: float):
        if isinstance(self._process, subprocess.Popen):
            try:
                return self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        self._process.join(timeout)
        return self._process.exitcode

    def wait(self, timeout: float | None = TIMEOUT_S) -> subprocess.CompletedProcess:
        """The finished process as a CompletedProcess (text output).

        Raises:
            subprocess.TimeoutExpired: still running after `timeout` seconds; it is killed, with every
                process below it (a torchrun agent's workers), before this is raised.
        """
        try:
            try:
                code = self._returncode(timeout)
            except BaseException:  # pytest-timeout's alarm, ^C: nothing outlives the test
                _kill_tree(self.pid)
                raise
            if code is None:
                _kill_tree(self.pid)
                self._returncode(5)
                raise subprocess.TimeoutExpired(self.args, timeout, _read(self._out), _read(self._err))
            return subprocess.CompletedProcess(self.args, code, _read(self._out), _read(self._err))
        finally:
            self._tmp.cleanup()


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (torchrun's agent and its workers)."""
    children = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        pass
    for child in children:
        _kill_tree(child)
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def _read(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def python(args: list[str], env: dict | None = None, timeout: float = TIMEOUT_S, cwd=ROOT):
    """`python <args>` (`-m module ...`): a forked child runs the module as __main__ with `env` added to
    this process's environment; returns a CompletedProcess (args, returncode, stdout, stderr as text).

    Raises:
        subprocess.TimeoutExpired: still running after `timeout` seconds (then killed).
        ValueError: `args` is not of the form `-m module ...`.
    """
    _module_argv(args)
    return Forked("python", args, env, cwd).wait(timeout)


def torchrun(args: list[str], env: dict | None = None, timeout: float = TIMEOUT_S, cwd=ROOT):
    """`python -m torch.distributed.run <args>` (torchrun's own options, then `-m module ...`): torch's
    torchrun in a forked child, its workers forked from it; a CompletedProcess as `python` returns.

    Raises:
        subprocess.TimeoutExpired: still running after `timeout` seconds (then killed, workers too).
    """
    return start_torchrun(args, env, cwd).wait(timeout)


def start_torchrun(args: list[str], env: dict | None = None, cwd=ROOT) -> Forked:
    """`torchrun` started, not waited for (two agents as two machines): `.wait(timeout)` finishes it."""
    return Forked("torchrun", args, env, cwd)
