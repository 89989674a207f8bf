"""Process groups from torchrun's or SLURM's variables; rank helpers; clear collective errors.

Launchers, in order of precedence:
- torchrun (or torch.distributed.launch): RANK, WORLD_SIZE, LOCAL_RANK (or --local-rank), MASTER_ADDR, MASTER_PORT;
- srun, one task per GPU (inside a job step): SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS),
  the first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) as the master, and a master port derived from
  SLURM_JOB_ID so that jobs sharing a node do not clash (MASTER_ADDR / MASTER_PORT, when set, take precedence);
- none: one process, no process group.
A batch script that runs python without srun is one process even though SLURM_NTASKS may say more.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 600.0
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000  # below Linux's ephemeral range (32768+)


class DistConfigError(ValueError):
    """The launcher's environment is incomplete or inconsistent; the message names the variables."""


class DistributedError(RuntimeError):
    """Joining the process group or a collective operation failed; the message says what to check."""


@dataclass(frozen=True)
class DistEnv:
    """What the launcher told this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = ""
    master_port: int = 0
    launcher: str = "none"  # none | torchrun | slurm


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_s: float = DEFAULT_TIMEOUT_S
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# ----------------------------------------------------------------------------------------------- environment


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistConfigError(f"{name}={env[name]!r} is not an integer") from None


def _require(env: Mapping[str, str], names: list[str], launcher: str, present: list[str]) -> None:
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise DistConfigError(
            f"incomplete {launcher} environment: {', '.join(present)} set but {', '.join(missing)} missing; "
            f"launch with {'torchrun' if launcher == 'torchrun' else 'srun (one task per GPU)'}, or unset "
            f"{', '.join(present)} to run a single process"
        )


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list, e.g. 'gpu[01-03,07],login1' -> gpu01 gpu02 gpu03 gpu07 login1.

    Zero padding follows the lower bound ('[8-10]' -> 8, 9, 10; '[08-10]' -> 08, 09, 10); several bracket
    groups in one name expand to their product ('r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip(), nodelist):
        hosts += _expand_host(item, nodelist)
    return hosts


def _split_top_level(text: str, whole: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise DistConfigError(f"node list {whole!r}: nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DistConfigError(f"node list {whole!r}: ']' without '['")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise DistConfigError(f"node list {whole!r}: unclosed '['")
    items.append(text[start:])
    if any(not s for s in items):
        raise DistConfigError(f"node list {whole!r}: empty host name")
    return items


def _expand_host(name: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if m is None:
        return [name]
    head, tail = name[: m.start()], name[m.end():]
    values = []
    for part in m.group(1).split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values.append(bounds[0])
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            values += [str(v).zfill(width) for v in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise DistConfigError(f"node list {whole!r}: bad range {part!r}")
    return [head + v + rest for v in values for rest in _expand_host(tail, whole)]


def slurm_hostnames(nodelist: str) -> list[str]:
    """SLURM's own expansion (`scontrol show hostnames`) when available, else `expand_nodelist`."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=20, check=True).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)


def master_port_for_job(job_id: str | int) -> int:
    """A port in [20000, 30000) from the job id: two jobs sharing a node use different ports."""
    digits = re.sub(r"\D", "", str(job_id))
    if not digits:
        raise DistConfigError(f"SLURM_JOB_ID={job_id!r} holds no number")
    return SLURM_PORT_BASE + int(digits) % SLURM_PORT_SPAN


def read_env(environ: Mapping[str, str] | None = None, local_rank: int | None = None) -> DistEnv:
    """The launcher's variables as a DistEnv; DistConfigError names what is missing or wrong.

    `local_rank` is the value of a --local-rank/--local_rank argument (torch.distributed.launch passes it
    instead of LOCAL_RANK).
    """
    env = os.environ if environ is None else environ
    present = [n for n in TORCHRUN_VARS if env.get(n)]
    if present:
        return _torchrun_env(env, present, local_rank)
    if env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID"):
        return _slurm_env(env)
    return DistEnv(local_rank=local_rank or 0)


