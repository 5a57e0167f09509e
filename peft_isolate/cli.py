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

from .export import RULES
from .models import QUANTIZATIONS
from .plan import FREEZES, ORDERS
from .regions import BLOCK_SIZES, GRANULARITIES
from .selection import SCOPES

Handler = Callable[[argparse.Namespace], "int | None"]
# what `pip install 'peft-isolate[pipeline]'` brings (import names); the tuner and export need none of them
PIPELINE_MODULES = {"datasets", "pydantic", "matplotlib", "gguf", "reasoning_gym"}
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


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (the usage itself is one `--help` away); subparsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="peft-isolate", description="Core Parameter Isolation Fine-Tuning.")
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
    except ModuleNotFoundError as e:
        if e.name not in PIPELINE_MODULES:
            raise
        parser.exit(
            2,
            f"peft-isolate {args.command}: error: {e.name} is not installed; this command runs the recipe pipeline: "
            "pip install 'peft-isolate[pipeline]'\n",
        )
    except (ValueError, OSError) as e:  # OSError: missing, existing, unreadable or unwritable paths
        parser.exit(2, f"peft-isolate {args.command}: error: {e}\n")
    except KeyboardInterrupt as e:
        where = next(iter(getattr(e, "__notes__", [])), "every file written so far is complete (writes are atomic)")
        parser.exit(130, f"peft-isolate {args.command}: interrupted; {where}\n")


def seed(text: str) -> int:
    """An argparse type: a seed in [0, 2**32 - 1], which numpy and torch generators all take."""
    from .recipe import SEED_MAX

    value = int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, {SEED_MAX}]")
    return value


