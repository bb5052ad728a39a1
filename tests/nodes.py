"""Several nodes in miniature: `torchrun --nnodes N --nproc_per_node 1` once per node rank, all
on this machine, meeting at a static rendezvous on 127.0.0.1 (as a cluster's launcher starts
one torchrun per node with the same master address). Each process sees RANK = its node rank
and LOCAL_RANK 0, as on nodes with one GPU each."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Bitwise comparisons between processes need one thread.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class NodeResult:
    node_rank: int
    returncode: int
    stderr: str


def torchrun_nodes(
    arguments: list[str], port: int, nodes: int = 2, timeout: float = 600
) -> list[NodeResult]:
    """Run `torchrun ... ARGUMENTS` (e.g. `-m samkd extract --config c.yaml`) as `nodes` node
    ranks of one job; each node's exit status and stderr, node 0 first."""
    commands = [
        [
            sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
            "--nproc_per_node=1", f"--node_rank={rank}", "--master_addr=127.0.0.1",
            f"--master_port={port}", *arguments,
        ]
        for rank in range(nodes)
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        logs = [Path(folder) / f"node{rank}.log" for rank in range(nodes)]
        processes = []
        for command, log in zip(commands, logs, strict=True):
            with open(log, "w") as stream:
                processes.append(
                    subprocess.Popen(
                        command, stdout=subprocess.DEVNULL, stderr=stream, env=ONE_THREAD
                    )
                )
        try:
            codes = [process.wait(timeout=timeout) for process in processes]
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return [
            NodeResult(rank, code, log.read_text())
            for rank, (code, log) in enumerate(zip(codes, logs, strict=True))
        ]
