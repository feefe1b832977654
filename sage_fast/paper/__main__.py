"""python -m sage_fast.paper micro [--prompts 64 --group 8 --etas 0.03,0.1,0.25,0.5,1.0 --out docs/paper]

Runs the micro-level measurements on the shipped base model and writes `OUT/micro.md` (tables,
readings, PNGs) and `OUT/micro.json` (every number). See `sage_fast.paper.micro`.
"""

from __future__ import annotations

import argparse
import sys

from .micro import MicroConfig


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sage_fast.paper", description=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="experiment", required=True)
    micro = sub.add_parser("micro", help="rollout geometry, noise budget and gradient norms per SDE type")
    d = MicroConfig()
    micro.add_argument("--prompts", type=int, default=d.prompts, help="held-out prompts (default %(default)s)")
    micro.add_argument("--group", type=int, default=d.group, help="samples per prompt (default %(default)s)")
    micro.add_argument("--etas", type=_floats, default=d.etas,
                       help="noise levels, comma-separated (default %s)" % ",".join(f"{e:g}" for e in d.etas))
    micro.add_argument("--seed", type=int, default=d.seed, help="noise seed (default %(default)s)")
    micro.add_argument("--grad-prompts", type=int, default=d.grad_prompts)
    micro.add_argument("--grad-group", type=int, default=d.grad_group)
    micro.add_argument("--grad-eta", type=float, default=d.grad_eta)
    micro.add_argument("--checkpoint", default=None, help="a world base model folder (default: the shipped one)")
    micro.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    micro.add_argument("--out", default="docs/paper", help="report folder (default %(default)s)")
    micro.add_argument("--quiet", action="store_true", help="no progress bar")
    micro.add_argument("--from-json", default=None, metavar="MICRO_JSON",
                       help="render the report from a saved micro.json instead of measuring")
    args = parser.parse_args(argv)

    import torch  # noqa: PLC0415

    from .micro import run_micro  # noqa: PLC0415
    from .report import write_micro_report  # noqa: PLC0415

    command = "python -m sage_fast.paper " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.from_json is not None:
        import json  # noqa: PLC0415
        from pathlib import Path  # noqa: PLC0415

        try:
            result = json.loads(Path(args.from_json).read_text())
        except (OSError, ValueError) as err:
            parser.error(f"--from-json {args.from_json}: {err}")
        path = write_micro_report(result, args.out, command=command.strip())
        print(f"wrote {path}")
        return 0
    try:
        cfg = MicroConfig(prompts=args.prompts, group=args.group, etas=args.etas, seed=args.seed,
                          grad_prompts=args.grad_prompts, grad_group=args.grad_group, grad_eta=args.grad_eta,
                          checkpoint=args.checkpoint)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
    except ValueError as err:
        parser.error(str(err))
    result = run_micro(cfg, show_progress=not args.quiet)
    path = write_micro_report(result, args.out, command=command.strip())
    print(f"wrote {path} ({result['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
