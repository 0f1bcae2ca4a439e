"""Run one command as N JAX processes on this machine: `python tools/launch_local.py --processes 2
--devices-per-process 4 -- tools/train.py --config configs/recipes/tiny.yaml mesh.data=2 mesh.fsdp=2 mesh.sequence=2`.

Each process gets JAX_COORDINATOR_ADDRESS (a free local port), JAX_NUM_PROCESSES and JAX_PROCESS_ID, which
contentv_jax.multihost.initialize turns into jax.distributed.initialize; with --devices-per-process each is a CPU
process with that many simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count, gloo collectives), the
way to try a multi-host layout on one machine. Output lines are prefixed with the process index. When a process
fails, the others are stopped and its exit status is returned; --timeout stops all (status 124). On a real cluster
use its launcher instead (README: "Several hosts").
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, count: int, port: int, devices: int | None) -> dict[str, str]:
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count))
    env["JAX_PROCESS_ID"] = str(index)
    if devices is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
        env["JAX_PLATFORMS"] = "cpu"
        env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    return env


def _relay(stream: IO[bytes], prefix: bytes, out: IO[bytes]) -> None:
    for line in iter(stream.readline, b""):
        out.write(prefix + line)
        out.flush()


def stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM every process group still running, SIGKILL what is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)


def launch(command: list[str], processes: int, devices: int | None = None, timeout_s: float | None = None) -> int:
    """Run `command` as `processes` JAX processes; 0 when all succeed, else the first failure's status."""
    if command and command[0].endswith(".py"):
        command = [sys.executable, *command]
    port = free_port()
    procs = [
        subprocess.Popen(
            command,
            env=process_env(i, processes, port, devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches its children too
        )
        for i in range(processes)
    ]
    relays = [
        threading.Thread(target=_relay, args=(p.stdout, f"[{i}] ".encode(), sys.stdout.buffer), daemon=True)
        for i, p in enumerate(procs)
    ]
    for t in relays:
        t.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                status = failed[0].returncode
                print(f"launch_local: process {procs.index(failed[0])} exited with {status}; stopping the others")
                break
            if deadline is not None and time.monotonic() > deadline:
                status = 124
                print(f"launch_local: timeout after {timeout_s} s; stopping all processes")
                break
            time.sleep(0.2)
        else:
            status = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        stop(procs)
        for t in relays:
            t.join(timeout=5)
    return status if status >= 0 else 128 - status  # killed by signal N: 128 + N, as a shell reports it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=None, help="simulated CPU devices per process")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before every process is stopped")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command (a .py runs with this Python)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if args.processes < 1 or (args.devices_per_process is not None and args.devices_per_process < 1):
        parser.error("--processes and --devices-per-process must be at least 1")
    return launch(command, args.processes, args.devices_per_process, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