def output_file(text: str) -> Path:
    """An argparse type: a file to write, which must not be a symbolic link or a folder."""
    from .files import check_new_output

    try:
        return check_new_output(text, directory=False)
    except OSError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def output_dir(text: str) -> Path:
    """An argparse type: a folder to create, which must not exist or be empty, and not be a symbolic link."""
    from .files import check_new_output

    try:
        return check_new_output(text, directory=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@command("regions", "Find a task's core region (top-p entries by |delta|) and save it as safetensors.")
@arg("--tuned", help="fine-tuned checkpoint (directory or .safetensors); needs --base")
@arg(
    "--lora",
    help="peft LoRA adapter directory (delta = scale * B @ A); --base is optional and only checks it",
)
@arg("--adapter", help="isolation adapter directory (its sparse delta); needs --base for the weight shapes")
@arg("--base", help="base checkpoint (directory or .safetensors) the probe started from")
@arg("--p", type=float, default=0.01, help="fraction of entries to keep, in (0, 1] (default 0.01)")
@arg("--scope", choices=SCOPES, default="global", help="where the top p is taken")
@arg("--granularity", choices=GRANULARITIES, default="element", help="take entries, or whole rows/columns/blocks")
@arg("--block", type=int, choices=BLOCK_SIZES, help="block side, with --granularity block")
@arg("--include", metavar="REGEX", help="only parameters whose name matches (e.g. the targeted linear weights)")
@arg("--out", required=True, type=output_file, help="output file, e.g. cores/math.safetensors")
def regions(args: argparse.Namespace) -> None:
    from .selection import find_core_regions
    from .sources import CheckpointDelta, IsolationDelta, LoraDelta

    given = [f for f in ("tuned", "lora", "adapter") if getattr(args, f)]
    if len(given) != 1:
        raise ValueError("give exactly one delta source: --tuned (with --base), --lora or --adapter")
    if not args.base and not args.lora:
        raise ValueError(f"--{given[0]} needs --base: the checkpoint the probe started from")
    try:
        include = re.compile(args.include or "")
    except re.error as e:
        raise ValueError(f"--include {args.include!r} is not a valid regular expression ({e})") from None
    if args.tuned:
        source = CheckpointDelta(args.base, args.tuned)
    elif args.lora:
        source = LoraDelta(args.lora, args.base)
    else:
        source = IsolationDelta(args.adapter, args.base)
    names = None
    if args.include:
        names = [n for n in source.shapes() if include.search(n)]
        if not names:
            raise ValueError(f"--include {args.include!r} matches no parameter of {source.description}")
    cores = find_core_regions(
        source, p=args.p, scope=args.scope, names=names, granularity=args.granularity, block=args.block
    )
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
@arg("--order", choices=ORDERS, default="random", help="stage order of the groups")
@arg("--seed", type=seed, default=0, help="seed of the random order")
@arg("--freeze", choices=FREEZES, default="previous", help="cores frozen in a stage")
@arg("--out", default="plan.json", type=output_file, help="plan file; the heatmap goes beside it as .png")
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


def _recipe_args(fn: Handler) -> Handler:
    """The arguments every recipe-driven command takes: the recipe file and `key.sub=value` overrides."""
    fn = arg("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. stages.steps=100")(fn)
    return arg("recipe", help="recipe YAML (see examples/demo.yaml)")(fn)


def _run_until(step: str) -> Handler:
    """A handler that runs the recipe up to `step` and prints results.md when it gets there."""

    def handler(args: argparse.Namespace) -> None:
        from .pipeline import run_pipeline
        from .recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        if run_pipeline(recipe, until=step) is not None:
            print((Path(recipe.output_dir) / "results.md").read_text())

    return handler


for _step, _help in [
    ("run", "Run the whole CPI-FT recipe (resumable: complete steps are skipped)."),
    ("probe", "Run the recipe up to the single-task probes."),
    ("fuse", "Run the recipe up to the fused starting point (probes, regions, plan included)."),
    ("train-stage", "Run the recipe up to the CPI-FT stages and final/ adapter."),
    ("evaluate", "Run the recipe through evaluation and print results.md (same as run)."),
]:
    command(_step, _help)(_recipe_args(_run_until({"run": "evaluate"}.get(_step, _step))))


@command("validate", "Check a recipe: every key, type and cross-field rule; print the resolved recipe.")
@_recipe_args
def validate(args: argparse.Namespace) -> None:
    import yaml

    from .recipe import load_recipe

    print(yaml.safe_dump(load_recipe(args.recipe, args.overrides).model_dump(mode="json"), sort_keys=False))


@command("demo", "The whole CPI-FT pipeline on SmolLM2-135M-Instruct and reasoning-gym tasks, offline.")
@arg("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of examples/demo.yaml, e.g. output_dir=runs/x")
@arg("--margin", type=float, default=0.05, help="single-task probes must beat base and majority by this")
def demo(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import probe_lift
    from .pipeline import run_pipeline
    from .recipe import load_recipe

    overrides = list(args.overrides)
    if not torch.cuda.is_available() and not any(o.startswith("quantization=") for o in overrides):
        print(
            "No GPU: the CPU demo runs on the fp32 model (bitsandbytes' 4-bit CPU kernels are slower on 2 cores); "
            "nf4 is used on a GPU and tested in the test suite."
        )
        overrides.append("quantization=none")
    recipe = load_recipe(DEMO_RECIPE, overrides)
    results = run_pipeline(recipe)
    print((Path(recipe.output_dir) / "results.md").read_text())
    lift = probe_lift(results)
    weak = [t for t, gain in lift.items() if gain < args.margin]
    if weak:
        print(
            f"DEMO FAILED: the single-task probes of {weak} do not beat the base model and the majority answer by "
            f"{args.margin}; the tasks or budgets of the demo do not show learning, so its comparison means nothing."
        )
        return 1
    least = min(lift, key=lift.get)
    print(
        f"Demo check passed: every single-task probe beats the base model and the majority answer by at least "
        f"{args.margin} (least: {least}, by {lift[least]:.2f}). Artifacts: {recipe.output_dir}/"
    )
    return 0


DEMO_RECIPE = Path(__file__).parent / "demo.yaml"


def _print_report(report: dict) -> None:
    import json

    print(json.dumps(report, indent=2, default=str))


@command("export", "Write an isolation adapter's delta as a standalone sparse-delta safetensors file.")
@arg("adapter", help="isolation adapter directory")
@arg("--out", required=True, type=output_file, help="output file, e.g. delta.safetensors")
@arg(
    "--dtype",
    choices=["float32", "bfloat16", "float16"],
    help="dtype of the values (default float32; bfloat16 with --compact)",
)
@arg("--compact", action="store_true", help="each weight's indices as gaps or a bitmap, whichever is smaller")
@arg("--base", help="base model (directory, .gguf or alias) for shapes and fingerprint (default: the adapter's)")
@arg("--quantization", choices=QUANTIZATIONS, default="none", help="fingerprint the base loaded so")
def export(args: argparse.Namespace) -> None:
    import torch

    from .export import export_delta
    from .models import ALIASES, load_model, resolve_model

    if args.quantization != "none" and not args.base:
        raise ValueError("--quantization says how to load --base: give --base too")
    base = args.base
    if base and (base in ALIASES or base.endswith(".gguf")):  # a checkpoint dir or .safetensors is read as is
        base = resolve_model(base)
    if base and args.quantization != "none":
        base = load_model(base, args.quantization)[0]
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.compact else "float32"))
    _print_report(export_delta(args.adapter, args.out, dtype, base, compact=args.compact))


