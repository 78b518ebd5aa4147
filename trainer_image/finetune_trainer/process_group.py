"""Who this process is in the gang, and the few collectives the trainer itself needs.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and GROUP_RANK (the node rank). Run
without torchrun, the trainer is a world of one, which is how its single-process tests start it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        return self.local_rank == 0


def free_port() -> int:
    """A TCP port nothing listens on right now (also used by the tests and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def from_env() -> Ranks:
    env = os.environ
    if "RANK" not in env:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", GROUP_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    keep_pod_node_rank(env)
    return Ranks(
        rank=int(env["RANK"]),
        local_rank=int(env["LOCAL_RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
        node_rank=int(env.get("GROUP_RANK", "0")),
    )


def keep_pod_node_rank(env: os._Environ[str] | dict[str, str]) -> None:
    """Make the pod's node rank (NODE_RANK, from the pod contract) this process's node rank. torchrun's
    c10d rendezvous numbers the nodes by sorting their host names, so pod rank 1 may join as group
    rank 0; but which node holds which shards on its scratch disk, and which pod's log the operator
    reads progress from, follow the pod. Every node renumbers the same way, so the ranks stay a
    permutation of the world and the process group (on torchrun's agent store) forms as before."""
    pod_node = env.get("NODE_RANK")
    if pod_node is None or env.get("GROUP_RANK") in (None, pod_node):
        return
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
    env["RANK"] = str(int(pod_node) * local_world + int(env["LOCAL_RANK"]))
    env["GROUP_RANK"] = pod_node


def all_gather(value: Any) -> list[Any]:
    """Every rank's value, in rank order (small picklable objects only)."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().device_name() == "cpu")


def init(ranks: Ranks, collective_timeout: timedelta) -> Any:
    """Start the process group (gloo on CPU, NCCL on GPUs) and return this rank's device.

    `collective_timeout` bounds every collective (runPolicy.collectiveTimeoutSeconds): a training
    step's all-reduce takes seconds, so a peer that hangs ends the run soon after. Work that grows
    with model or data size is never awaited in a collective (coordination.py)."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    backend = "gloo" if on_cpu() else accelerator.communication_backend_name()
    bound_every_group(collective_timeout)
    store = round_store(ranks, collective_timeout)
    if store is not None:
        import torch.distributed as dist

        dist.init_process_group(
            backend, store=store, rank=ranks.rank, world_size=ranks.world_size, timeout=collective_timeout
        )
    deepspeed.init_distributed(dist_backend=backend, timeout=collective_timeout)  # adopts a formed group
    if on_cpu():
        return torch.device("cpu")
    accelerator.set_device(ranks.local_rank)
    return torch.device(accelerator.device_name(ranks.local_rank))


def round_store(ranks: Ranks, timeout: timedelta) -> Any:
    """The rendezvous store of this round of the worker group, when torchrun's agent hosts it.

    The agent's store outlives an in-place restart (one server per launcher, shared by every round),
    and torch's env:// rendezvous no longer prefixes its keys by restart: the restarted ranks would
    read the previous round's keys (a dead rank's address, a long phase already "done") and never
    meet. A prefix per round (TORCHELASTIC_RESTART_COUNT, the same on every node: gang_agent.py)
    keeps each round's keys its own. None outside torchrun's agent store: env:// as before."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed import PrefixStore, TCPStore

    server = TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), ranks.world_size, is_master=False, timeout=timeout
    )
    return PrefixStore(f"/ftjob/round_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", server)


def bound_every_group(timeout: timedelta) -> None:
    """Make `timeout` the default of every process group created from now on, not only the default
    group's. DeepSpeed creates its own groups (ZeRO's data-parallel group reduces the gradients)
    with `torch.distributed.new_group(ranks)`, which takes its timeout from the module's default
    (`distributed_c10d._get_default_timeout`: 30 minutes on gloo, 10 on NCCL), not from the one
    `init_process_group` was given; a hung peer would then hold the gang for that long."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout  # type: ignore[attr-defined]
    distributed_c10d.default_pg_nccl_timeout = timeout  # type: ignore[attr-defined]


def default_store() -> Any:
    """The key-value store of the gang's rendezvous (torchrun's TCPStore), shared by every rank."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (small picklable objects only)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(values: list[float], op: str, device: Any) -> list[float]:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return [float(v) for v in tensor.tolist()]


def all_reduce_started(
    values: list[float], op: str, device: Any, timeout: timedelta
) -> Callable[[], list[float]]:
    """Start an all-reduce that runs while this rank goes on; call the result to wait for it. The
    wait has the collective timeout of its own: gloo does not end an async op a peer never joins."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    work = dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], async_op=True)

    def result() -> list[float]:
        if not work.wait(timeout):
            raise RuntimeError(f"collective timed out after {timeout.total_seconds():.0f}s")
        return [float(v) for v in tensor.tolist()]

    return result


def shutdown() -> None:
    """Tear the process group down once this rank's collectives are done: a rank that leaves it to
    interpreter exit can die in the backend's teardown (SIGABRT) after it trained to the end, and
    the operator would read a finished rank as a failed one. No barrier first: no rank runs a
    collective after the export, and one here would turn a peer lost after a finished run into a
    failed rank."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()
