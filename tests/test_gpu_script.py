"""The prepared GPU run (bench/gpu/run.sh) end to end as a dry run: CPU, tiny sizes, no install, no network.

Each part must write its table with the columns the GPU run fills in, and the FSDP part must meet exactly the
CPU refusal of `training.fsdp`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "bench" / "gpu" / "run.sh"

TABLES = {
    "part1_seesaw.md": [
        "| method | number_sequence | spell_backward | calendar_arithmetic | avg |",
        "| goal | margin to the goal | met |",
    ],
    "part2_stage7b.md": [
        "| method | trainable | locked | setup (s) | step (s) | tokens/s | peak (GiB, CPU RSS) | peak reserved (GiB) "
        "| above model (GiB) | step x QLoRA | peak x QLoRA | <= 16 GB |"
    ],
    "part3_speed.md": [
        "| seq | labels | density | method | trainable | step (s) | x QLoRA | x floor | x all labels | peak mem (MiB) "
        "| mem x QLoRA |"
    ],
    "part4_fsdp.md": [
        "| status | FSDP-wrapped params (DTensor) | stage time (s) | peak (GiB) | train loss | locked entries "
        "bit-identical | free entries moved | detail |"
    ],
}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(out), "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        ["bash", str(RUN), "--dry-run"], capture_output=True, text=True, env=env, timeout=400, cwd=REPO
    )
    return out, done


def rows(text: str, header: str) -> list[list[str]]:
    """The body rows of the markdown table whose header line is `header`."""
    lines = text.splitlines()
    start = lines.index(header) + 2
    body = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split("|")])
    return body


def test_dry_run_succeeds(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([*TABLES, "run.log", "summary.md", "versions.md"])


@pytest.mark.parametrize("name", list(TABLES))
def test_each_part_wrote_its_table(dry_run, name):
    out, _ = dry_run
    text = (out / name).read_text()
    assert "DRY RUN" in text and "Date " in text and "torch " in text and "bitsandbytes " in text
    for header in TABLES[name]:
        assert header in text, f"{name} lacks the columns {header}\n{text}"
        assert rows(text, header), f"{name}: an empty table under {header}"


def test_tables_hold_the_expected_rows(dry_run):
    out, _ = dry_run
    seesaw = rows((out / "part1_seesaw.md").read_text(), TABLES["part1_seesaw.md"][0])
    methods = {r[0] for r in seesaw}
    assert {"base", "single_task (probe)", "cpi_ft", "multitask", "majority answer"} <= methods
    assert {"multistage_random", "multistage_given", "lora_multitask"} <= methods  # phase B ran too
    stage = rows((out / "part2_stage7b.md").read_text(), TABLES["part2_stage7b.md"][0])
    assert [r[0].split(" ")[0] for r in stage] == ["cpi_ft", "qlora"]
    assert int(stage[0][2].replace(",", "")) > 0  # the stage locked task A's core
    speed = rows((out / "part3_speed.md").read_text(), TABLES["part3_speed.md"][0])
    assert {(r[3], r[2]) for r in speed} >= {
        (m, d) for m in ("qlora", "shira", "isolation") for d in ("0.100%", "1.000%", "5.000%")
    }
    assert {(r[3], r[2]) for r in speed} >= {(f"isolation_{g}", "5.000%") for g in ("row", "column", "block16")}
    assert [r[3] for r in speed].count("none") == 1  # the floor, once per sequence length (one in the dry run)
    assert "Failed" not in (out / "part3_speed.md").read_text()


def test_fsdp_part_meets_the_cpu_refusal(dry_run):
    out, _ = dry_run
    (status, *_, detail) = rows((out / "part4_fsdp.md").read_text(), TABLES["part4_fsdp.md"][0])[0]
    assert status == "refused as expected (CPU)"
    assert detail.startswith("training.fsdp needs GPUs: accelerate runs FSDP only on accelerators")


def test_summary_and_versions(dry_run):
    out, _ = dry_run
    summary = (out / "summary.md").read_text()
    assert re.search(r"\| Part 4: FSDP dense stage \| part4_fsdp\.md \| 0 \|", summary)
    versions = (out / "versions.md").read_text()
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        assert re.search(rf"^{name} \S+", versions, re.M), versions
    assert "IMPORT FAILED" not in versions