@command("apply", "Add a sparse delta to a model and save the result (4-bit/8-bit: requantized, error reported).")
@arg("model", help="model directory, .gguf or alias")
@arg("delta", help="sparse-delta file")
@arg("--out", required=True, type=output_dir, help="new, empty output model directory")
@arg("--quantization", choices=QUANTIZATIONS, default="none", help="load the model so first")
@arg("--force", action="store_true", help="apply even if the delta was made for another base fingerprint")
def apply(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from .export import apply_delta
    from .files import atomic_dir
    from .models import load_model, resolve_model

    # unquantized, keep the checkpoint's own dtype: the one `export --base` fingerprints, and the one to save back
    dtype = AutoConfig.from_pretrained(resolve_model(args.model)).dtype if args.quantization == "none" else None
    model, tokenizer = load_model(args.model, args.quantization, dtype=dtype)
    report = apply_delta(model, args.delta, force=args.force)
    with atomic_dir(args.out, replace=False) as tmp:  # the whole model appears at once, or nothing
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    _print_report(report)


@command("merge", "Stream-merge a sparse delta into a base checkpoint, shard by shard (peak memory ~ one tensor).")
@arg("--base", required=True, help="base checkpoint directory (safetensors, sharded or not)")
@arg("--delta", required=True, help="sparse-delta file")
@arg("--out", required=True, type=output_dir, help="new, empty output directory")
@arg("--force", action="store_true", help="merge even if the delta was made for another base fingerprint")
def merge(args: argparse.Namespace) -> None:
    from .export import merge_checkpoint

    _print_report(merge_checkpoint(args.base, args.delta, args.out, force=args.force))


@command("compose", "Combine sparse deltas: disjoint supports add exactly; overlaps need a rule.")
@arg("deltas", nargs="+", help="sparse-delta files")
@arg("--out", required=True, type=output_file, help="output sparse-delta file")
@arg("--rule", choices=list(RULES), help="rule for overlaps")
@arg("--weights", type=float, nargs="+", help="one weight per delta (default 1)")
@arg("--density", type=float, help="kept fraction of the union of supports, per delta, for ties/dare/magnitude_prune")
@arg("--seed", type=seed, default=0, help="seed of DARE's random drop")
def compose(args: argparse.Namespace) -> None:
    from .export import compose_deltas

    _print_report(compose_deltas(args.deltas, args.out, args.rule, args.weights, args.density, args.seed))


if __name__ == "__main__":
    sys.exit(main())
