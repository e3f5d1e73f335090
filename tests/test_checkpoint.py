"""Checkpoints as files: which folder a path means, checksums, fsync, symlinks, the random
generators a resume needs, and a full disk (docs/checkpoints.md, RELIABILITY.md)."""
import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dance.engine import checkpoint as ckpt
from dance.errors import DanceError, WriteError
from dance.fileio import atomic_write_bytes
from dance.network.registry import build_model


@pytest.fixture
def model():
    return build_model("deeplabv3plus_mbv2", 4, width_mult=0.35, aspp_channels=8,
                       decoder_channels=8)


def save(folder, model, **state):
    return ckpt.save_checkpoint(folder, model, {"train_state": {"epoch": 1}, **state})


def resign(folder, change) -> None:
    """Edit state.json as another program might, with a valid checksum (so only the checks
    after the checksum can catch it)."""
    f = folder / "state.json"
    state = json.loads(f.read_text())
    digests = state.pop("integrity")
    change(state)
    digests["state.json"] = hashlib.sha256(ckpt._canonical(state)).hexdigest()
    f.write_text(json.dumps({**state, "integrity": digests}))


def test_dot_inside_a_checkpoint_folder_is_that_checkpoint(tmp_path, model, monkeypatch):
    folder = save(tmp_path / "run" / "checkpoint", model)
    monkeypatch.chdir(folder)
    assert ckpt.find_checkpoint(".") == folder
    assert ckpt.load_model(".").dance_arch.name == "deeplabv3plus_mbv2"


def test_a_run_folder_never_falls_back_to_a_sibling_run_dot_old(tmp_path, model):
    save(tmp_path / "run.old" / "checkpoint", model)
    (tmp_path / "run").mkdir()
    (tmp_path / "run.old").rename(tmp_path / "tmp")
    save(tmp_path / "tmp", model)  # tmp/ is itself a complete checkpoint folder
    (tmp_path / "tmp").rename(tmp_path / "run.old")
    assert ckpt.find_checkpoint(tmp_path / "run") is None
    with pytest.raises(DanceError, match="not a run or checkpoint folder"):
        ckpt.read_checkpoint(tmp_path / "run")


def test_state_edited_or_damaged_after_writing_is_named(tmp_path, model):
    folder = save(tmp_path / "checkpoint", model)
    state = folder / "state.json"
    good = state.read_bytes()
    state.write_bytes(good.replace(b'"epoch": 1', b'"epoch": 2'))
    with pytest.raises(DanceError, match="state.json: checksum mismatch"):
        ckpt.read_checkpoint(folder)
    state.write_bytes(b"\xff\xfe" + good)
    with pytest.raises(DanceError, match="state.json: corrupt checkpoint state"):
        ckpt.read_state(folder)
    state.write_bytes(b"[1, 2]")
    with pytest.raises(DanceError, match="state.json: not a dance checkpoint"):
        ckpt.read_state(folder)


def test_architecture_options_from_state_json_are_checked_before_building(tmp_path, model):
    folder = save(tmp_path / "checkpoint", model)
    resign(folder, lambda s: s["arch"]["kwargs"].update(aspp_channels=10 ** 9))
    with pytest.raises(DanceError, match=r"state.json: architecture: .*'aspp_channels'"):
        ckpt.read_checkpoint(folder)
    resign(folder, lambda s: s["arch"]["kwargs"].update(aspp_channels=8, bogus=1))
    with pytest.raises(DanceError, match="state.json: architecture: .*no option 'bogus'"):
        ckpt.load_model(folder)
    resign(folder, lambda s: s["arch"].update(kwargs={"aspp_channels": 8, "width_mult": 0.35,
                                                      "decoder_channels": 8},
                                              removed=["aspp.nope"]))
    with pytest.raises(DanceError, match="state.json: the architecture does not rebuild"):
        ckpt.load_model(folder)


