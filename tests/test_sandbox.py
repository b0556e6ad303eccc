"""The second wall (issue 9, specs/replay.md §7): replay workers with no network, a read-only
filesystem, no capabilities, no_new_privs, seccomp and bounded memory; fail closed where it
cannot be set up; --no-sandbox says so; a worker that dies fails replay naming its segment."""

from __future__ import annotations

import ast
import io
import json
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from gradledger.verify._internal import sandbox, segments
from gradledger.verify._internal.replay import ReplayError
from gradledger.verify._internal.sandbox import SandboxSpec
from gradledger.verify._internal.worker import MAX_RESULT_FRAME, FrameError, frame, read_frame
from test_verify_cli import run_cli, world  # noqa: F401 - the module's honest run, as a fixture

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux namespaces")

ON = SandboxSpec(True, 1024)


def confined(code: str, spec: SandboxSpec = ON) -> tuple[int, str, str]:
    proc = sandbox.run_python(code, spec, timeout=120)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


# ---------------------------------------------------------------- the walls, from inside


def test_nothing_outside_can_be_written(tmp_path: Path) -> None:
    """Only the worker's private tmpfs (/dev/shm, dying with it) is writable: a file written there is
    not in the machine's /dev/shm, and nothing else can be created, not even in the test's own
    temporary directory (visible, read-only) or the machine's /tmp."""
    private = Path(sandbox.PRIVATE_TMP) / f"gradledger-sandbox-{tmp_path.name}"
    targets = [tmp_path / "escape", Path("/tmp/escape"), Path.cwd() / "escape", Path.home() / "escape",
               Path("/var/tmp/escape"), Path("/dev/escape"), Path("/escape")]
    code = (f"for p in {[str(p) for p in targets]!r}:\n"
            "    try:\n        open(p, 'w').write('x')\n    except OSError as e:\n        print('refused')\n"
            "    else:\n        print('WROTE', p)\n"
            f"open({str(private)!r}, 'w').write('x')\n"
            f"print('private', open({str(private)!r}).read())\n")
    rc, out, err = confined(code)
    assert rc == 0, err
    assert out.splitlines() == ["refused"] * len(targets) + ["private x"], out
    assert not any(p.exists() for p in [*targets, private])


