"""The device mesh: parsing "2x4" / "data=2,model=4", building a ("data", "model") Mesh, and
joining a multi-host JAX job."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)


class ShardingError(ValueError):
    """A mesh that cannot be built as asked; the message says what to change."""


def parse_mesh(spec: str | Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """{"data": d, "model": m} from "data=2,model=4" (or "2x4", a dict, or None = all on model).

    One size may be -1 ("the rest"). The product must equal `num_devices`.
    """
    if spec is None:
        sizes = {DATA: 1, MODEL: -1}
    elif isinstance(spec, Mapping):
        sizes = {str(k): int(v) for k, v in spec.items()}
    else:
        text = str(spec).replace(" ", "")
        try:
            if "=" in text:
                sizes = {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}
            else:
                sizes = dict(zip(AXES, (int(v) for v in text.lower().split("x")), strict=True))
        except ValueError as e:
            raise ShardingError(f"cannot read mesh {spec!r}: write e.g. 'data=2,model=4' or '2x4'") from e
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ShardingError(f"mesh axes must be among {AXES}, got {sorted(unknown)} in {spec!r}")
    sizes = {DATA: sizes.get(DATA, 1), MODEL: sizes.get(MODEL, 1)}
    rest = [k for k, v in sizes.items() if v == -1]
    if len(rest) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ShardingError(f"mesh sizes must be positive (one may be -1 = the rest), got {spec!r}")
    if rest:
        known = math.prod(v for v in sizes.values() if v != -1)
        if num_devices % known:
            raise ShardingError(f"mesh {spec!r}: {num_devices} devices do not split by {known}")
        sizes[rest[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ShardingError(f"mesh {spec!r} has {math.prod(sizes.values())} devices but "
                            f"{num_devices} are available; the sizes must multiply to that")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") Mesh over `devices` (default: every device of every process).

    "model" is the fast axis: its devices are neighbours (same host / ICI ring), where the
    per-layer all-reduces of tensor parallelism run; "data" spans hosts.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    shape = (sizes[DATA], sizes[MODEL])
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # odd device counts / CPU: plain row-major order is fine
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES)


def mesh_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    """{"data": n, "model": m} of a Mesh or a sizes dict (a missing axis is 1), so the rules
    work on real meshes and on sizes alone (memory estimates)."""
    sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
    return {DATA: sizes.get(DATA, 1), MODEL: sizes.get(MODEL, 1)}


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None, **kwargs: Any) -> None:
    """Joins this process to a multi-host JAX job (call it before anything touches a device).

    * TPU pods (Cloud TPU VMs): call with no arguments on every host; JAX finds the
      coordinator and the process ids itself.
    * Multi-node GPU under SLURM or Open MPI: no arguments either (JAX reads the scheduler's
      environment); elsewhere give `coordinator_address="host0:1234"`, `num_processes` and this
      host's `process_id` (0 .. n-1) on every host, and `local_device_ids` if a host runs one
      process per GPU.
    Afterwards `jax.devices()` lists every device of every host: build one mesh over them with
    `make_mesh(...)` and run the same program on every host (SPMD). Calling it twice is harmless.
    """
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids, **kwargs)
