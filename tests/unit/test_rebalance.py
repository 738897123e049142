"""The pure parts of a rebalance (issue 21 item 3): which files a pass copies, the state file,
the router's render record, and the path rules of a user's file transfer (`stcs.transfer`,
on real directories)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from stcs import transfer
from stcs.cluster import Plan
from stcs.config import Settings
from stcs.deploy import RenderOptions, read_record, render
from stcs.errors import BadAdminRequestError, ConfigError
from stcs.rebalance import RECENT_NS, RebalanceRefused, RunState, delta


def f(path: str, size: int, mtime: int) -> dict[str, object]:
    return {"path": path, "size": size, "mtimeNs": mtime}


def test_a_pass_copies_what_differs_and_prunes_what_the_source_lacks() -> None:
    source = [f("a", 1, 10), f("b", 2, 20), f("c", 3, 30)]
    target = [f("a", 1, 10), f("b", 2, 21), f("old", 9, 1)]
    copy, prune = delta(source, target)
    assert [x["path"] for x in copy] == ["b", "c"]
    assert prune == ["old"]


def test_pass_two_copies_again_a_file_written_in_pass_ones_tick() -> None:
    """Size and mtime equal, but the mtime is within RECENT_NS of pass 1's manifest: a write in
    the same clock tick as pass 1's read would otherwise be missed."""
    taken = 100 * RECENT_NS
    same = [f("quiet", 5, taken - 3 * RECENT_NS), f("recent", 5, taken - RECENT_NS // 2)]
    copy, prune = delta(same, same, recent_since_ns=taken - RECENT_NS)
    assert [x["path"] for x in copy] == ["recent"]
    assert prune == []
    assert delta(same, same) == ([], [])


def test_state_file_resumes_the_same_change_and_refuses_another(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    plan = Plan(["a:1", "b:1"], ["a:1", "b:1", "c:1"], moves={"u1": ("a:1", "c:1")})
    state = RunState.new(path, plan)
    state.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p != path]  # no partial file left behind
    again = RunState.load(path, ["a:1", "b:1"], ["a:1", "b:1", "c:1"])
    assert again is not None and again.moves["u1"]["to"] == "c:1" and again.step == "copy"
    with pytest.raises(RebalanceRefused, match="remove the file"):
        RunState.load(path, ["a:1", "b:1"], ["a:1", "c:1"])
    assert RunState.load(tmp_path / "none.json", ["a:1"], ["b:1"]) is None


def test_the_router_records_its_render_options_and_renders_the_same_for_new_nodes() -> None:
    settings = Settings(app_name="Vectors", max_body_size=12345, web_server_host="db.example")
    opts = RenderOptions(listen="127.0.0.1:8443", nodes=("10.0.0.1:8000", "10.0.0.2:8000"))
    text = render("nginx-cluster", settings, opts)
    recorded, options = read_record(text, Settings())
    assert options.nodes == opts.nodes and options.listen == opts.listen
    assert (recorded.app_name, recorded.max_body_size) == ("Vectors", 12345)
    assert render("nginx-cluster", recorded, options) == text
    with pytest.raises(ConfigError, match="stcs-render"):
        read_record("server { }\n", Settings())


@pytest.mark.parametrize(
    "path", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a/", "./a", "a/.", "a\0b", 7]
)
def test_a_transfer_path_must_stay_inside_the_users_directory(path: object) -> None:
    with pytest.raises(BadAdminRequestError):
        transfer.check_relpath(path)


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    buf.seek(0)
    return buf


def _raw(buf: io.BytesIO) -> io.RawIOBase:
    return io.BytesIO(buf.getvalue())  # type: ignore[return-value]


def test_export_then_import_round_trip_keeps_bytes_modes_and_mtime_ns(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "seg").mkdir(parents=True)
    (src / "chroma.sqlite3").write_bytes(b"x" * 3000)
    (src / "seg" / "data.bin").write_bytes(os.urandom(70_000))
    os.utime(src / "seg" / "data.bin", ns=(1_700_000_000_123_456_789,) * 2)
    (src / "link").symlink_to("/etc/passwd")
    files = transfer.manifest(str(src))
    assert files is not None
    assert [x["path"] for x in files] == ["chroma.sqlite3", "seg/data.bin"]  # no symlink
    export = transfer.ExportStream(str(src), transfer.check_paths([x["path"] for x in files]))
    export.check()
    stream = b"".join(export.pieces())
    dst = tmp_path / "dst"
    report = transfer.import_tar(str(dst), io.BytesIO(stream))  # type: ignore[arg-type]
    assert (report.files, report.bytes) == (2, 73_000)
    assert (dst / "seg" / "data.bin").read_bytes() == (src / "seg" / "data.bin").read_bytes()
    assert (dst / "seg" / "data.bin").stat().st_mtime_ns == 1_700_000_000_123_456_789
    assert stat.S_IMODE((dst / "seg").stat().st_mode) == 0o700
    assert stat.S_IMODE((dst / "chroma.sqlite3").stat().st_mode) == 0o600
    assert sorted(p.name for p in dst.rglob("*")) == ["chroma.sqlite3", "data.bin", "seg"]


def test_export_refuses_a_symlink_and_what_escapes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "secret").write_text("outside")
    (src / "link").symlink_to(tmp_path / "secret")
    (src / "dirlink").symlink_to(tmp_path)
    for bad in (["link"], ["dirlink/secret"]):
        with pytest.raises(BadAdminRequestError):
            transfer.ExportStream(str(src), transfer.check_paths(bad)).check()


@pytest.mark.parametrize(
    "kind", ["escape", "absolute", "symlink", "hardlink", "fifo", "through-symlink"]
)
def test_import_refuses_members_that_escape_or_are_not_files(tmp_path: Path, kind: str) -> None:
    dst = tmp_path / "user"
    dst.mkdir()
    (dst / "out").symlink_to(tmp_path)  # a planted symlink to the directory above
    info = tarfile.TarInfo(
        {
            "escape": "../evil",
            "absolute": "/tmp/evil",
            "symlink": "evil",
            "hardlink": "evil",
            "fifo": "evil",
            "through-symlink": "out/evil",
        }[kind]
    )
    data = b"pwned"
    info.size = len(data)
    if kind == "symlink":
        info.type, info.linkname, info.size = tarfile.SYMTYPE, "/etc/passwd", 0
    elif kind == "hardlink":
        info.type, info.linkname, info.size = tarfile.LNKTYPE, "/etc/passwd", 0
    elif kind == "fifo":
        info.type, info.size = tarfile.FIFOTYPE, 0
    with pytest.raises(BadAdminRequestError):
        transfer.import_tar(str(dst), _raw(_tar([(info, data)])))
    assert not (tmp_path / "evil").exists()
    assert sorted(p.name for p in dst.iterdir()) == ["out"]


def test_import_refuses_a_cut_stream_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    info = tarfile.TarInfo("big")
    info.size = 100_000
    whole = _tar([(info, b"y" * 100_000)]).getvalue()
    dst = tmp_path / "user"
    with pytest.raises(BadAdminRequestError, match="complete"):
        transfer.import_tar(str(dst), io.BytesIO(whole[:50_000]))  # type: ignore[arg-type]
    assert list(dst.iterdir()) == []


def test_prune_removes_files_and_empty_directories_never_outside(tmp_path: Path) -> None:
    user = tmp_path / "user"
    (user / "a" / "b").mkdir(parents=True)
    (user / "a" / "b" / "f").write_text("1")
    (user / "keep").write_text("2")
    (tmp_path / "victim").write_text("3")
    (user / "up").symlink_to(tmp_path)
    with pytest.raises(BadAdminRequestError):
        transfer.prune(str(user), transfer.check_paths(["up/victim"]))
    assert (tmp_path / "victim").exists()
    assert transfer.prune(str(user), transfer.check_paths(["a/b/f", "gone"])) == 1
    assert sorted(p.name for p in user.iterdir()) == ["keep", "up"]


def test_a_directory_that_cannot_be_listed_fails_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the walk skipped it silently, the manifest lacked its files, and the next pass
    pruned them on the target (a moved user lost a segment, exit 0)."""
    user = tmp_path / "u"
    (user / "seg").mkdir(parents=True)
    (user / "chroma.sqlite3").write_bytes(b"db")
    (user / "seg" / "data_level0.bin").write_bytes(b"index")
    real = os.scandir

    def scandir(path: object) -> object:
        if str(path).endswith("seg"):
            raise OSError(24, "Too many open files")
        return real(path)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(OSError):
        transfer.manifest(str(user))


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(member, io.BytesIO(data))
    return out.getvalue()


def test_import_bounds_extended_headers_names_and_times(tmp_path: Path) -> None:
    """Found in review: a pax header claiming GBs was read whole into memory; a file of
    a 250-byte name could not be imported (its temporary name was too long: a 500); an mtime
    of 10^30 ns overflowed (a 500)."""
    # A pax header announcing 8 GB: refused from its size, nothing read.
    head = tarfile.TarInfo("././@PaxHeader")
    head.type, head.size = tarfile.XHDTYPE, 8_000_000_000  # the largest a ustar size holds
    block = head.tobuf(format=tarfile.USTAR_FORMAT)
    with pytest.raises(BadAdminRequestError, match="extended tar header"):
        transfer.import_tar(str(tmp_path / "a"), io.BytesIO(block + bytes(1024)))  # type: ignore[arg-type]
    # A name of 250 bytes (ext4 allows 255).
    long = tarfile.TarInfo("n" * 250)
    long.size = 3
    transfer.import_tar(str(tmp_path / "b"), io.BytesIO(_tar_with(long, b"abc")))  # type: ignore[arg-type]
    assert (tmp_path / "b" / ("n" * 250)).read_bytes() == b"abc"
    # A time past what file times hold.
    late = tarfile.TarInfo("late")
    late.size, late.pax_headers = 1, {transfer.PAX_MTIME: str(10**30)}
    with pytest.raises(BadAdminRequestError, match="bad"):
        transfer.import_tar(str(tmp_path / "c"), io.BytesIO(_tar_with(late, b"x")))  # type: ignore[arg-type]
