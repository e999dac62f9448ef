"""Distributed training on ``torch.distributed``: who this process is (``discover``), the process group (``setup`` /
``teardown`` / ``session``), the few collectives the trainer needs, SyncBatchNorm and rank-aware samplers.

``discover``, first match wins: ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ...); ``slurm`` (a task of
an ``srun`` step of more than one task: ``SLURM_PROCID``, ``SLURM_LOCALID``, the step's task count and node list;
master = first host of the node list, port = ``MASTER_PORT`` else ``10000 + SLURM_JOB_ID % 20000``); ``single``
(anything else). A world of one process creates no process group: ``setup`` only picks the device and every
collective helper is a no-op.

Failure on one rank ends every rank non-zero, without a hang: the failing rank's exception propagates out of
``session`` (which destroys the group and re-raises); its peers are stopped by torchrun's agent, by gloo noticing
the closed sockets, or at the latest by the process-group timeout (``timeout_s``). ``session`` turns such a
collective error into ``RankFailure``, a one-paragraph message naming another rank's failure. See
docs/scaling-out.md.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

__all__ = [
    "DistEnv", "DistributedError", "RankFailure", "SyncBatchNormError", "discover", "expand_nodelist",
    "slurm_master_port", "setup", "teardown", "session", "is_initialized", "is_main", "rank", "world_size",
    "broadcast_object", "all_gather_object", "main_then_broadcast", "all_reduce_sum_", "broadcast_buffers_", "barrier", "sync_batchnorm",
    "wrap_ddp", "unwrap", "ShardedEvalSampler", "shard_eval_sampler", "local_device", "any_rank",
    "expand_tasks_per_node", "describe", "hydra_overrides",
]

log = logging.getLogger("train_seg")

SOURCES = ("single", "torchrun", "slurm")
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; rank 0 computing class statistics must fit in it
T = TypeVar("T")


class DistributedError(ValueError):
    """A distributed environment that cannot work (malformed launcher variables, a missing GPU for a local
    rank); the message names the variable and the fix."""


class SyncBatchNormError(DistributedError):
    """``model.sync_batchnorm=true`` asked for on a device without a SyncBatchNorm kernel (CPU)."""


class RankFailure(RuntimeError):
    """This rank stopped because another rank failed, was killed, or did not reach the same collective within
    the process-group timeout. Its own traceback is in the failing rank's log."""


# -- who am I ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job. ``single`` is rank 0 of a world of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    source: str = "single"

    def __post_init__(self):
        if self.source not in SOURCES:
            raise DistributedError(f"DistEnv.source={self.source!r} is not one of {SOURCES}.")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise DistributedError(
                f"rank {self.rank} of world size {self.world_size} (from {self.source}) is impossible: the rank must "
                "be in 0 .. world size - 1. Check the launcher's variables (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS).")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise DistributedError(
                f"local rank {self.local_rank} of {self.local_world_size} processes on this node (from {self.source}) "
                "is impossible. Check LOCAL_RANK/LOCAL_WORLD_SIZE or SLURM_LOCALID/SLURM_NTASKS_PER_NODE.")

    @property
    def distributed(self) -> bool:
        """More than one process: a process group is needed."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None or value == "":
        if default is None:
            raise DistributedError(f"the environment variable {name} is required here but not set.")
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"the environment variable {name}={value!r} is not an integer.") from None


def discover(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """This process's ``DistEnv`` from the launcher's environment variables (see the module docstring)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world, rank_ = _int(environ, "WORLD_SIZE"), _int(environ, "RANK")
        addr, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
        if world > 1 and not (addr and port):
            raise DistributedError(
                f"RANK and WORLD_SIZE={world} are set but MASTER_ADDR/MASTER_PORT are not: start the processes with "
                "torchrun (which sets all of them), or set MASTER_ADDR and MASTER_PORT yourself.")
        return DistEnv(rank=rank_, local_rank=_int(environ, "LOCAL_RANK", 0), world_size=world,
                       local_world_size=_int(environ, "LOCAL_WORLD_SIZE", world),
                       master_addr=addr or None, master_port=int(port) if port else None, source="torchrun")
    if "SLURM_PROCID" in environ:
        # srun sets SLURM_STEP_NUM_TASKS for its step; SLURM_NTASKS is the allocation's (also visible in the batch
        # script itself, where only one process runs: start the training with srun, as the presets do).
        world = _int(environ, "SLURM_STEP_NUM_TASKS", _int(environ, "SLURM_NTASKS", 1))
        if world > 1:
            return _slurm_env(environ, world)
    return DistEnv()


