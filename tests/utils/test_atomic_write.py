"""utils.files' atomic writes (and atomic_save's use of them): whole versions only, unique temporary files, nothing left behind."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from utils.checkpoint import atomic_save, read_checkpoint
from utils.files import atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_text_is_written_with_the_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "state.json"
    old = os.umask(0o027)
    try:
        atomic_write_text(str(path), '{"a": 1}')
        atomic_save({"format": "x"}, str(tmp_path / "c.pth"))
    finally:
        os.umask(old)
    assert path.read_text() == '{"a": 1}'
    assert (path.stat().st_mode & 0o777) == 0o640  # as open() would create it, not mkstemp's 0600
    assert (tmp_path / "c.pth").stat().st_mode & 0o777 == 0o640
    assert read_checkpoint(str(tmp_path / "c.pth")) == {"format": "x"}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c.pth", "state.json", "sub"]


def test_a_failed_write_keeps_the_previous_version(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic_write_text(str(path), "old")

    class Boom(Exception):
        pass

    def failing_fsync(fd):
        raise Boom

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(Boom):
        atomic_write_text(str(path), "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.dist
def test_concurrent_writers_and_a_reader_see_whole_versions(tmp_path):
    """Two processes rewrite one file 300 times each while a third reads it: no writer fails (a fixed temporary
    name made one writer rename the other's file away: 'not found'), the reader only ever sees whole versions, and
    no temporary file is left."""
    path = tmp_path / "state.json"
    versions = {name: name * 5000 for name in ("a", "b")}  # large enough that a torn write would show
    atomic_write_text(str(path), versions["a"])
    writer = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from utils.files import atomic_write_text
        for _ in range(300):
            atomic_write_text({str(path)!r}, sys.argv[1] * 5000)
    """)
    stop = tmp_path.parent / f"{tmp_path.name}.stop"  # outside the folder whose listing is checked
    reader = textwrap.dedent(f"""
        import os
        seen, reads = set(), 0
        while not os.path.exists({str(stop)!r}):
            text = open({str(path)!r}).read()
            seen.add(text[:1] if text in ({versions['a']!r}, {versions['b']!r}) else "torn")
            reads += 1
        print(reads, " ".join(sorted(seen)))
    """)
    read = subprocess.Popen([sys.executable, "-c", reader], stdout=subprocess.PIPE, text=True)
    writers = [subprocess.Popen([sys.executable, "-c", writer, name], stderr=subprocess.PIPE, text=True)
               for name in versions]
    for w in writers:
        assert w.wait(timeout=300) == 0, w.stderr.read()
        w.stderr.close()
    stop.touch()
    reads, *seen = read.communicate(timeout=300)[0].split()
    assert read.returncode == 0 and int(reads) > 0
    assert "torn" not in seen and set(seen) <= {"a", "b"}
    assert path.read_text() in versions.values()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
