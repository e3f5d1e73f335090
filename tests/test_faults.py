"""Fault injection (RELIABILITY.md): a tiny run killed with SIGKILL at chosen points and
resumed, interrupted with SIGINT, its checkpoint truncated and bit-flipped; hostile configs and
corrupted images. The essential cases run in CI; the full counts (20 kills, 200 configs, 50
images) are marked slow, and their last result is recorded in RELIABILITY.md."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dance.cli import main
from dance.data.synth import generate_synthstreets

DANCE = [sys.executable, "-m", "dance"]
# Metrics that measure the machine (seconds, joules, memory) or the run's own history (resumed),
# not what was computed: everything else must be identical after a kill and a resume
_MACHINE = ("train_seconds", "images_per_second", "accounting_seconds", "wall_seconds",
            "energy_joules", "phase_seconds", "step_seconds_by_shape", "latency_ms",
            "peak_memory_mb", "resumed")


def computed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in _MACHINE}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A DANCE run small enough to run 40 times: 16 images, 3 epochs, data and network
    slimming (a pruning point and channel removal), one thread so it is deterministic."""
    base = tmp_path_factory.mktemp("faults")
    generate_synthstreets(base / "synth", train=16, val=4, size=(64, 128), seed=3, progress=False)
    config = base / "tiny.yaml"
    config.write_text(f"""
dataset: {{name: synth, root: {base / 'synth'}}}
model: {{name: deeplabv3plus_mbv2, options: {{width_mult: 0.35, aspp_channels: 16,
         decoder_channels: 16}}}}
train: {{epochs: 3, batch_size: 4, crop: [64, 128], workers: 0, threads: 1, device: cpu,
         lr: 0.02}}
data_slimming: {{enabled: true, budget: 0.5}}
network_slimming: {{enabled: true, prune_at: [0.5], network_budget: 0.8}}
""")
    ref = base / "reference"
    log = base / "points.log"
    res = subprocess.run([*DANCE, "train", "--config", str(config), "--out", str(ref), "--quiet"],
                         env={**os.environ, "DANCE_FAULT_LOG": str(log)}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    points = [tuple(line.split()) for line in log.read_text().splitlines()]
    points = [f"{name}:{k}" for name, k in points if name != "score-task"]
    return {"base": base, "config": config, "reference": ref, "points": points,
            "metrics": json.loads((ref / "metrics.json").read_text())}


def kill_and_resume(tiny, point: str, out: Path) -> None:
    """Kill the run at ``point``, resume it (killed runs resume from their last checkpoint, or
    start afresh) and check its results equal the uninterrupted run's."""
    cmd = [*DANCE, "train", "--config", str(tiny["config"]), "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, env={**os.environ, "DANCE_FAULT_AT": point}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, (point, res.stderr[-500:])
    assert not (out / "metrics.json").exists() or point.startswith("atomic-write"), point
    assert main(["train", "--config", str(tiny["config"]), "--out", str(out), "--quiet",
                 "--resume"]) == 0, point
    got = json.loads((out / "metrics.json").read_text())
    assert computed(got) == computed(tiny["metrics"]), point
    assert not [p.name for p in out.iterdir() if p.name.endswith((".new", ".old"))], point


def test_the_fault_points_cover_steps_pruning_and_every_step_of_a_checkpoint(tiny):
    names = {p.split(":")[0] for p in tiny["points"]}
    assert {"step", "pruned", "checkpoint-weights", "checkpoint-written", "checkpoint-swap",
            "checkpoint-swapped", "atomic-write", "before-metrics"} <= names


# In CI: a kill inside the checkpoint swap (between its two renames), and one after the last
# checkpoint and plan.json, before metrics.json (the Ctrl-C test below stops one mid-epoch)
@pytest.mark.parametrize("point", ["checkpoint-swap:2", "before-metrics:1"])
def test_kill_at_a_point_then_resume_gives_identical_results(tiny, point, tmp_path):
    assert point in tiny["points"]
    kill_and_resume(tiny, point, tmp_path / "run")


@pytest.mark.slow
def test_kill_at_20_random_points_then_resume_gives_identical_results(tiny, tmp_path):
    chosen = random.Random(13).sample(tiny["points"], 20)
    for i, point in enumerate(chosen):
        kill_and_resume(tiny, point, tmp_path / f"run{i}")
    print(f"\nkills tried: {len(chosen)}, resumed identically: {len(chosen)} ({chosen})")


def one_line_error(capsys, rc: int) -> str:
    """The single stderr line of a failed in-process command (and no internal error)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, lines
    assert "internal error" not in lines[0] and "Traceback" not in lines[0], lines[0]
    return lines[0]


# --- damaged checkpoints ------------------------------------------------------------------------

def damaged_copies(reference: Path, rng: random.Random, n: int):
    """``n`` (file name, description, damage) triples: truncations at the edges and at random
    lengths, and single bit flips at random offsets, of the weights, of the trainer state and
    of state.json."""
    for i in range(n):
        name = ("model.safetensors", "state.json", "trainer.safetensors")[i % 3]
        size = (reference / "checkpoint" / name).stat().st_size
        if i < 12:
            cut = (0, 1, 8, size - 2)[i // 3]  # (the last byte of state.json is "\n")
            yield name, f"truncated to {cut} bytes", lambda b, cut=cut: b[:cut]
        elif i % 4 < 2:
            cut = rng.randrange(size)
            yield name, f"truncated to {cut} bytes", lambda b, cut=cut: b[:cut]
        else:
            bit = rng.randrange(size * 8)

            def flip(b: bytes, bit=bit) -> bytes:
                b = bytearray(b)
                b[bit // 8] ^= 1 << (bit % 8)
                return bytes(b)
            yield name, f"bit {bit} flipped", flip


def check_damaged_checkpoints(tiny, tmp_path, capsys, n: int) -> int:
    rng = random.Random(5)
    synth = str(tiny["base"] / "synth")
    named = 0
    for i, (name, what, damage) in enumerate(damaged_copies(tiny["reference"], rng, n)):
        run = tmp_path / f"run{i}"
        shutil.copytree(tiny["reference"] / "checkpoint", run / "checkpoint")
        f = run / "checkpoint" / name
        f.write_bytes(damage(f.read_bytes()))
        before = f.read_bytes()
        rc = main(["eval", "--checkpoint", str(run), "--dataset", "synth", "--root", synth])
        line = one_line_error(capsys, rc)
        assert str(f) in line, (what, line)
        assert f.read_bytes() == before  # a failed load changes nothing
        named += 1
    return named


def test_truncated_or_bit_flipped_checkpoints_are_one_line_naming_the_file(tiny, tmp_path,
                                                                         capsys):
    assert check_damaged_checkpoints(tiny, tmp_path, capsys, 40) == 40


@pytest.mark.slow
def test_200_damaged_checkpoints_are_each_named(tiny, tmp_path, capsys):
    named = check_damaged_checkpoints(tiny, tmp_path, capsys, 200)
    print(f"\ncheckpoint corruptions tried: 200, named: {named}")


def test_resume_from_a_damaged_checkpoint_names_it_and_keeps_it(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny["reference"], run)
    (run / "metrics.json").unlink()
    weights = run / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    before = {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()}
    rc = main(["train", "--config", str(tiny["config"]), "--out", str(run), "--quiet",
               "--resume"])
    assert f"{weights}: checksum mismatch" in one_line_error(capsys, rc)
    assert {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()} == before


# --- Ctrl-C ------------------------------------------------------------------------------------

def _default_sigint() -> None:
    """A shell runs background jobs with SIGINT ignored, and an ignored signal stays ignored
    across exec: the command under test must get Ctrl-C as it would in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted(cmd: list[str], point: str, timeout: float = 300,
                action: str = "interrupt") -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session and press Ctrl-C (SIGINT to its process group) when it
    reaches ``point`` (or send it SIGTERM, ``action="terminate"``); then check no process of
    the group is left."""
    proc = subprocess.Popen(cmd, env={**os.environ, "DANCE_FAULT_AT": point,
                                      "DANCE_FAULT_ACTION": action},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)
    out, err = proc.communicate(timeout=timeout)
    import time
    for _ in range(50):  # the workers are gone with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"processes of {cmd[3]} outlived it")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_ctrl_c_during_train_is_one_line_and_the_run_resumes_identically(tiny, tmp_path):
    out = tmp_path / "run"
    res = interrupted([*DANCE, "train", "--config", str(tiny["config"]), "--out", str(out),
                       "--quiet"], "step:7")
    assert res.returncode == 130 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == \
        "dance train: interrupted; continue with --resume (same --config and --out)"
    assert main(["train", "--config", str(tiny["config"]), "--out", str(out), "--quiet",
                 "--resume"]) == 0
    got = json.loads((out / "metrics.json").read_text())
    assert got["resumed"] and computed(got) == computed(tiny["metrics"])


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c(tiny, tmp_path):
    out = tmp_path / "run"
    res = interrupted([*DANCE, "train", "--config", str(tiny["config"]), "--out", str(out),
                       "--quiet"], "step:5", action="terminate")
    assert res.returncode == 130 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("dance train: interrupted; continue")


@pytest.mark.parametrize("command, point", [
    (["score", "--workers", "2"], "score-task:3"),
    (["check-data", "--workers", "2"], "check-sample:3"),
])
def test_ctrl_c_stops_every_worker_with_one_line(tiny, tmp_path, command, point):
    args = [*DANCE, command[0], "--dataset", "synth", "--root", str(tiny["base"] / "synth"),
            *command[1:]]
    if command[0] == "score":
        args += ["--out", str(tmp_path / "scores.csv")]
    res = interrupted(args, point)
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr and "KeyboardInterrupt" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"dance {command[0]}: interrupted")
    assert not (tmp_path / "scores.csv").exists()
    cache = tmp_path / "scores.csv.cache.json"
    assert not cache.exists() or json.loads(cache.read_text())["files"] is not None


def test_ctrl_c_during_the_demo_stops_its_workers(tmp_path):
    res = interrupted([*DANCE, "demo", "--out", str(tmp_path / "demo"), "--quiet"],
                      "atomic-write:3")
    assert res.returncode == 130 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(
        "dance demo: interrupted; rerun dance demo to continue")


@pytest.mark.slow
def test_ctrl_c_during_compare_jobs_stops_the_training_processes(tiny, tmp_path):
    res = interrupted([*DANCE, "compare", "--config", str(tiny["config"]), "--runs",
                       "baseline,uniform", "--jobs", "2", "--out", str(tmp_path / "cmp"),
                       "--quiet"], "step:2")
    assert res.returncode == 130 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("dance compare: interrupted; rerun")


# --- a worker killed (the OOM killer) ----------------------------------------------------------

def test_a_killed_worker_is_one_line_not_a_hang(tiny, tmp_path):
    res = subprocess.run([*DANCE, "score", "--dataset", "synth", "--root",
                          str(tiny["base"] / "synth"), "--workers", "2", "--out",
                          str(tmp_path / "s.csv")],
                         env={**os.environ, "DANCE_FAULT_AT": "score-task:2"},
                         capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[-1].startswith("dance score: error: a worker process died while scoring images")


# --- hostile configs ---------------------------------------------------------------------------

_FIELD_BAD = {  # (section, key): values that must each be refused
    ("dataset", "name"): ["bogus", 3, [1]], ("dataset", "root"): [[1, 2], {"a": 1}, "a\0b"],
    ("dataset", "train_split"): ["training", 1], ("model", "name"): ["resnet9000", 5, None],
    ("model", "pretrained_backbone"): [[1], {"a": 1}],
    ("model", "options"): ["wide", 5, [1], {"nope": 1}, {"width_mult": "wide"},
                           {"aspp_channels": 0}, {"atrous_rates": []}, {"dropout": -1},
                           {"aspp_channels": 10 ** 9}, {"atrous_rates": [6, "x"]}],
    ("train", "crop"): [[64], [64, 128, 3], "64x128", ["a", "b"], [4, 4], [8, 99999], 5],
    ("train", "eval_crop"): [[64], [2, 2], "big"],
    ("train", "scale_range"): [[2, 1], [0, 1], [-1, 2], [1, 100], [1], "wide"],
    ("train", "device"): ["gpu", "cuda:x", "cuda:", 0, ["cpu"]],
    ("train", "threads"): [0, 10 ** 6, "many"],
    ("train", "decode_cache"): [[1], {"a": 1}, "a\0b"],  # any other text is a folder to make
    ("data_slimming", "budget"): [0, 1.5, -0.1, "half", float("nan")],
    ("network_slimming", "network_budget"): [0, 1.2, "x"],
    ("network_slimming", "prune_at"): [[0], [1], [1.5], "x", ["a"], 0.5],
}


def _values_for(annotation, metadata) -> list:
    """Bad values for a config field of this type and these bounds."""
    text = str(annotation)
    bounds = {k: getattr(m, k) for m in metadata for k in ("ge", "gt", "le", "lt")
              if hasattr(m, k)}
    if "Literal" in text:
        return ["bogus", 12345, [1]]
    if annotation is bool:
        return ["maybe", 7, [True], {"a": 1}]
    out: list = ["abc", [1], {"a": 1}]
    if annotation is int or text.startswith("int"):
        out.append(1.5)
    else:
        out += [float("nan"), float("inf")]
    if "ge" in bounds:
        out.append(bounds["ge"] - 1)
    if "gt" in bounds:
        out.append(bounds["gt"])
    if "le" in bounds:
        out.append(bounds["le"] + 1)
    if "lt" in bounds:
        out.append(bounds["lt"])
    return out


def _yaml(value) -> str:
    return json.dumps(value).replace("NaN", ".nan").replace("Infinity", ".inf")


def hostile_configs(n: int, seed: int = 0) -> list[tuple[dict[str, bytes], tuple[str, ...]]]:
    """``n`` bad configs: ``({file name: content}, needles)``, the config being ``c.yaml``; the
    error must contain one of the needles (the key, or the file). First every broken base and
    YAML oddity, then random bad values, unknown keys and wrong types of every field."""
    from dance.engine.config import RunConfig
    bomb = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    fixed = [
        ({"c.yaml": b"base: null\n"}, ("base:",)),
        ({"c.yaml": b"base: 12\n"}, ("base:",)),
        ({"c.yaml": b"base: [1, 2]\n"}, ("base:",)),
        ({"c.yaml": b"base: {a: b}\n"}, ("base:",)),
        ({"c.yaml": b"base: ''\n"}, ("base:",)),
        ({"c.yaml": b"base: sub\n", "sub/x": b""}, ("is a folder",)),
        ({"c.yaml": b"base: nothere.yaml\n"}, ("nothere.yaml",)),
        ({"c.yaml": b"base: l1.yaml\n", "l1.yaml": "caf\xe9: 1\n".encode("latin-1")},
         ("l1.yaml",)),
        ({"c.yaml": b"base: b.yaml\n", "b.yaml": b"base: c.yaml\n"}, ("cycle",)),
        ({"c.yaml": b"base: b.yaml\n", "b.yaml": b"[1, 2]\n"}, ("b.yaml",)),
        ({"c.yaml": b"base: b.yaml\n", "b.yaml": b"train: {epochs: [\n"}, ("b.yaml",)),
        ({"c.yaml": b"base: b.yaml\n", "b.yaml": b"train: {epochs: -3}\n"}, ("train.epochs",)),
        ({"c.yaml": b"train:\n\tepochs: 2\n"}, ("c.yaml",)),
        ({"c.yaml": b"train: {epochs: 2, epochs: 3}\n"}, ("twice",)),
        ({"c.yaml": ("\n".join(bomb) + "\ntrain: {crop: *a8}\n").encode()}, ("alias bomb",)),
        ({"c.yaml": ("x: " + "[" * 5000 + "]" * 5000 + "\n").encode()}, ("nested too deeply",)),
        ({"c.yaml": b"train: !!python/object/apply:os.system [echo hi]\n"}, ("c.yaml",)),
        ({"c.yaml": b"train: {device: 'cpu}\n"}, ("c.yaml",)),
        ({"c.yaml": bytes(range(256))}, ("c.yaml",)),
        ({"c.yaml": b"- train\n- model\n"}, ("mapping of sections",)),
        ({"c.yaml": b"just a string\n"}, ("mapping of sections",)),
        ({"c.yaml": b"train: {epochs: 2}\n---\nmodel: {}\n"}, ("c.yaml",)),
        ({"c.yaml": b"train: *nothing\n"}, ("c.yaml",)),
        ({"c.yaml": b"? [a, b]\n: 1\n"}, ("c.yaml",)),
        ({"c.yaml": b"train: {epochs: 2\x00}\n"}, ("c.yaml",)),
        ({"c.yaml": b"\xef\xbb\xbftrain: {epochz: 2}\n"}, ("train.epochz",)),
        ({"c.yaml": b"train: 5\n"}, ("train",)),
        ({"c.yaml": b"train: [1, 2]\n"}, ("train",)),
        ({"c.yaml": b"3: {a: 1}\n"}, ("c.yaml: 3",)),
    ]
    rng = random.Random(seed)
    fields = []
    for section, info in RunConfig.model_fields.items():
        for name, f in info.annotation.model_fields.items():
            key = f.alias or name
            values = _FIELD_BAD.get((section, key)) or _values_for(f.annotation, f.metadata)
            fields += [(section, key, v) for v in values]
    rng.shuffle(fields)
    cases = list(fixed)
    words = ["epochz", "lr_rate", "batchsize", "crop_size", "gpu", "extra", "budgett", "x"]
    while len(cases) < n:
        kind = rng.random()
        if kind < 0.75 and fields:
            section, key, value = fields.pop()
            needles = (f"{section}.{key}",)
            if (section, key) == ("model", "options") and isinstance(value, dict):
                needles = tuple(f"option '{k}'" for k in value)
            doc = {"dataset": {"root": "/nonexistent"}}
            doc.setdefault(section, {})[key] = value
            text = "\n".join(f"{k}: {_yaml(v)}" for k, v in doc.items()) + "\n"
        elif kind < 0.9:
            section = rng.choice(list(RunConfig.model_fields))
            word = rng.choice(words) + str(rng.randrange(100))
            needles = (f"'{section}.{word}'",)
            text = f"{section}: {{{word}: 1}}\n"
        else:
            word = rng.choice(words) + str(rng.randrange(100))
            needles = (f"'{word}'",)
            text = f"{word}: {{a: 1}}\n"
        cases.append(({"c.yaml": text.encode()}, needles))
    return cases[:n]


@pytest.mark.parametrize("n", [200])
def test_200_hostile_configs_are_each_one_line_naming_the_key_or_file(tmp_path, capsys, n):
    cases = hostile_configs(n)
    assert len(cases) == n
    for i, (files, needles) in enumerate(cases):
        folder = tmp_path / f"c{i}"
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
        rc = main(["train", "--config", str(folder / "c.yaml"), "--out", str(folder / "run")])
        line = one_line_error(capsys, rc)
        assert any(needle in line for needle in needles), (files, line)
        assert len(line) < 500, line
        assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # nothing written
    print(f"\nbad configs tried: {n}, named: {n}")


def test_a_hostile_config_leaves_no_traceback_at_the_process_level(tmp_path):
    files, _ = hostile_configs(15)[14]  # the alias bomb
    (tmp_path / "c.yaml").write_bytes(files["c.yaml"])
    res = subprocess.run([*DANCE, "train", "--config", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "alias bomb" in res.stderr


# --- corrupted images and masks ----------------------------------------------------------------

def _png_with_size(width: int, height: int, mode: str = "L") -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (valid CRCs, almost no pixel data)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    colour = {"L": 0, "RGB": 2}[mode]
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to claim ``width`` x ``height``."""
    import io as _io

    from PIL import Image
    buf = _io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    at = data.index(b"\xff\xc0") + 5
    data[at:at + 4] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _encoded(array, mode: str | None = None) -> bytes:
    import io as _io

    from PIL import Image
    buf = _io.BytesIO()
    Image.fromarray(array, mode).save(buf, "TIFF" if mode == "F" else "PNG")
    return buf.getvalue()


def corruptions(n: int, rng: random.Random):
    """``n`` (target, description, damage(original bytes) -> bytes): the image or the mask of
    a sample truncated, emptied, replaced by text, made a wrong mode or size, or given a header
    claiming huge dimensions. Every kind comes up; the rest are drawn at random."""
    import numpy as np
    kinds = [
        ("image", "zero bytes", lambda b: b""),
        ("mask", "zero bytes", lambda b: b""),
        ("image", "not an image", lambda b: b"<html>404 not found</html>\n"),
        ("mask", "not an image", lambda b: b"id,label\n1,road\n"),
        ("image", "huge PNG header", lambda b: _png_with_size(200_000, 100_000, "RGB")),
        ("mask", "huge PNG header", lambda b: _png_with_size(100_000, 100_000)),
        ("image", "huge JPEG header", lambda b: _jpeg_with_size(60_000, 60_000)),
        ("mask", "RGB mode", lambda b: _encoded(np.zeros((64, 128, 3), np.uint8))),
        ("mask", "RGBA mode", lambda b: _encoded(np.zeros((64, 128, 4), np.uint8))),
        ("mask", "float mode", lambda b: _encoded(np.zeros((64, 128), np.float32), "F")),
        ("mask", "LA mode", lambda b: _encoded(np.zeros((64, 128, 2), np.uint8), "LA")),
        ("mask", "wrong size", lambda b: _encoded(np.zeros((32, 64), np.uint8))),
        ("mask", "label ids outside the table", lambda b: _encoded(
            np.full((64, 128), 200, np.uint8))),
        ("image", "wrong size", lambda b: _encoded(np.zeros((48, 128, 3), np.uint8))),
    ]
    for i in range(n):
        if i < len(kinds):
            yield kinds[i]
            continue
        target = rng.choice(("image", "mask"))
        if rng.random() < 0.7:
            frac = rng.random()
            yield target, f"truncated at {frac:.0%}", lambda b, f=frac: b[:max(1, int(len(b) * f))]
        else:
            yield rng.choice([k for k in kinds if k[0] == target])


def check_corrupted_files(tiny, tmp_path, capsys, n: int) -> int:
    """Each corruption in a copy of the dataset: `dance check-data` lists it under the file's
    name and exits 1; `dance score` of an indicator that reads that file names it on one line
    and writes no CSV when the file cannot be decoded."""
    from dance.data.datasets import open_dataset
    rng = random.Random(11)
    named = 0
    for i, (target, what, damage) in enumerate(corruptions(n, rng)):
        root = tmp_path / f"d{i}"
        shutil.copytree(tiny["base"] / "synth", root)
        sample = open_dataset("synth", root, "train").samples[rng.randrange(16)]
        f = sample.image if target == "image" else sample.mask
        f.write_bytes(damage(f.read_bytes()))
        rc = main(["check-data", "--dataset", "synth", "--root", str(root), "--workers", "1",
                   "--json"])
        captured = capsys.readouterr()
        assert rc == 1 and "Traceback" not in captured.err, (what, captured.err)
        problems = json.loads(captured.out)["problems"]
        assert len(problems) == 1 and str(f) in (problems[0]["file"], problems[0]["problem"]) \
            or str(f) in problems[0]["problem"], (what, problems)
        if what.split()[0] in ("zero", "not", "huge", "truncated"):
            # scoring decodes the file: an undecodable one is one line naming it; a PNG cut
            # only in its last chunks may still decode whole, and then scores
            indicator = "si" if target == "image" else "label_boundary"
            csv = root / "scores.csv"
            rc = main(["score", "--dataset", "synth", "--root", str(root), "--indicator",
                       indicator, "--workers", "1", "--out", str(csv)])
            if rc or not what.startswith("truncated"):
                assert str(f) in one_line_error(capsys, rc), what
                assert not csv.exists()
            capsys.readouterr()
        named += 1
    return named


def test_corrupted_images_and_masks_are_named(tiny, tmp_path, capsys):
    assert check_corrupted_files(tiny, tmp_path, capsys, 16) == 16  # every kind, and 2 more


@pytest.mark.slow
def test_50_corrupted_images_and_masks_are_named(tiny, tmp_path, capsys):
    named = check_corrupted_files(tiny, tmp_path, capsys, 50)
    print(f"\ncorrupted images and masks tried: 50, named: {named}")
