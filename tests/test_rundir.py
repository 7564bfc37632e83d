"""The run folder: create, lock, atomic writes, manifest, resume, --force, clean failure."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from nclab.rundir import RunDir, RunDirError


def write_part(rd, name="a", settings=None, text="x"):
    if rd.begin_part(name, settings or {"k": 1}):
        rd.write_text(f"{name}/out.txt", text)
        rd.complete_part(name)
        return True
    return False


def test_new_folder_gets_files_manifest_and_user_permissions(tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        with RunDir(out) as rd:
            write_part(rd)
    finally:
        os.umask(old)
    assert (out / "a" / "out.txt").read_text() == "x"
    assert oct((out / "a" / "out.txt").stat().st_mode & 0o777) == oct(0o644)
    manifest = json.loads((out / ".nclab" / "manifest.json").read_text())
    assert list(manifest["files"]) == ["a/out.txt"] and manifest["files"]["a/out.txt"]["part"] == "a"
    assert manifest["parts"]["a"]["complete"]
    assert not list((out / ".nclab" / "tmp").glob("*"))


def test_non_empty_folder_is_refused_without_resume_or_force(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(RunDirError, match="--out: .*already holds results \\(mine.txt\\).*--force"):
        RunDir(tmp_path).open()
    assert (tmp_path / "mine.txt").read_text() == "user data"
    assert not (tmp_path / ".nclab").exists() or not (tmp_path / ".nclab" / "manifest.json").exists()


def test_force_removes_only_files_nclab_wrote(tmp_path):
    out = tmp_path / "run"
    with RunDir(out) as rd:
        write_part(rd)
    (out / "notes.md").write_text("mine")
    (out / "a" / "mine.csv").write_text("mine too")
    with RunDir(out, mode="force") as rd:
        assert not (out / "a" / "out.txt").exists()
        write_part(rd, "b")
    assert (out / "notes.md").read_text() == "mine" and (out / "a" / "mine.csv").read_text() == "mine too"
    assert (out / "b" / "out.txt").exists()


def test_a_users_file_is_never_overwritten(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "out.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not written by nclab"):
        with RunDir(tmp_path, mode="force") as rd:
            write_part(rd)
    assert (tmp_path / "a" / "out.txt").read_text() == "mine"


def test_resume_skips_complete_parts_and_refuses_other_settings(tmp_path):
    with RunDir(tmp_path / "r") as rd:
        write_part(rd, "a", {"steps": 10})
    with RunDir(tmp_path / "r", mode="resume") as rd:
        assert not write_part(rd, "a", {"steps": 10})
        assert write_part(rd, "b", {"steps": 10})
    with pytest.raises(RunDirError, match=r"different settings \(steps: 10 → 20\)"):
        with RunDir(tmp_path / "r", mode="resume") as rd:
            write_part(rd, "a", {"steps": 20})


def test_second_process_on_the_same_folder_fails_at_once(tmp_path):
    out = tmp_path / "locked"
    with RunDir(out) as rd:
        script = textwrap.dedent(f"""
            import sys
            from nclab.rundir import RunDir, RunDirError
            try:
                RunDir({str(out)!r}, mode="resume").open()
            except RunDirError as e:
                print(e); sys.exit(2)
        """)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "another nclab process" in proc.stdout and str(os.getpid()) in proc.stdout
        write_part(rd)


def test_error_before_any_result_leaves_nothing(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with RunDir(out) as rd:
            rd.begin_part("a", {})
            rd.write_text("a/config.toml", "x")
            raise RuntimeError("data missing")
    assert not out.exists()


def test_error_after_a_result_keeps_the_result(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with RunDir(out) as rd:
            write_part(rd, "a")
            rd.begin_part("b", {})
            rd.write_text("b/config.toml", "x")
            raise RuntimeError("second part failed")
    assert (out / "a" / "out.txt").exists() and not (out / "b").exists()
    with RunDir(out, mode="resume") as rd:  # the failed part is gone from the record: it runs again
        assert not write_part(rd, "a") and write_part(rd, "b")


def test_killed_process_leftovers_do_not_block_a_plain_rerun(tmp_path):
    out = tmp_path / "run"
    (out / ".nclab" / "tmp").mkdir(parents=True)
    (out / ".nclab" / "tmp" / "out.txt.abc123").write_text("half written")
    (out / ".nclab" / "lock").write_text("12345")
    with RunDir(out) as rd:
        write_part(rd)
    assert not list((out / ".nclab" / "tmp").glob("*"))


@pytest.mark.parametrize("rel", ["../escape.txt", "/etc/x", "a/../../x", ".nclab/manifest.json"])
def test_names_never_escape_the_folder(tmp_path, rel):
    with RunDir(tmp_path / "r") as rd:
        with pytest.raises(RunDirError, match="outside"):
            rd.write_text(rel, "x")
    assert not (tmp_path / "escape.txt").exists()


def test_bad_locations_are_one_line_errors(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        RunDir(f).open()
    with pytest.raises(RunDirError, match="is a file, so"):
        RunDir(f / "sub").open()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(RunDirError, match="cannot write to .*Permission denied"):
        RunDir(tmp_path / "ro").open()


def test_resume_of_a_folder_without_an_nclab_run_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(RunDirError, match="holds no nclab run"):
        RunDir(tmp_path, mode="resume").open()


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    with RunDir(tmp_path / "r") as rd:
        write_part(rd)
    (tmp_path / "r" / ".nclab" / "manifest.json").write_text("{not json")
    with pytest.raises(RunDirError, match="unreadable"):
        RunDir(tmp_path / "r", mode="force").open()


def test_a_kept_result_of_a_killed_run_needs_resume_or_force(tmp_path):
    out = tmp_path / "r"
    rd = RunDir(out)
    rd.open()
    rd.begin_part("t", {"epochs": 3})
    rd.write_text("t/checkpoint.pt", "state")
    rd.keep()
    os.close(rd._lock_fd)  # killed: close() never runs, the kernel drops the lock
    with pytest.raises(RunDirError, match="already holds results"):
        RunDir(out).open()
    with RunDir(out, mode="resume") as again:
        assert again.begin_part("t", {"epochs": 3}) and (out / "t" / "checkpoint.pt").read_text() == "state"


def test_a_new_part_cannot_overwrite_another_parts_files_on_resume(tmp_path):
    with RunDir(tmp_path / "r") as rd:
        rd.begin_part("ufm", {"steps": 200})
        rd.write_text("summary.json", "200 steps")
        rd.complete_part("ufm")
    with pytest.raises(RunDirError, match="belongs to part 'ufm'"):
        with RunDir(tmp_path / "r", mode="resume") as rd:
            rd.begin_part("other", {"steps": 150})
            rd.write_text("summary.json", "150 steps")
    assert (tmp_path / "r" / "summary.json").read_text() == "200 steps"
    with RunDir(tmp_path / "r", mode="resume") as rd:  # the record is unchanged: the old part is skipped
        assert not rd.begin_part("ufm", {"steps": 200})


@pytest.mark.parametrize("entry", ["../victim.txt", "sub/victim.txt"])
def test_force_never_follows_a_manifest_out_of_the_folder(tmp_path, entry):
    victim_dir = tmp_path / "userdata"
    victim_dir.mkdir()
    (victim_dir / "victim.txt").write_text("precious")
    (tmp_path / "victim.txt").write_text("precious")
    out = tmp_path / "r"
    with RunDir(out) as rd:
        write_part(rd)
    (out / "sub").symlink_to(victim_dir)
    manifest = json.loads((out / ".nclab" / "manifest.json").read_text())
    manifest["files"][entry] = {"part": "a"}
    (out / ".nclab" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirError, match="unreadable"):
        RunDir(out, mode="force").open()
    assert (tmp_path / "victim.txt").read_text() == "precious"
    assert (victim_dir / "victim.txt").read_text() == "precious"


def test_force_keeps_an_output_the_user_replaced_and_never_overwrites_it(tmp_path):
    out = tmp_path / "r"
    with RunDir(out) as rd:
        write_part(rd)
    (out / "a" / "out.txt").write_text("my own edited version")
    with pytest.raises(RunDirError, match="was changed since"):
        with RunDir(out, mode="resume") as rd:
            rd.begin_part("a", {"k": 1}, again=True)
            rd.write_text("a/out.txt", "x")
    with RunDir(out, mode="force") as rd:
        write_part(rd, "b")
    assert (out / "a" / "out.txt").read_text() == "my own edited version"
