"""The `peft-isolate` command: one subcommand per pipeline step, each a single decorated function.

Add a subcommand by writing `def name(args) -> int | None` under `@command("name", "help")` with one
`@arg(...)` per option (argparse's `add_argument` arguments). Commands call the step's library function
and print a short summary; they hold no logic of their own.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], "int | None"]
_COMMANDS: dict[str, tuple[str, Handler]] = {}


def arg(*flags: str, **kwargs: Any) -> Callable[[Handler], Handler]:
    """Declare one option of a subcommand (same arguments as `ArgumentParser.add_argument`)."""

    def add(fn: Handler) -> Handler:
        fn.__dict__.setdefault("cli_args", []).insert(0, (flags, kwargs))
        return fn

    return add


def command(name: str, help: str) -> Callable[[Handler], Handler]:
    """Register `fn` as the subcommand `name`."""

    def add(fn: Handler) -> Handler:
        _COMMANDS[name] = (help, fn)
        return fn

    return add


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-isolate", description="Core Parameter Isolation Fine-Tuning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        for flags, kwargs in getattr(fn, "cli_args", []):
            p.add_argument(*flags, **kwargs)
        p.set_defaults(handler=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `peft-isolate`; user errors print one line and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"peft-isolate {args.command}: error: {e}\n")


@command("regions", "Find a task's core region (top-p entries by |delta|) and save it as safetensors.")
@arg("--tuned", help="fine-tuned checkpoint (directory or .safetensors); needs --base")
@arg(
    "--lora",
    help="peft LoRA adapter directory (delta = scale * B @ A); --base is optional and only checks it",
)
@arg("--adapter", help="isolation adapter directory (its sparse delta); needs --base for the weight shapes")
@arg("--base", help="base checkpoint (directory or .safetensors) the probe started from")
@arg("--p", type=float, default=0.01, help="fraction of entries to keep, in (0, 1] (default 0.01)")
@arg("--scope", choices=["global", "layer", "matrix"], default="global", help="where the top p is taken")
@arg("--include", metavar="REGEX", help="only parameters whose name matches (e.g. the targeted linear weights)")
@arg("--out", required=True, help="output file, e.g. cores/math.safetensors")
def regions(args: argparse.Namespace) -> None:
    from .regions import CheckpointDelta, IsolationDelta, LoraDelta, find_core_regions

    given = [f for f in ("tuned", "lora", "adapter") if getattr(args, f)]
    if len(given) != 1:
        raise ValueError("give exactly one delta source: --tuned (with --base), --lora or --adapter")
    if not args.base and not args.lora:
        raise ValueError(f"--{given[0]} needs --base: the checkpoint the probe started from")
    if args.tuned:
        source = CheckpointDelta(args.base, args.tuned)
    elif args.lora:
        source = LoraDelta(args.lora, args.base)
    else:
        source = IsolationDelta(args.adapter, args.base)
    names = None
    if args.include:
        names = [n for n in source.shapes() if re.search(args.include, n)]
        if not names:
            raise ValueError(f"--include {args.include!r} matches no parameter of {source.description}")
    cores = find_core_regions(source, p=args.p, scope=args.scope, names=names)
    cores.save(args.out)
    busy = sorted(((c.numel(), n) for n, c in cores.items() if c.numel()), reverse=True)
    print(
        f"{cores.size} of {cores.numel} entries ({100 * cores.density:.3g}%) in {len(busy)} tensors, "
        f"scope {cores.scope} -> {args.out}"
    )
    for count, name in busy[:5]:
        print(f"  {count:>10}  {name}")


@command("plan", "Group tasks by core-region overlap into stages; write plan.json and a heatmap PNG.")
@arg("cores", nargs="+", help="core-region files, one per task (the task is the file's stem)")
@arg("--tau", type=float, default=0.1, help="link tasks with Jaccard >= tau (0: one group)")
@arg("--order", choices=["random", "size", "union"], default="random", help="stage order of the groups")
@arg("--seed", type=int, default=0, help="seed of the random order")
@arg("--freeze", choices=["previous", "all"], default="previous", help="cores frozen in a stage")
@arg("--out", default="plan.json", help="plan file; the heatmap goes beside it as .png")
def plan(args: argparse.Namespace) -> None:
    from .plan import draw_overlap, format_plan, plan_stages
    from .regions import CoreRegions

    paths = [Path(p) for p in args.cores]
    tasks = [p.stem for p in paths]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"two core files share a task name (file stem): {tasks}")
    cores = {t: CoreRegions.load(p) for t, p in zip(tasks, paths, strict=True)}
    result = plan_stages(cores, tau=args.tau, order=args.order, seed=args.seed, freeze=args.freeze)
    out = Path(args.out)
    result.save(out)
    png = draw_overlap(result, out.with_suffix(".png"))
    print(format_plan(result))
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    sys.exit(main())
