"""Run one gemb command as N JAX processes on this machine: a multi-host job in miniature.

    python -m gemb.local_processes --num_processes 2 --devices_per_process 4 -- \\
        train --gin_file=gin/runs/tiny_synthetic.gin --gin.MODEL_DIR="'/tmp/tiny_2p'"

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES and
its JAX_PROCESS_ID, exactly what a real launcher provides (gemb.distributed), plus
`devices_per_process` fake CPU devices and CPU collectives (gloo). The processes run the same
entry point users run (`python -m gemb.cli COMMAND ...`), so a job that works here runs its
multi-host code paths: per-process data shards, global arrays that no process holds whole,
process-0-only writes, barriers. This is what the multi-process tests use.

The processes share a process group of their own (GEMB_OWN_PROCESS_GROUP=1 tells them so): the
trainer's fault drill (GEMB_KILL_AFTER_STEP) kills the whole job at once through it, as a
preemption does, instead of each process dying alone while the others still talk to it.

When one process fails the others would wait for it in a collective forever, so they are
stopped after `grace_seconds`. Output: each process's lines, prefixed with [pN], as they come
(or kept per process for the caller).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

from gemb import paths


# Set in every process of a job run() starts: the job's processes, and nothing else, are one
# process group (gemb.train.run's fault drill kills that group).
OWN_PROCESS_GROUP_ENV = "GEMB_OWN_PROCESS_GROUP"


@dataclasses.dataclass
class ProcessResult:
    process_id: int
    returncode: int
    output: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, devices_per_process: int,
                base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment of process `process_id`: the launcher's variables and fake devices."""
    env = dict(os.environ if base is None else base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env.update({
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(num_processes),
        "JAX_PROCESS_ID": str(process_id),
        "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip(),
        "PYTHONPATH": os.pathsep.join(p for p in (str(paths.REPO_ROOT),
                                                  env.get("PYTHONPATH")) if p),
        "PYTHONUNBUFFERED": "1",
        OWN_PROCESS_GROUP_ENV: "1",
    })
    # A launcher this machine may itself run under must not be detected instead.
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_IP",
                 "JAX_LOCAL_DEVICE_IDS"):
        env.pop(name, None)
    return env


def run(command: Sequence[str], num_processes: int, devices_per_process: int = 4, *,
        env: Optional[Mapping[str, str]] = None, cwd: Optional[os.PathLike] = None,
        timeout: float = 1200, grace_seconds: float = 60, stream: bool = False,
        per_process_env: Optional[Sequence[Mapping[str, str]]] = None,
        python_args: Sequence[str] = ("-m", "gemb.cli")) -> list[ProcessResult]:
    """Runs `gemb COMMAND...` (`python PYTHON_ARGS COMMAND...`) as `num_processes` processes;
    returns each one's exit code and output (one stopped by the harness: returncode -9)."""
    port = free_port()
    logs = [tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
            for _ in range(num_processes)]
    procs = []
    for pid in range(num_processes):
        penv = process_env(pid, num_processes, port, devices_per_process, env)
        if per_process_env:
            penv.update(per_process_env[pid])
        procs.append(subprocess.Popen(
            [sys.executable, *python_args, *command], cwd=cwd or paths.REPO_ROOT,
            env=penv, stdout=subprocess.PIPE if stream else logs[pid],
            stderr=subprocess.STDOUT, text=True,
            process_group=procs[0].pid if procs else 0))  # a new group, led by process 0
    threads = []
    if stream:
        def pump(pid: int, proc: subprocess.Popen) -> None:
            for line in proc.stdout:
                logs[pid].write(line)
                sys.stdout.write(f"[p{pid}] {line}")
                sys.stdout.flush()

        threads = [threading.Thread(target=pump, args=(pid, proc), daemon=True)
                   for pid, proc in enumerate(procs)]
        for thread in threads:
            thread.start()
    deadline = time.monotonic() + timeout
    first_failure = None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed and first_failure is None:
                first_failure = now
            if now > deadline or (first_failure is not None
                                  and now - first_failure > grace_seconds):
                break
            time.sleep(0.2)
    finally:  # also on Ctrl-C: in a group of their own, the processes do not receive it
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p in procs:
        p.wait()
    for thread in threads:
        thread.join(timeout=10)
    results = []
    for pid, (proc, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        results.append(ProcessResult(pid, proc.returncode, log.read()))
        log.close()
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gemb.local_processes",
        description="Run a gemb command as N local JAX processes (CPU devices, gloo).")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=24 * 3600)
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: the gemb command and its flags (train ..., eval ...)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the gemb command after --, e.g. -- train --gin_file=...")
    results = run(command, args.num_processes, args.devices_per_process,
                  timeout=args.timeout, stream=True, cwd=Path.cwd())
    codes = [r.returncode for r in results]
    print(f"exit codes by process: {codes}", flush=True)
    return next((c for c in codes if c != 0), 0) if all(c >= 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