def test_resume_from_a_state_of_another_version_is_one_line(tmp_path, capsys):
    from dance.cli import main
    from dance.data.synth import generate_synthstreets
    generate_synthstreets(tmp_path / "d", train=4, val=2, size=(32, 64), seed=0, progress=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {{root: {tmp_path / 'd'}}}\n"
                   "model: {options: {width_mult: 0.35, aspp_channels: 8, decoder_channels: 8}}\n"
                   "train: {epochs: 2, batch_size: 2, crop: [32, 64], workers: 0, threads: 1}\n"
                   "data_slimming: {enabled: false}\nnetwork_slimming: {enabled: false}\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    (out / "metrics.json").unlink()
    resign(out / "checkpoint", lambda s: s["train_state"].pop("hardness"))
    rc = main(["train", "--config", str(cfg), "--out", str(out), "--quiet", "--resume"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "train_state lacks hardness" in lines[0]
    assert str(out / "checkpoint" / "state.json") in lines[0]
    resign(out / "checkpoint", lambda s: s["train_state"].update(hardness=5))
    rc = main(["train", "--config", str(cfg), "--out", str(out), "--quiet", "--resume"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "does not fit this version" in lines[0], lines


def test_every_file_and_rename_of_a_save_is_fsynced(tmp_path, model, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    folder = save(tmp_path / "run" / "checkpoint", model)
    new = str(folder) + ".new"
    assert {f"{new}/model.safetensors", new, str(folder.parent)} <= set(synced)
    assert any(p.startswith(f"{new}/.state.json.") for p in synced)  # the temp file, renamed


def test_a_checkpoint_folder_that_is_a_symlink_stays_one(tmp_path, model):
    target = tmp_path / "big_disk" / "ckpt"
    target.mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint").symlink_to(target)
    for epoch in (1, 2):
        ckpt.save_checkpoint(run / "checkpoint", model, {"train_state": {"epoch": epoch}})
    assert (run / "checkpoint").is_symlink()
    assert sorted(p.name for p in target.parent.iterdir()) == ["ckpt"]
    state, folder = ckpt.read_state(run)
    assert state["train_state"]["epoch"] == 2 and folder.resolve() == target


def test_cuda_generators_are_saved_and_restored(tmp_path, model, monkeypatch):
    states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda st, i: restored.update({i: st}))
    folder = save(tmp_path / "checkpoint", model)
    tensors, _, _ = ckpt.read_checkpoint(folder)
    ckpt.restore_rng(tensors)
    assert {i: t.tolist() for i, t in restored.items()} == {0: [1, 2, 3], 1: [4, 5]}


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, model, monkeypatch):
    folder = save(tmp_path / "run" / "checkpoint", model)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for target in ("write_file_synced", "atomic_write_json"):
        with monkeypatch.context() as m:
            m.setattr(ckpt, target, _no_space)
            with pytest.raises(WriteError) as err:
                save(folder, model, extra=target)
        text = str(err.value)
        assert "cannot write the checkpoint (No space left on device)" in text, text
        assert f"the previous checkpoint {folder} is intact" in text and "\n" not in text
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
        assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint"]


def test_a_full_disk_during_an_atomic_write_names_the_file_and_keeps_it(tmp_path, monkeypatch):
    f = tmp_path / "report.md"
    f.write_text("the previous report\n")
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    import dance.fileio as fileio
    monkeypatch.setattr(fileio.os, "fdopen", Full)
    with pytest.raises(WriteError, match=f"{f}: cannot write .No space left on device.; the "
                                         "previous report.md is intact"):
        atomic_write_bytes(f, b"new")
    assert f.read_text() == "the previous report\n" and os.listdir(tmp_path) == ["report.md"]


def test_a_really_full_tmpfs(tmp_path):
    """The same on a real 3 MiB tmpfs (in a user and mount namespace, where the system allows
    one): the second checkpoint does not fit, the first stays loadable."""
    script = textwrap.dedent(f"""
        import os, subprocess
        from dance.engine import checkpoint as ckpt
        from dance.errors import WriteError
        from dance.network.registry import build_model
        mnt = {str(tmp_path / 'mnt')!r}
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mnt], check=True)
        small = build_model("deeplabv3plus_mbv2", 4, width_mult=0.35, aspp_channels=8,
                            decoder_channels=8)
        ckpt.save_checkpoint(mnt + "/checkpoint", small, {{"train_state": {{}}}})
        big = build_model("deeplabv3plus_mbv2", 4, width_mult=0.5, aspp_channels=64,
                          decoder_channels=64)
        try:
            ckpt.save_checkpoint(mnt + "/checkpoint", big, {{"train_state": {{}}}})
        except WriteError as e:
            print(e)
        ckpt.load_model(mnt + "/checkpoint")
        print(sorted(os.listdir(mnt)))
    """)
    (tmp_path / "mnt").mkdir()
    try:
        res = subprocess.run(["unshare", "-rm", sys.executable, "-c", script], capture_output=True,
                             text=True, timeout=120)
    except FileNotFoundError:
        pytest.skip("a real full disk needs unshare(1) to mount a private tmpfs, and this system "
                    "has none; the monkeypatched ENOSPC tests above cover the same paths")
    if "mount" in res.stderr and res.returncode != 0 and "WriteError" not in res.stderr:
        pytest.skip("a real full disk needs a private tmpfs, and this system refuses user and "
                    "mount namespaces (" + res.stderr.strip().splitlines()[-1][:80] + "); the "
                    "monkeypatched ENOSPC tests above cover the same paths")
    assert res.returncode == 0, res.stderr
    first, listing = res.stdout.strip().splitlines()
    assert "cannot write the checkpoint (No space left on device)" in first
    assert "is intact" in first and listing == "['checkpoint']"


def test_files_get_the_users_umask_and_rewrites_keep_their_mode(tmp_path, monkeypatch):
    import dance.fileio as fileio
    monkeypatch.setattr(fileio, "_UMASK", 0o022)
    atomic_write_bytes(tmp_path / "report.md", b"x")
    assert os.stat(tmp_path / "report.md").st_mode & 0o777 == 0o644  # not mkstemp's 0600
    os.chmod(tmp_path / "report.md", 0o640)
    atomic_write_bytes(tmp_path / "report.md", b"y")
    assert os.stat(tmp_path / "report.md").st_mode & 0o777 == 0o640


def test_the_weights_file_loads_with_safetensors_alone(tmp_path, model):
    from safetensors.torch import load_file
    folder = save(tmp_path / "checkpoint", model, optimizer_free=True)
    fresh = build_model("deeplabv3plus_mbv2", 4, width_mult=0.35, aspp_channels=8,
                        decoder_channels=8)
    fresh.load_state_dict(load_file(folder / "model.safetensors"))  # strict: the same names
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert "rng/torch" in load_file(folder / "trainer.safetensors")
