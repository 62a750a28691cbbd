"""Data parallelism across nodes: forming the process group, each rank's shard of a global batch, and
the few collectives through which the ranks of one run agree.

Every rank iterates the same global batches (their order is a pure function of the seed and the epoch,
``datasets``), trains on its contiguous slice of each, and DistributedDataParallel averages the ranks'
gradients; each shard's loss is weighted so that this average is the gradient of the mean loss over
the whole global batch, also when the last batch of an epoch does not divide evenly. A run on N ranks
therefore takes the steps a single process takes, up to the order of float additions. Validation and
test batches are split the same way and their sums added up: the ranks evaluate in parallel, and none
idles at a barrier that the collectives' timeout would cut short on a long held-out split. Dropout is
the exception to "the same steps": each rank draws its own masks (``Gang.seed_dropout``).

Rendezvous: rank 0 starts a c10d ``TCPStore`` on a free port (it listens on every interface) and
publishes the port; the other ranks find it and connect, and ``init_process_group`` forms the group
over it: gloo on the CPU; NCCL on CUDA, with a gloo group beside it for the small host-side agreements.

Gloo must send from the address the peers can reach. By default it takes the address the host name
resolves to, which in a network namespace or on a multi-homed host is the wrong interface (or none,
and then loopback). Torch 2.13's ``init_process_group`` builds the gloo device from one setting only,
``GLOO_SOCKET_IFNAME``, so the groups form with it naming the interface that holds ``own_address`` (and
``NCCL_SOCKET_IFNAME`` likewise for NCCL's bootstrap); gloo then binds that interface's first IPv4
address, which is ``own_address`` when it is the interface's primary one. An operator's own setting of
either variable is left as it is.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import TCPStore  # type: ignore[attr-defined]  # re-exported from torch._C
from torch.nn.parallel import DistributedDataParallel

from node_runtime.training.context import Distributed, PeerLost, RendezvousTimeout

log = logging.getLogger(__name__)

SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's (primary) IPv4 address
# errors of this node itself, not of the link to a peer: out of memory, a failing GPU (named since torch 2.8)
_OWN_FAULTS: tuple[type[BaseException], ...] = tuple(
    getattr(torch, name) for name in ("OutOfMemoryError", "AcceleratorError") if hasattr(torch, name))


class Gang:
    """The formed process group of one run, as this rank takes part in it."""

    def __init__(self, distributed: Distributed, device: torch.device, control: dist.ProcessGroup | None) -> None:
        self.rank, self.world_size, self.device = distributed.rank, distributed.world_size, device
        self.timeout_s = distributed.timeout_s
        self.control = control  # the group agree() and add_up() use: None, the default one
        self.agreed_stop: int | None = None  # agreed with the last decision, the answer to the next stop check

    @property
    def leads(self) -> bool:
        """Rank 0 reports progress, writes checkpoints and returns the weights."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model in DistributedDataParallel (which starts every rank from rank 0's weights)."""
        with self.collective("the first broadcast of the weights"):
            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                           else None)

    def shard(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's contiguous rows of a global batch, as even as the rows allow (rank r of N gets
        ``[r*B//N, (r+1)*B//N)``, possibly none), and the weight of its mean loss: ``rows * N / B``, so
        that DDP's average of the ranks' gradients is the gradient of the mean over all B rows (every
        row holds the same number of predictions, tokens included)."""
        rows = len(inputs)
        start, end = rows * self.rank // self.world_size, rows * (self.rank + 1) // self.world_size
        return inputs[start:end], targets[start:end], (end - start) * self.world_size / rows

    def seed_dropout(self, seed: int, step: int) -> None:
        """Seed the generator dropout draws from with a pure function of (seed, step, rank), before each
        step: the ranks draw different masks, and a resumed run draws the ones it would have drawn (the
        checkpoint holds rank 0's generator only)."""
        value = ((seed * 1_000_003 + step) * 1_009 + self.rank) % (2**63)
        if self.device.type == "cuda":
            torch.manual_seed(value)  # every device's generator
        else:
            torch.default_generator.manual_seed(value)  # what torch.manual_seed does on the CPU, in 1/70th the time

    def agree(self, stop_reason: int, report: bool, checkpoint: bool) -> tuple[bool, bool]:
        """Whether to report and to checkpoint now, as rank 0 (whose clock decides) wants. The ranks' stop
        requests ride in the same all-reduce and answer the next ``stop_reason`` call, so a step costs one
        small collective besides the gradients'."""
        self.agreed_stop, report_due, checkpoint_due = self._largest(
            [stop_reason, int(report and self.leads), int(checkpoint and self.leads)])
        return bool(report_due), bool(checkpoint_due)

    def stop_reason(self, own: Callable[[], int]) -> int:
        """The largest stop reason of any rank (0: go on), ``own`` being this rank's: the one agreed with
        the last decision, else agreed now."""
        stop = self.agreed_stop if self.agreed_stop is not None else self._largest([own(), 0, 0])[0]
        self.agreed_stop = None
        return stop

    def add_up(self, values: list[float]) -> list[float]:
        """The sum of ``values`` over the ranks (one all-reduce, in float64)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        with self.collective("adding up the metrics"):
            dist.all_reduce(tensor, group=self.control)
            summed: list[float] = tensor.tolist()
        return summed

    def add_up_with_rates(self, sums: list[float], samples: int, seconds: float,
                          ) -> tuple[list[float], list[tuple[float, float]]]:
        """``sums`` added up over the ranks, and every rank's ``(samples, seconds)``: one all-reduce."""
        own = [0.0] * (2 * self.world_size)
        own[2 * self.rank:2 * self.rank + 2] = [samples, seconds]
        summed = self.add_up([*sums, *own])
        rates = summed[len(sums):]
        return summed[:len(sums)], [(rates[2 * rank], rates[2 * rank + 1]) for rank in range(self.world_size)]

    def _largest(self, values: list[int]) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.int64)
        with self.collective("agreeing on the next step"):
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control)
            largest: list[int] = tensor.tolist()
        return largest

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn a collective's failure into ``PeerLost``: gloo raises a plain RuntimeError when a peer's
        connection closes or nothing arrives within ``timeout_s``."""
        try:
            yield
        except _OWN_FAULTS:
            raise
        except RuntimeError as error:
            raise PeerLost(f"rank {self.rank} of {self.world_size}: {what} failed: a peer's process ended, its "
                           f"connection broke, or it sent nothing for {self.timeout_s:g} s ({error})") from error


@contextmanager
def join(distributed: Distributed, device: torch.device) -> Iterator[Gang]:
    """Form the run's process group within ``distributed.timeout_s`` (else ``RendezvousTimeout``), and
    destroy it on the way out, whatever happens.

    Drop the model ``Gang.wrap`` returned before leaving: destroying the last reference to a gloo group
    joins its worker threads, and when DDP's reducer holds that reference the join happens under the GIL,
    which a worker still releasing a failed collective's tensors waits for: a deadlock (seen in one of
    three runs whose peer froze; pytorch/pytorch#56297). Destroyed by ``destroy_process_group``, the group
    joins its threads with the GIL released.
    """
    deadline = time.monotonic() + distributed.timeout_s
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # NCCL and DDP want the GPU by its index, and as the current one
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=distributed.timeout_s)
    try:
        store = _store(distributed, deadline)
        with _interface_of(distributed.own_address, backend):
            dist.init_process_group(backend, store=store, rank=distributed.rank, world_size=distributed.world_size,
                                    timeout=timeout,  # NCCL's communicator forms now, while the interface is set
                                    device_id=device if device.type == "cuda" else None)
            # with NCCL, the agreements go through gloo on the host: on the GPU, reading each step's
            # agreement back would wait for the step's kernels, the stall the loop avoids
            control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    except dist.DistError as error:  # the store or a peer's key did not come in time
        _leave()
        raise RendezvousTimeout(f"rank {distributed.rank} of {distributed.world_size}: the process group did "
                                f"not form within {distributed.timeout_s:g} s: {error}") from error
    except BaseException:  # anything else (an interrupt, a backend's own error): leave no half-formed group
        _leave()
        raise
    try:
        yield Gang(distributed, device, control)
    finally:
        _leave()


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _store(distributed: Distributed, deadline: float) -> TCPStore:
    """Rank 0 starts the store and publishes its port; the others find it and connect."""
    if distributed.rank == 0:
        # wait_for_workers=False: init_process_group waits for them, within the same timeout
        store = TCPStore(distributed.own_address, 0, distributed.world_size, is_master=True,
                              timeout=timedelta(seconds=distributed.timeout_s), wait_for_workers=False)
        distributed.publish_master(store.port)
        return store
    host, port = distributed.find_master(max(0.0, deadline - time.monotonic()))
    return TCPStore(host, port, distributed.world_size, is_master=False,
                         timeout=timedelta(seconds=max(1.0, deadline - time.monotonic())))


@contextmanager
def _interface_of(address: str, backend: str) -> Iterator[None]:
    """While the groups form, point the socket variables at the interface holding ``address`` (gloo's,
    and with NCCL also NCCL's); an operator's own setting stays."""
    variables = ["GLOO_SOCKET_IFNAME"] + (["NCCL_SOCKET_IFNAME"] if backend == "nccl" else [])
    unset = [variable for variable in variables if not os.environ.get(variable)]
    interface = interface_holding(address) if unset else None
    if interface is None:
        if unset:
            log.warning("no network interface holds %s: %s leave the choice to %s", address, " and ".join(unset),
                        backend)
        yield
        return
    for variable in unset:
        os.environ[variable] = interface
    try:
        yield
    finally:
        for variable in unset:
            del os.environ[variable]


def interface_holding(address: str) -> str | None:
    """The name of the network interface whose (primary) IPv4 address ``address`` is or resolves to
    (asked with Linux's SIOCGIFADDR; None elsewhere)."""
    try:
        wanted = {info[4][0] for info in socket.getaddrinfo(address, None, socket.AF_INET)}
    except socket.gaierror:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                reply = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            if str(ipaddress.IPv4Address(reply[20:24])) in wanted:
                return name
    return None