def _torchrun_env(env: Mapping[str, str], present: list[str], local_rank: int | None) -> DistEnv:
    required = ["RANK", "WORLD_SIZE"] + (["LOCAL_RANK"] if local_rank is None else [])
    _require(env, required, "torchrun", present)
    world, rank = _int_var(env, "WORLD_SIZE"), _int_var(env, "RANK")
    local = _int_var(env, "LOCAL_RANK") if env.get("LOCAL_RANK") else int(local_rank or 0)
    _check_ranks(world, rank, local, "WORLD_SIZE", "RANK", "LOCAL_RANK")
    if world == 1:
        return DistEnv(rank, 1, local, launcher="torchrun")
    _require(env, ["MASTER_ADDR", "MASTER_PORT"], "torchrun", present)
    port = _int_var(env, "MASTER_PORT")
    return DistEnv(rank, world, local, env["MASTER_ADDR"], port, "torchrun")


def _slurm_env(env: Mapping[str, str]) -> DistEnv:
    present = [n for n in ("SLURM_STEP_ID", "SLURM_STEPID") if env.get(n)]
    ntasks = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    nodes = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    _require(env, ["SLURM_PROCID", "SLURM_LOCALID", ntasks, nodes, "SLURM_JOB_ID"], "SLURM", present)
    world, rank, local = _int_var(env, ntasks), _int_var(env, "SLURM_PROCID"), _int_var(env, "SLURM_LOCALID")
    _check_ranks(world, rank, local, ntasks, "SLURM_PROCID", "SLURM_LOCALID")
    if world == 1:
        return DistEnv(rank, 1, local, launcher="slurm")
    addr = env.get("MASTER_ADDR") or slurm_hostnames(env[nodes])[0]
    port = _int_var(env, "MASTER_PORT") if env.get("MASTER_PORT") else master_port_for_job(env["SLURM_JOB_ID"])
    return DistEnv(rank, world, local, addr, port, "slurm")


def _check_ranks(world: int, rank: int, local: int, w: str, r: str, lr: str) -> None:
    if world < 1:
        raise DistConfigError(f"{w}={world} must be at least 1")
    if not 0 <= rank < world:
        raise DistConfigError(f"{r}={rank} is outside [0, {w}={world})")
    if local < 0:
        raise DistConfigError(f"{lr}={local} must not be negative")


# ----------------------------------------------------------------------------------------------- process group


