"""Time one teacher update on a MONAI 3D UNet: medeman's fused EMAN update against the SSL4MIS loop.

The SSL4MIS reference averages parameters only, one tensor at a time::

    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.data.mul_(alpha).add_(p.data, alpha=1 - alpha)

``update_teacher`` in ``eman`` mode averages the BatchNorm running statistics too (more tensors),
in one ``torch._foreach_lerp_``; ``bn`` mode averages the same tensors as the loop, so that row
isolates the fused call. Prints the median of ``--repeats`` timed updates per method.

    python benchmarks/bench_eman_update.py --repeats 200 --threads 1
    python benchmarks/bench_eman_update.py --smoke      # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from monai.networks.nets import UNet
from torch import nn

from medeman.eman import make_teacher, update_teacher


def ssl4mis_update(ema: nn.Module, model: nn.Module, alpha: float) -> None:
    """The per-tensor parameter EMA of SSL4MIS (``update_ema_variables``)."""
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.data.mul_(alpha).add_(p.data, alpha=1 - alpha)


def median_us(fn: Callable[[], None], repeats: int, warmup: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        sync()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed updates per method (the median is reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed updates per method before timing")
    parser.add_argument(
        "--channels", type=str, default="32,64,128,256,320", help="UNet channels per level, comma-separated"
    )
    parser.add_argument("--num-res-units", type=int, default=2, help="residual units per UNet block")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--momentum", type=float, default=0.99)
    parser.add_argument(
        "--smoke", action="store_true", help="a two-level UNet, 3 updates: checks that the benchmark runs, in seconds"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.channels, args.num_res_units, args.repeats, args.warmup = "4,8", 1, 3, 1

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    channels = tuple(int(c) for c in args.channels.split(","))
    student = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=args.num_res_units,
        norm="batch",
    ).to(device)
    eman = make_teacher(student, norm="eman")
    bn = make_teacher(student, norm="bn")
    loop_teacher = make_teacher(student, norm="bn")
    m = args.momentum

    n_params = sum(1 for _ in student.parameters())
    n_float_buffers = sum(1 for b in student.buffers() if b.is_floating_point())
    n_int_buffers = sum(1 for b in student.buffers() if not b.is_floating_point())
    n_values = sum(p.numel() for p in student.parameters())
    rows = [
        (
            "ssl4mis loop (params)",
            n_params,
            median_us(lambda: ssl4mis_update(loop_teacher, student, m), args.repeats, args.warmup, sync),
        ),
        (
            "update_teacher bn (params)",
            n_params,
            median_us(lambda: update_teacher(bn, student, m), args.repeats, args.warmup, sync),
        ),
        (
            "update_teacher eman (params+BN stats)",
            n_params + n_float_buffers + n_int_buffers,
            median_us(lambda: update_teacher(eman, student, m), args.repeats, args.warmup, sync),
        ),
    ]

    print(
        f"MONAI UNet channels={channels} num_res_units={args.num_res_units} norm=batch on {device} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__})"
    )
    print(
        f"tensors: {n_params} parameters ({n_values / 1e6:.2f} M values), {n_float_buffers} BN running mean/var, "
        f"{n_int_buffers} num_batches_tracked; median of {args.repeats} updates"
    )
    baseline = rows[0][2]
    width = max(len(r[0]) for r in rows)
    print(f"{'method':<{width}}  {'tensors':>7}  {'median us':>10}  {'vs loop':>7}")
    for name, tensors, us in rows:
        print(f"{name:<{width}}  {tensors:>7}  {us:>10.1f}  {us / baseline:>6.2f}x")


if __name__ == "__main__":
    main()