def test_a_worker_started_in_tmp_reads_there_and_cannot_write(tmp_path: Path) -> None:
    """A directory under the machine's /tmp is visible and read-only: a verifier installed from a
    checkout under /tmp can import itself in its workers (a private tmpfs over /tmp hid it)."""
    (tmp_path / "module_here.py").write_text("VALUE = 42\n")
    # By its path, as an editable install names it (the working directory stays reachable as "."
    # whatever is mounted over its path).
    code = (f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nimport module_here\n"
            "print('imported', module_here.VALUE)\n"
            "try:\n    open('escape', 'w')\nexcept OSError as e:\n    print('refused', e.errno)\n")
    proc = sandbox.run_python(code, ON, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["imported", "42", "refused", "30"]
    assert not (tmp_path / "escape").exists()


def test_no_network_not_even_loopback() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        rc, out, err = confined(
            "import socket\n"
            f"for host in ('127.0.0.1', '10.0.0.1', '8.8.8.8', '::1'):\n"
            "    try:\n"
            f"        socket.create_connection((host, {port}), timeout=5)\n"
            "    except OSError as e:\n"
            "        print('refused', host)\n"
            "    else:\n"
            "        print('CONNECTED', host)\n"
            "try:\n"
            "    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "except OSError:\n"
            "    print('no unix sockets')\n")
        assert rc == 0, err
        assert "CONNECTED" not in out and out.count("refused") == 4 and "no unix sockets" in out, out
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the listener
    finally:
        listener.close()


def test_memory_is_bounded() -> None:
    rc, out, err = confined(
        "try:\n    b = bytearray(4 << 30)\nexcept MemoryError:\n    print('refused')\nelse:\n    print('ALLOCATED')\n",
        SandboxSpec(True, 512))
    assert rc == 0, err
    assert out.strip() == "refused"


def test_no_new_privileges_no_capabilities_alone_in_its_pid_namespace() -> None:
    rc, out, err = confined(
        "import os, resource\n"
        "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
        "print({k: status[k].strip() for k in ('NoNewPrivs', 'Seccomp', 'CapEff', 'CapBnd')})\n"
        "print('pid', os.getpid(), 'procs', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        "print('core', resource.getrlimit(resource.RLIMIT_CORE))\n"
        "print('as', resource.getrlimit(resource.RLIMIT_AS))\n"
        "try:\n    os.unshare\nexcept AttributeError:\n    pass\n"
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print('unshare', libc.unshare(0x10000000), 'mount', libc.mount(None, b'/', None, 32, None))\n")
    assert rc == 0, err
    lines = out.splitlines()
    assert eval(lines[0]) == {"NoNewPrivs": "1", "Seccomp": "2", "CapEff": "0" * 16, "CapBnd": "0" * 16}
    assert lines[1] == "pid 1 procs [1]", lines[1]  # the machine's other processes are not there
    assert lines[2] == "core (0, 0)"
    assert lines[3] == f"as ({1024 << 20}, {1024 << 20})"
    assert lines[4] == "unshare -1 mount -1"


def test_no_device_but_four_and_every_mount_read_only_but_the_private_tmpfs() -> None:
    rc, out, err = confined(
        "import os\n"
        "print(sorted(os.listdir('/dev')))\n"
        "mounts = [l.split()[4:6] for l in open('/proc/self/mountinfo')]\n"
        "print([t for t, o in mounts if 'ro' not in o.split(',')], "
        "[t for t, o in mounts if 'nodev' not in o.split(',')])\n"
        "for p in ('/proc/sysrq-trigger', '/proc/self/oom_score_adj', '/sys/kernel/mm/ksm/run', '/dev/null'):\n"
        "    try:\n        os.close(os.open(p, os.O_WRONLY))\n        print('opened', p)\n"
        "    except OSError as e:\n        print('refused', p)\n")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "['null', 'random', 'shm', 'urandom', 'zero']"
    assert lines[1] == "['/dev/shm'] ['/dev/null', '/dev/zero', '/dev/random', '/dev/urandom']"  # the private tmpfs
    assert lines[2:] == ["refused /proc/sysrq-trigger", "refused /proc/self/oom_score_adj",
                         "refused /sys/kernel/mm/ksm/run", "opened /dev/null"]


def test_the_seccomp_filter_checks_its_architecture() -> None:
    prog = sandbox.seccomp_program()
    assert prog[0] == (0x20, 0, 0, 4) and prog[1][3] == 0xC000003E and prog[2] == (0x06, 0, 0, 0x80000000)
    assert prog[-1] == (0x06, 0, 0, 0x7FFF0000)  # the only allow: everything not named before it


# ---------------------------------------------------------------- the verifier behind it


def test_an_honest_bundle_verifies_in_sandboxed_workers(world: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    bundle = _bundle(world, tmp_path)
    for workers in ("1", "2"):
        code, out = run_cli(bundle, world["roots"], "--workers", workers)
        assert code == 0 and out["verdict"] == "exact", out.get("first_failure")
        assert out["figures"]["sandbox"] == "namespaces+rlimits+seccomp"
        assert out["figures"]["sandbox_max_memory_mib"] == 8192


def test_a_worker_out_of_memory_fails_naming_its_segment(world: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    # 256 MiB of address space does not hold torch: the worker dies before its first answer.
    code, out = run_cli(_bundle(world, tmp_path), world["roots"], "--max-memory", "256")
    assert code == 1
    failure = out["first_failure"]
    assert failure["name"] == "replay" and "segment 0" in failure["detail"] and "replay worker" in failure["detail"]
    assert failure.get("step") == 0 and "seq" in failure


def test_no_sandbox_says_so_and_a_machine_without_one_is_unusable(world: dict[str, Any],  # noqa: F811
                                                                   tmp_path: Path) -> None:
    """Fail closed: the verifier run inside the sandbox cannot nest one (seccomp refuses unshare):
    exit 2, one line naming the cause and --no-sandbox; with --no-sandbox it verifies, saying so."""
    bundle, roots = _bundle(world, tmp_path).read_bytes(), Path(world["roots"]).read_bytes()
    # The inner verifier's inputs go to the private tmpfs, the one place the outer sandbox lets it write.
    code = ("import subprocess, sys\n"
            "data = sys.stdin.buffer.read()\n"
            f"open('/dev/shm/run.glb', 'wb').write(data[:{len(bundle)}])\n"
            f"open('/dev/shm/roots.pub', 'wb').write(data[{len(bundle)}:])\n"
            "args = [sys.executable, '-m', 'gradledger.verify.cli', '/dev/shm/run.glb', '--trust', '/dev/shm/roots.pub', '--json']\n"
            "for extra in ([], ['--no-sandbox']):\n"
            "    p = subprocess.run(args + extra, capture_output=True, text=True)\n"
            "    print(repr((p.returncode, p.stdout, p.stderr)))\n")
    proc = sandbox.run_python(code, SandboxSpec(True, 8192), stdin=bundle + roots, timeout=300)
    rc, out, err = proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    assert rc == 0, err
    (rc1, out1, err1), (rc2, out2, err2) = (ast.literal_eval(line) for line in out.splitlines())
    assert rc1 == 2 and out1 == "" and "Traceback" not in err1
    assert len(err1.strip().splitlines()) == 1, err1
    assert "sandbox cannot be set up" in err1 and "unshare" in err1 and "--no-sandbox" in err1
    assert rc2 == 0, (err2, json.loads(out2)["first_failure"])
    report = json.loads(out2)
    assert report["verdict"] == "exact" and report["figures"]["sandbox"] == "off"
    assert "sandbox_max_memory_mib" not in report["figures"]


def _bundle(world: dict[str, Any], tmp_path: Path) -> Path:  # noqa: F811
    from gradledger.ledger.bundle import export_bundle
    from gradledger.ledger.ledger import Ledger

    path = tmp_path / "run.glb"
    with Ledger.open(world["base"] / "a") as led:
        export_bundle(led, path, with_data=True)
    return path


# ---------------------------------------------------------------- hostile worker output


def test_a_frame_is_bounded_before_it_is_read() -> None:
    with pytest.raises(FrameError, match="exceeds the bound"):
        read_frame(io.BytesIO(struct.pack(">Q", 1 << 40)))
    with pytest.raises(FrameError, match="exceeds the bound"):
        read_frame(io.BytesIO(struct.pack(">Q", MAX_RESULT_FRAME + 1) + b"\x00" * 16))
    with pytest.raises(FrameError, match="cut short"):
        read_frame(io.BytesIO(frame({"a": 1})[:-1]))
    with pytest.raises(FrameError, match="cut short"):
        read_frame(io.BytesIO(b"\x00\x00\x00"))
    assert read_frame(io.BytesIO(b"")) is None
    assert read_frame(io.BytesIO(frame({"a": 1}))) == {"a": 1}


HOSTILE = {
    "killed": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "huge frame": "import struct, sys\nsys.stdout.buffer.write(struct.pack('>Q', 1 << 40)); sys.stdout.flush()\n",
    "wrong segment": "import sys\nfrom gradledger.verify._internal.worker import frame\n"
                     "sys.stdout.buffer.write(frame({'index': 7, 'ok': True, 'steps': 3, 'seconds': 0.0, 'reason': '',"
                     " 'seq': None, 'step': None, 'max_deviation': 0.0})); sys.stdout.flush()\n",
    "traceback": "raise RuntimeError('the program broke out')\n",
    "asks for another artifact": "import sys\nsys.stdout.buffer.write(frame({'artifact': bytes(32)})); "
                                 "sys.stdout.flush()\nsys.stdin.buffer.read()\n",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_or_dead_worker_fails_replay_naming_the_segment(kind: str, monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """Whatever a worker sends after its sandbox came up, the verifier reads at most a bounded
    frame, accepts only an answer for the segment due, and fails naming that segment."""
    from gradledger.verify._internal.replay import RunContext, Segment

    script = tmp_path / "worker.py"
    script.write_text("import sys\nfrom gradledger.verify._internal.worker import frame, read_frame\n"
                      "sys.stdout.buffer.write(frame({'sandbox': 'off'})); sys.stdout.flush()\n"
                      "read_frame(sys.stdin.buffer, 1 << 30)\n" + HOSTILE[kind])
    monkeypatch.setattr(segments, "worker_command", lambda spec: [sys.executable, str(script)])
    ctx = RunContext(1, b"p", b"i", {}, [], {}, {})
    jobs = [(ctx, Segment(i, 10 * i + 2, {"step": 3 * i}, 10 * i + 12, {"step": 3 * i + 3},
                          [(10 * i + 3 + k, {"step": 3 * i + k}) for k in range(3)])) for i in range(2)]
    with pytest.raises(ReplayError) as info:
        segments.run_jobs(jobs, "", lambda digest: None, exact=True, sandbox=SandboxSpec(enabled=False))
    assert info.value.args[0].startswith("segment 0 (from the checkpoint at observation 2): the replay worker")
    assert info.value.seq == 3 and info.value.step == 0
    if kind == "killed":
        assert "killed by SIGKILL" in info.value.args[0]
    if kind == "traceback":
        assert "RuntimeError: the program broke out" in info.value.args[0]
    if kind == "asks for another artifact":
        assert "asked for an artifact its segments do not name" in info.value.args[0]


def test_a_worker_that_does_not_confirm_its_sandbox_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gradledger.verify._internal.replay import RunContext, Segment

    script = tmp_path / "worker.py"
    script.write_text("import sys\nfrom gradledger.verify._internal.worker import frame\n"
                      "sys.stdout.buffer.write(frame({'sandbox': 'off'})); sys.stdout.flush()\n")
    monkeypatch.setattr(segments, "worker_command", lambda spec: [sys.executable, str(script)])
    job = (RunContext(1, b"p", b"i", {}, [], {}, {}), Segment(0, 2, {"step": 0}, 5, {"step": 1}, [(3, {"step": 0})]))
    with pytest.raises(ReplayError, match="did not confirm its sandbox"):
        segments.run_jobs([job], "", lambda digest: None, exact=True, sandbox=ON)