def init_distributed(device: str = "auto", timeout: float | None = None, local_rank: int | None = None,
                     environ: Mapping[str, str] | None = None) -> DistInfo:
    """Join the process group the launcher describes (NCCL on GPUs, gloo on CPU); one process joins none.

    `timeout` (seconds) bounds the rendezvous and every later collective, so that a dead or hung rank stops the
    others with an error instead of a hang.
    """
    env = read_env(environ, local_rank)
    timeout = float(timeout or DEFAULT_TIMEOUT_S)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    backend = choose_backend(use_cuda, os.environ if environ is None else environ)
    dev = torch.device("cpu")
    if use_cuda:
        dev = torch.device("cuda", cuda_index(env.local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    info = DistInfo(env.rank, env.world_size, env.local_rank, dev, timeout, env.launcher)
    if env.world_size == 1 or dist.is_initialized():
        return info
    try:
        socket.getaddrinfo(env.master_addr, env.master_port)
    except socket.gaierror as e:
        raise DistributedError(f"rank {env.rank}: cannot resolve the master address {env.master_addr!r} "
                               f"({_master_source(env)}): {e}") from e
    host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
    delta = datetime.timedelta(seconds=timeout)
    try:
        # The rendezvous that init_process_group would make, done first so that the ranks can compare their GPUs
        # over its store before NCCL sees two of them on one device.
        store, _, _ = next(dist.rendezvous(f"tcp://{host}:{env.master_port}", env.rank, env.world_size,
                                           timeout=delta))
        store.set_timeout(delta)
        if backend == "nccl":  # gloo may put several ranks on one GPU (scripts/gpu_check.sh does)
            shared = shared_devices(exchange(store, env.rank, env.world_size, device_key(dev)))
            if shared:
                raise DistConfigError(shared)
        # device_id: NCCL binds its communicator to this GPU now instead of guessing it at the first collective.
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=delta,
                                device_id=dev if backend == "nccl" else None)
    except DistConfigError:
        raise
    except (RuntimeError, ValueError) as e:
        who = ("the other processes did not all join" if env.rank == 0
               else "could not join the process group")
        raise DistributedError(
            f"rank {env.rank}/{env.world_size}: {who} at {env.master_addr}:{env.master_port} within {timeout:.0f} s "
            f"({_master_source(env)}): {_first_line(e)}\nCheck that every rank was started, that rank 0's host "
            f"{env.master_addr} is reachable from this node and that port {env.master_port} is free there "
            f"(set MASTER_PORT to use another)."
        ) from e
    return info


BACKEND_VARIABLE = "HMSA_DIST_BACKEND"  # gloo on GPUs: several ranks on one device, which NCCL refuses


def choose_backend(use_cuda: bool, environ: Mapping[str, str]) -> str:
    """NCCL on GPUs, gloo on the CPU; $HMSA_DIST_BACKEND=gloo runs GPU ranks over gloo (tests on one GPU)."""
    asked = environ.get(BACKEND_VARIABLE, "")
    if not asked:
        return "nccl" if use_cuda else "gloo"
    if asked not in ("nccl", "gloo") or (asked == "nccl" and not use_cuda):
        raise DistConfigError(f"{BACKEND_VARIABLE}={asked!r}: use gloo, or nccl on CUDA devices (or leave it unset)")
    return asked


def cuda_index(local_rank: int, visible: int) -> int:
    """This task's GPU: the one GPU a per-task binding shows it (srun --gpus-per-task, CUDA_VISIBLE_DEVICES), else
    the node's GPU of its local rank. More local ranks than GPUs is a launch error, not a GPU to share."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise DistConfigError(
            f"local rank {local_rank} but this process sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most {visible} process(es) per node, one "
            "per GPU (torchrun --nproc_per_node, sbatch --ntasks-per-node and --gpus-per-node)")
    return local_rank


def device_key(device: torch.device) -> str:
    """What identifies a GPU across processes: host and UUID (indices differ under CUDA_VISIBLE_DEVICES)."""
    return f"{socket.gethostname()} GPU {torch.cuda.get_device_properties(device).uuid}"


def exchange(store: dist.Store, rank: int, world_size: int, value: str) -> list[str]:
    """Every rank's `value` in rank order, through the rendezvous store (no process group needed yet)."""
    prefixed = dist.PrefixStore("hmsa/devices", store)
    prefixed.set(str(rank), value)
    return [prefixed.get(str(r)).decode() for r in range(world_size)]


def shared_devices(keys: list[str]) -> str | None:
    """The message for ranks that landed on one GPU (NCCL would stop later with "Duplicate GPU detected"), or
    None when every rank has its own."""
    ranks: dict[str, list[int]] = {}
    for rank, key in enumerate(keys):
        ranks.setdefault(key, []).append(rank)
    shared = [(key, rs) for key, rs in ranks.items() if len(rs) > 1]
    if not shared:
        return None
    key, rs = shared[0]
    return (f"ranks {', '.join(map(str, rs))} share one GPU ({key}): give each process its own GPU (srun "
            "--gpus-per-task=1, or at most as many tasks per node as the node has GPUs; torchrun --nproc_per_node "
            "at most the GPU count)")


def _master_source(env: DistEnv) -> str:
    if env.launcher == "slurm":
        return "master: MASTER_ADDR or the first host of the SLURM node list, port: MASTER_PORT or from SLURM_JOB_ID"
    return "MASTER_ADDR, MASTER_PORT"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (a no-op in one process)."""
    if is_initialized():
        dist.all_reduce(t)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any rank (a collective: call it at the same point on all ranks)."""
    if not is_initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_min(value: int) -> int:
    """The smallest of the ranks' `value`, on every rank (a collective: call it at the same point on all ranks)."""
    if not is_initialized():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] in one process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


_COMM_FAILURE = re.compile(r"gloo|nccl|connection (reset|closed|refused)|timed out|timeout|broken pipe", re.I)


@contextlib.contextmanager
def collective_errors(info: DistInfo, logs: str = "the other ranks' logs") -> Iterator[None]:
    """Turn a failed collective (a rank died, hung past the timeout, or the network broke) into a
    DistributedError that says so, instead of a backend traceback."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:
        if not (info.distributed and is_initialized()) or not (
            isinstance(e, dist.DistError) or _COMM_FAILURE.search(str(e))
        ):
            raise
        raise DistributedError(
            f"rank {info.rank}/{info.world_size}: a collective operation failed: {_first_line(e)}\n"
            f"Another process has probably died or hangs (collectives wait at most run.dist_timeout = "
            f"{info.timeout_s:.0f} s); this one stops instead of waiting. See {logs}."
        ) from e


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync() when `skip` (gradient accumulation: all-reduce only on the last micro-batch)."""
    return model.no_sync() if skip and hasattr(model, "no_sync") else contextlib.nullcontext()

