"""The ``audit`` command line: parses options, calls the library, maps errors to exit codes.

Exit codes: 0 success; 1 an audit gate failed; 2 bad input (one-line reason on stderr).
"""

from __future__ import annotations

import json
import sys

import click

from audit import __version__
from audit.errors import AuditError


class AuditGroup(click.Group):
    """Turns :class:`AuditError` into a one-line message and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AuditError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=AuditGroup)
@click.version_option(__version__, prog_name="audit")
def main() -> None:
    """cam-audit: check that an image classifier looks at the object, not at a shortcut."""


@main.group()
def bench() -> None:
    """Measure speed: the explanation engine against a plain forward and the peer libraries."""


@bench.command("engine")
@click.option("--arch", default="resnet50", show_default=True, help="torchvision architecture (random weights).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=32))
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=1), help="timed repeats")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0), help="untimed repeats first")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
@click.option("--amp/--no-amp", default=None, help="bfloat16 autocast (default: on for cuda)")
@click.option("--channels-last/--no-channels-last", default=None, help="(default: on for cuda)")
@click.option("--peers/--no-peers", default=True, show_default=True, help="also time pytorch-grad-cam and torchcam")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_engine_command(
    arch: str,
    batch_size: int,
    image_size: int,
    repeats: int,
    warmup: int,
    device: str | None,
    amp: bool | None,
    channels_last: bool | None,
    peers: bool,
    as_json: bool,
) -> None:
    """Time one batch: plain forward vs our three-method pass vs the peers one after another."""
    import torch

    from audit.explain.bench import bench_engine, format_engine_bench

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AuditError(f"--device {device}: no CUDA device is available")
    on_gpu = device.startswith("cuda")
    result = bench_engine(
        arch=arch,
        batch_size=batch_size,
        image_size=image_size,
        repeats=repeats,
        warmup=warmup,
        device=device,
        amp=on_gpu if amp is None else amp,
        channels_last=on_gpu if channels_last is None else channels_last,
        with_peers=peers,
    )
    click.echo(json.dumps(result.to_dict()) if as_json else format_engine_bench(result))


if __name__ == "__main__":
    main()
