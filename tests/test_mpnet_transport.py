"""experiments/mpnet_to_device.py: split -> parts arriving over several calls -> verify -> join, on a small fake file."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "mpnet_to_device.py"
spec = importlib.util.spec_from_file_location("mpnet_to_device", SCRIPT)
mtd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mtd)


@pytest.fixture
def packed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    weights = src / "model.safetensors"
    weights.write_bytes(os.urandom(1000))
    (src / "config.json").write_text('{"model_type": "mpnet"}')
    (src / "vocab.txt").write_text("[PAD]\n<s>\n")
    parts = tmp_path / "here"
    manifest = mtd.split_file(weights, parts, 300, [src / "config.json", src / "vocab.txt"])
    return src, parts, manifest


def test_split_sizes_manifest_and_carry_plan(packed):
    src, parts, manifest = packed
    assert [p["size"] for p in manifest["parts"]] == [300, 300, 300, 100]
    assert b"".join((parts / p["name"]).read_bytes() for p in manifest["parts"]) == (src / "model.safetensors").read_bytes()
    assert manifest["file"]["sha256"] == mtd.sha256(src / "model.safetensors")
    assert json.loads((parts / "manifest.json").read_text()) == manifest
    plan = mtd.carry_plan(parts)
    assert len(plan) == 4 and all(len(call) <= 8 for call in plan)  # the device tool carries 8 paths at most
    assert all(call[0].endswith("manifest.json") for call in plan)
    assert {Path(f).name for call in plan for f in call} == {"manifest.json", "config.json", "vocab.txt"} | {
        p["name"] for p in manifest["parts"]}


def test_parts_arrive_over_several_calls_then_join_exactly(packed, tmp_path, capsys):
    src, parts, manifest = packed
    device = tmp_path / "device" / "parts"
    out = tmp_path / "device" / "mpnet"
    device.mkdir(parents=True)
    for i, call in enumerate(mtd.carry_plan(parts)):
        for f in call:
            shutil.copyfile(f, device / Path(f).name)
        done = i == len(manifest["parts"]) - 1
        code = mtd.main(["assemble", "--parts", str(device), "--out", str(out)])
        err = capsys.readouterr().err
        if not done:
            assert code == 2 and not out.exists()
            left = [p["name"] for p in manifest["parts"][i + 1:]]
            assert f"{len(left)} missing, 0 corrupt" in err
            assert all(f"missing: {name}" in err for name in left)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    for name in ("model.safetensors", "config.json", "vocab.txt"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_and_missing_parts_are_named_and_nothing_is_written(packed, tmp_path, capsys):
    src, parts, manifest = packed
    device = tmp_path / "device"
    shutil.copytree(parts, device)
    second = device / manifest["parts"][1]["name"]
    data = bytearray(second.read_bytes())
    data[17] ^= 0xFF  # same size, one flipped byte
    second.write_bytes(bytes(data))
    (device / manifest["parts"][3]["name"]).write_bytes(b"short")
    (device / "vocab.txt").unlink()
    out = tmp_path / "mpnet"
    assert mtd.main(["assemble", "--parts", str(device), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 missing, 2 corrupt" in err
    assert "missing: vocab.txt" in err
    assert f"corrupt: {manifest['parts'][1]['name']} (sha256 mismatch)" in err
    assert f"corrupt: {manifest['parts'][3]['name']} (size 5, expected 100)" in err
    assert not out.exists()
    assert mtd.main(["status", "--parts", str(device)]) == 2
    assert "3/6 pieces present and verified" in capsys.readouterr().out


def test_inconsistent_manifest_and_missing_manifest_fail(packed, tmp_path, capsys):
    _, parts, _ = packed
    assert mtd.main(["assemble", "--parts", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no manifest" in capsys.readouterr().err
    manifest = json.loads((parts / "manifest.json").read_text())
    manifest["file"]["sha256"] = "0" * 64
    (parts / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(mtd.SplitError, match="manifest is inconsistent"):
        mtd.assemble(parts, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_assemble_runs_standalone_with_the_standard_library(packed, tmp_path):
    _, parts, _ = packed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-S", "-I", str(SCRIPT), "assemble", "--parts", str(parts), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "assembled" in run.stdout


def test_split_sends_an_existing_model_folder_as_it_is(tmp_path, capsys):
    """`split --src` (e.g. .dev/minilm): the folder's own weights and small files, unconverted, arrive and join
    into an identical folder; a folder without weights is a clear error."""
    src = tmp_path / "minilm"
    src.mkdir()
    (src / "model.safetensors").write_bytes(os.urandom(700))
    (src / "config.json").write_text('{"model_type": "bert"}')
    (src / "tokenizer.json").write_text("{}")
    parts = tmp_path / "parts"
    assert mtd.main(["split", "--src", str(src), "--parts", str(parts), "--part-bytes", "300"]) == 0
    assert "call 3: carry" in capsys.readouterr().out
    device = tmp_path / "device"
    device.mkdir()
    for call in mtd.carry_plan(parts):
        for f in call:
            shutil.copyfile(f, device / Path(f).name)
    out = tmp_path / "assembled"
    assert mtd.main(["assemble", "--parts", str(device), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for f in src.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes()
    (tmp_path / "empty").mkdir()
    assert mtd.main(["split", "--src", str(tmp_path / "empty"), "--parts", str(tmp_path / "p2")]) == 2
    assert "split needs --src, a folder with model.safetensors" in capsys.readouterr().err


def test_parts_are_sized_from_the_working_tree():
    """Equal parts, as few as fit one call each beside the tree and the reserve; a tree that leaves too little room
    is an error naming its size."""
    limit, reserve = mtd.CARRY_LIMIT, mtd.CALL_RESERVE
    for size, tree in [(45_440_000, 38_518_037), (45_440_000, 20_000_000), (219_000_000, 30_000_000), (1000, 0)]:
        part = mtd.part_bytes_for(size, tree)
        count = -(-size // part)
        assert tree + reserve + part <= limit  # each call fits
        assert size - (count - 1) * part <= part and (count - 1) * part < size  # the last part is not empty
        room = limit - tree - reserve
        assert count == 1 or (count - 1) * room < size  # one part fewer would not hold the file
    assert mtd.part_bytes_for(45_440_000, 38_518_037) == 22_720_000  # today's tree: two parts of MiniLM
    assert -(-45_440_000 // mtd.part_bytes_for(45_440_000, 50_000_000)) == 4
    with pytest.raises(mtd.SplitError, match=r"working tree \(62\.0 MB\)"):
        mtd.part_bytes_for(45_440_000, 62_000_000)


def test_tree_bytes_counts_what_the_device_carries(tmp_path):
    """Tracked files and untracked ones git does not ignore; not the ignored ones."""
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / ".gitignore").write_text(".dev/\n")
    (tmp_path / "tracked.py").write_bytes(b"x" * 1000)
    (tmp_path / ".dev").mkdir()
    (tmp_path / ".dev" / "weights").write_bytes(b"x" * 5000)
    run("add", "tracked.py", ".gitignore")
    (tmp_path / "new.txt").write_bytes(b"x" * 300)
    assert mtd.tree_bytes(tmp_path) == 1000 + 300 + len(".dev/\n")


def test_part_bytes_option_is_checked(tmp_path, capsys):
    assert mtd.main(["split", "--src", str(tmp_path), "--parts", str(tmp_path / "p"), "--part-bytes", "25MB"]) == 2
    assert "--part-bytes takes a number of bytes or auto, got '25MB'" in capsys.readouterr().err