def _slurm_env(environ: Mapping[str, str], world: int) -> DistEnv:
    nodelist_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if environ.get(v)), None)
    if nodelist_var is None:
        raise DistributedError(
            f"a SLURM step of {world} tasks but no SLURM_STEP_NODELIST, SLURM_JOB_NODELIST or SLURM_NODELIST to find "
            "the master node in: set MASTER_ADDR and MASTER_PORT and start the processes with torchrun instead.")
    hosts = expand_nodelist(environ[nodelist_var], nodelist_var)
    # tasks on this node: the step's own count first (a step may be smaller than the allocation)
    per_node_var = next((v for v in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
                         if environ.get(v)), None)
    per_node = expand_tasks_per_node(environ[per_node_var], per_node_var) if per_node_var else [world]
    node = _int(environ, "SLURM_NODEID", 0)
    local_world = per_node[node] if node < len(per_node) else per_node[-1]
    port = environ.get("MASTER_PORT")
    return DistEnv(rank=_int(environ, "SLURM_PROCID"), local_rank=_int(environ, "SLURM_LOCALID", 0), world_size=world,
                   local_world_size=local_world, master_addr=environ.get("MASTER_ADDR") or hosts[0],
                   master_port=int(port) if port else slurm_master_port(_int(environ, "SLURM_JOB_ID", 0)),
                   source="slurm")


def slurm_master_port(job_id: int) -> int:
    """A port every task of a job derives alike: ``10000 + job_id % 20000`` (set MASTER_PORT to choose your own)."""
    return 10000 + int(job_id) % 20000


_GROUP = re.compile(r"\[([^\[\]]*)\]")


