"""Spawned gloo process groups for the distributed tests: each run bounded by a timeout, so a bug fails, not hangs.

`run_group(fn, world_size, *args)` runs fn(rank, world_size, *args) in world_size forked processes that share a
gloo group (file rendezvous in a temporary directory); an exception or assertion on any rank fails the caller with
that rank's traceback, and a run past `timeout` is killed and fails.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, fn, world_size, store_file, result_dir, args):
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        fn(rank, world_size, *args)
        dist.barrier()
    except BaseException:
        with open(os.path.join(result_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_group(fn, world_size: int, *args, timeout: float = 120.0) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(
            _entry, args=(fn, world_size, store, tmp, args), nprocs=world_size, join=False, start_method="fork"
        )
        deadline = timeout
        import time

        start = time.monotonic()
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() - start > deadline:
                    raise TimeoutError(f"process group of {world_size} did not finish within {timeout} s (hang?)")
        except mp.ProcessRaisedException as exc:
            raise AssertionError(_errors(tmp) or str(exc)) from None
        except mp.ProcessExitedException as exc:
            raise AssertionError(_errors(tmp) or str(exc)) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        errors = _errors(tmp)
        if errors:
            raise AssertionError(errors)


def _errors(tmp: str) -> str:
    out = []
    for name in sorted(os.listdir(tmp)):
        if name.startswith("error"):
            with open(os.path.join(tmp, name)) as f:
                out.append(f"--- rank {name[5:-4]} ---\n{f.read()}")
    return "\n".join(out)