def expand_nodelist(nodelist: str, variable: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expands SLURM's compressed host list, in order: ``"gpu[01-03,07],cpu5"`` -> gpu01 gpu02 gpu03 gpu07 cpu5;
    ``"a-[1-2]-b"`` -> a-1-b a-2-b; several bracket groups in one name expand as their product
    (``"r[1-2]n[1-2]"`` -> r1n1 r1n2 r2n1 r2n2). Ranges keep the zero padding of their lower bound (``[08-10]``)."""
    hosts = []
    for name in _split_top_level(nodelist.strip(), variable):
        names, pos = [""], 0
        for match in [*_GROUP.finditer(name), None]:
            literal = name[pos:] if match is None else name[pos:match.start()]
            if "[" in literal or "]" in literal:
                raise DistributedError(f"{variable}={nodelist!r}: nested or unbalanced brackets in {name!r}.")
            alternatives = [""] if match is None else _expand_ranges(match.group(1), nodelist, variable)
            names = [prefix + literal + alt for prefix in names for alt in alternatives]
            pos = len(name) if match is None else match.end()
        hosts.extend(names)
    if not hosts or any(not h for h in hosts):
        raise DistributedError(f"{variable}={nodelist!r} names no host (or an empty one).")
    return hosts


def _split_top_level(text: str, variable: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise DistributedError(f"{variable}={text!r}: a ']' without its '['.")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise DistributedError(f"{variable}={text!r}: a '[' without its ']'.")
    items.append(text[start:])
    return [item for item in items if item]


def _expand_ranges(spec: str, nodelist: str, variable: str) -> list[str]:
    out = []
    for part in spec.split(","):
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise DistributedError(f"{variable}={nodelist!r}: [{spec}] is not a list of numbers and ranges like 01-03,07.")
        if not sep:
            out.append(low)
            continue
        if int(high) < int(low):
            raise DistributedError(f"{variable}={nodelist!r}: the range {part} runs backwards.")
        out.extend(f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1))
    return out


def expand_tasks_per_node(spec: str, variable: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """SLURM's ``"2(x3),1"`` -> [2, 2, 2, 1]: tasks on each node of the allocation, in node order."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise DistributedError(f"{variable}={spec!r} is not of the form 4 or 2(x3),1.")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def hydra_overrides(env: DistEnv) -> list[str]:
    """Hydra overrides for a rank other than 0, to append to ``sys.argv`` before Hydra starts (torchrun starts every
    rank as its own ``python -m train_seg``): that rank writes no ``.hydra/`` and no log file, and creates no run
    directory of its own (``${now:...}`` may tick between two ranks' starts); it logs to its console only. Rank 0
    broadcasts its run directory to the others once the process group exists. Rank 0 (and one process) gets []."""
    if env.rank == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=."]


# -- the process group -----------------------------------------------------------------------------------------
def setup(env: DistEnv, device_type: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Picks this rank's device and, for a world of more than one process, joins the process group: NCCL on
    CUDA (device ``cuda:<local_rank>``, made current), gloo on CPU, ``init_method="env://"`` (the variables are
    exported from ``env``, which is what a SLURM task lacks) and ``timeout=timeout_s`` for the rendezvous and every
    collective. Returns the device."""
    device = _device_for(env, torch.device(device_type).type)
    if not env.distributed:
        return device
    if dist.is_initialized():
        raise DistributedError("the process group is already initialised: call teardown() first.")
    os.environ.update({"MASTER_ADDR": str(env.master_addr or "127.0.0.1"), "MASTER_PORT": str(env.master_port or 29500),
                       "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
                       "LOCAL_WORLD_SIZE": str(env.local_world_size)})
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=float(timeout_s))
    try:
        store = _attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    except (dist.DistError, RuntimeError) as exc:
        raise RankFailure(
            f"rank {env.rank} of {env.world_size} ({env.source}) could not join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g} s: not every rank started, "
            "or that address is not reachable from here. Check that all processes were launched (torchrun "
            "--nnodes/--nproc_per_node, or srun with one task per GPU) and that MASTER_ADDR/MASTER_PORT are the same "
            f"on every rank. ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    log.debug("rank %d/%d joined the %s process group (%s)", env.rank, env.world_size, backend, env.source)
    return device


def _attempt_store(timeout: datetime.timedelta):
    """Under torchrun, whose agent's store outlives its workers: that store with a key prefix of this attempt
    (``TORCHELASTIC_RESTART_COUNT``). A restarted worker group would otherwise read the killed attempt's addresses
    (gloo: "Connection refused" on a restart). None elsewhere (``env://`` starts a new store on rank 0)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"train_seg/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _device_for(env: DistEnv, device_type: str) -> torch.device:
    if device_type != "cuda":
        return torch.device(device_type)
    count = torch.cuda.device_count()
    if count == 1:  # SLURM's GPU binding (--gpus-per-task, gres) may show each task only its own GPU
        index = 0
    elif env.local_rank < count:
        index = env.local_rank
    else:
        raise DistributedError(
            f"local rank {env.local_rank} needs its own GPU but this process sees {count}: start at most one process "
            "per GPU (torchrun --nproc_per_node=<GPUs>, or the SLURM presets' tasks_per_node = gpus_per_node).")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def teardown() -> None:
    """Destroys the process group if there is one; safe to call twice, and never raises (it runs on error paths)."""
    if is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to close cleanly
            log.debug("destroy_process_group failed", exc_info=True)


@contextmanager
def session(env: DistEnv, device_type: str | torch.device = "cpu",
            timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[torch.device]:
    """``setup`` ... ``teardown`` on every exit path (after a closing barrier when the body returns). A collective
    that fails because a peer died or timed out comes out as ``RankFailure`` (chained to the backend's error); any
    other exception comes out unchanged."""
    device = setup(env, device_type, timeout_s)
    try:
        yield device
        barrier()  # no rank destroys the group while a peer is still inside a collective
    except (dist.DistError, RuntimeError) as exc:
        if env.distributed and _is_collective_failure(exc):
            peer = f"rank {1 - env.rank}" if env.world_size == 2 else "another rank"
            raise RankFailure(
                f"rank {env.rank} of {env.world_size} stopped: a collective operation failed because {peer} crashed, "
                f"was killed, or did not reach the same point within the timeout ({timeout_s:g} s). This rank "
                "has written nothing more; the failing rank's own error is in its log (torchrun prints it as the root "
                f"cause). ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        raise
    finally:
        teardown()


def _is_collective_failure(exc: BaseException) -> bool:
    if isinstance(exc, RankFailure):
        return False
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()  # gloo raises plain RuntimeErrors: "[.../gloo/...] Connection closed by peer", "Timed out"
    return any(s in text for s in ("gloo", "nccl", "c10d", "connection closed by peer", "connection reset by peer"))


# -- collectives (no-ops in one process) ---------------------------------------------------------------------------
def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (pickled; for small things: class statistics, a run directory)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (pickled), in rank order, on every rank; ``[obj]`` in one process."""
    if not is_initialized():
        return [obj]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def main_then_broadcast(fn: Callable[[], T]) -> T:
    """Runs ``fn`` on rank 0 only and returns its result on every rank; if it raises on rank 0, every rank raises
    (the same exception when it pickles, else a ``RankFailure`` with its message), so a bad dataset found while
    rank 0 computes the class statistics stops every rank with the same error instead of leaving them waiting."""
    if not is_initialized():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    error: BaseException | None = None
    if rank() == 0:
        try:
            outcome = (True, fn())
        except Exception as exc:
            error = exc
            try:
                pickle.dumps(exc)
                outcome = (False, exc)
            except Exception:  # an exception that does not pickle still stops the others, with its message
                outcome = (False, RankFailure(f"rank 0 failed: {type(exc).__name__}: {exc}"))
    ok, value = broadcast_object(outcome)
    if ok:
        return value
    if error is not None:
        raise error
    raise value.with_traceback(None)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over all ranks in place and returns it; a CPU tensor under NCCL (which reduces CUDA tensors
    only) goes through the rank's GPU and back."""
    if is_initialized():
        if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
            staged = tensor.cuda()
            dist.all_reduce(staged, op=dist.ReduceOp.SUM)
            tensor.copy_(staged.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers_(model: nn.Module, src: int = 0) -> nn.Module:
    """Copies rank ``src``'s buffers (BatchNorm running statistics) into every rank's ``model`` in place and
    returns it; a no-op without a process group. DDP broadcasts buffers only at the start of a training forward,
    so after the last step each rank holds the statistics of its own batch; evaluating each share with rank 0's
    (the checkpoint's) makes the reduced metrics those of the saved model."""
    if is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=src)
    return model


def barrier() -> None:
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


# -- the model -------------------------------------------------------------------------------------------------
def sync_batchnorm(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` with every BatchNorm replaced by SyncBatchNorm (statistics over the global batch) on CUDA; call
    it before ``wrap_ddp``. On any other device it raises ``SyncBatchNormError``."""
    device = torch.device(device)
    if device.type != "cuda":
        raise SyncBatchNormError(
            f"model.sync_batchnorm=true needs CUDA, but this run trains on {device.type}: SyncBatchNorm has no CPU "
            "kernel. Set model.sync_batchnorm=false on CPU; each process then normalises with plain BatchNorm over its "
            "own batch (trainer.batch_size per process), and DDP keeps the running statistics of rank 0.")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` (one device per process: ``device_ids=[cuda index]`` on CUDA, none on
    CPU) when a process group exists; the model itself otherwise."""
    if not is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (its ``state_dict`` has no ``module.`` prefix: checkpoints are the same either way)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


# -- samplers ----------------------------------------------------------------------------------------------------
# The training order of every rank is train_seg.data.order.EpochOrder (rank, world_size): one owner for the
# epoch's list, its position on resume and the per-sample augmentation seeds. Evaluation shards here.
class ShardedEvalSampler(Sampler[int]):
    """Evaluation share of a rank: ``rank, rank + W, ...`` in order, no padding and no drop, so the shares are
    disjoint and cover every image exactly once (ranks may differ by one image). The confusion matrices then sum
    (``ConfusionMatrix.reduce``) to exactly the single-process one. Evaluate the unwrapped model (``unwrap``): no
    collective may run per batch when ranks have different numbers of batches."""

    def __init__(self, dataset_len: int, num_replicas: int, rank: int):
        super().__init__()
        self.indices = list(range(int(rank), int(dataset_len), int(num_replicas)))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if is_initialized() else 1


def eval_sampler(dataset_len: int) -> Sampler[int] | None:
    """This process's evaluation share in the current process group (None without one)."""
    if not is_initialized() or world_size() == 1:
        return None
    return ShardedEvalSampler(dataset_len, world_size(), rank())


def shard_eval_sampler(dataset_len: int, env: DistEnv) -> Sampler[int] | None:
    """None in one process (the DataLoader keeps its sequential order), else ``ShardedEvalSampler``."""
    return ShardedEvalSampler(dataset_len, env.world_size, env.rank) if env.distributed else None


def local_device(device: torch.device) -> torch.device:
    """This rank's device for a configured ``device``: ``cuda:<LOCAL_RANK>``-style (as ``setup`` chose it) when a
    process group on CUDA exists, else ``device`` unchanged."""
    if is_initialized() and device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (one small all-reduce; e.g. a stop signal seen by one rank)."""
    if not is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0],
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def describe(env: DistEnv) -> str:
    """One line for the log: ``rank 1/4 (local 1/2, torchrun, master node1:29500)``."""
    return (f"rank {env.rank}/{env.world_size} (local {env.local_rank}/{env.local_world_size}, {env.source}"
            + (f", master {env.master_addr}:{env.master_port})" if env.distributed else ")"))
