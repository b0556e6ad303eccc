"""The second wall: replay workers in a sandbox (specs/replay.md §7).

The first wall is the strict program loader (no pickle, no exec). This one assumes it failed: a
replay worker runs in its own user, network, mount, IPC and PID namespaces, with every mount
read-only and nodev, a ``/dev`` of four harmless devices, a fresh read-only ``/proc`` that shows
only its own processes, no capabilities (bounding set empty), ``no_new_privs``, a seccomp filter
that refuses sockets, tracing, mounts and new namespaces, and rlimits on address space
(``--max-memory``), file size, core dumps and open files.

The worker applies it to itself, first thing, while its Python is still one thread (before torch
is imported; a multi-threaded process cannot enter a new user namespace) and before it reads its
task. Every step is checked after the fact (a file cannot be created, a socket cannot be opened,
the status shows no capabilities, ``NoNewPrivs: 1`` and a filter); where one cannot be set up
the worker refuses to replay and the verifier is unusable (exit 2), never silently unsandboxed.
``--no-sandbox`` is the only way to replay without it, and the report says so.

Only the standard library and libc (ctypes) are used: nothing to install. This module must not
import torch or anything that does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import re
import resource
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import Sequence

#: What the report's ``figures["sandbox"]`` says: the walls a sandboxed worker ran behind, or "off".
DESCRIPTION = "namespaces+rlimits+seccomp"
OFF = "off"

DEFAULT_MAX_MEMORY_MIB = 8192
#: The largest file a worker may write (only in its PRIVATE_TMP, of TMP_BYTES in all).
MAX_FILE_BYTES = 64 << 20
TMP_BYTES = 64 << 20
MAX_OPEN_FILES = 256
#: Processes and threads (counted in the worker's own user namespace): no fork bomb.
MAX_TASKS = 256
#: Exit status of a worker whose sandbox could not be set up (its last stderr line says why).
EXIT_NO_SANDBOX = 3

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
#: Every namespace flag clone() knows (NEWTIME, NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET).
CLONE_NAMESPACES = 0x00000080 | 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4

PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 24, 22, 38
PR_SET_SECUREBITS = 28
#: NOROOT, NO_SETUID_FIXUP and KEEP_CAPS off, NO_CAP_AMBIENT_RAISE on, each locked.
SECUREBITS = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
SECCOMP_MODE_FILTER = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522

#: x86_64 system calls a replay never needs, refused with EPERM by the seccomp filter: sockets of
#: any family (a read-only filesystem still lets a process connect to a unix socket such as a
#: container daemon's), tracing and other processes' memory, mounts, namespaces, keyrings, BPF,
#: perf, userfaultfd, io_uring, handles, kexec and modules, swap, reboot, accounting, syslog.
_X86_64 = {
    "arch": 0xC000003E,
    "clone": 56,
    "clone3": 435,
    "deny": {
        "socket": 41, "socketpair": 53, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
        "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321, "perf_event_open": 298,
        "userfaultfd": 323, "io_uring_setup": 425, "open_by_handle_at": 304, "name_to_handle_at": 303,
        "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
        "delete_module": 176, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442, "swapon": 167, "swapoff": 168, "reboot": 169,
        "acct": 163, "syslog": 103,
    },
}
#: The only devices a worker can open (a private /dev holds nothing else but PRIVATE_TMP).
DEVICES = ("null", "zero", "random", "urandom")
#: The one writable place: a private tmpfs inside the private /dev. Not over /tmp: that would
#: hide whatever lives under the machine's /tmp, a checkout the verifier was installed from
#: included (the worker could not import it).
PRIVATE_TMP = "/dev/shm"
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (new system calls are unified)


class SandboxError(Exception):
    """The sandbox could not be set up, or a check after setting it up found a wall missing."""


@dataclass(frozen=True)
class SandboxSpec:
    """How replay workers are confined: ``enabled`` False is ``--no-sandbox``."""

    enabled: bool = True
    max_memory_mib: int = DEFAULT_MAX_MEMORY_MIB

    @property
    def description(self) -> str:
        return DESCRIPTION if self.enabled else OFF

    def worker_args(self) -> list[str]:
        """The arguments that tell ``python -m gradledger.verify._internal.worker`` how to confine itself."""
        if not self.enabled:
            return ["--no-sandbox"]
        return ["--sandbox", "--max-memory", str(self.max_memory_mib)]


def parse_args(argv: Sequence[str]) -> SandboxSpec:
    """The worker's own arguments (``worker_args``); anything else is refused (a usage error)."""
    if list(argv) == ["--no-sandbox"]:
        return SandboxSpec(enabled=False)
    if len(argv) == 3 and argv[0] == "--sandbox" and argv[1] == "--max-memory" and argv[2].isdigit():
        return SandboxSpec(True, int(argv[2]))
    raise SandboxError(f"usage: worker --sandbox --max-memory MIB | --no-sandbox (got {' '.join(argv)!r})")


# -------------------------------------------------------------------------------------------------
# Entering the sandbox (the worker, first thing).


def _libc() -> ctypes.CDLL:
    name = ctypes.util.find_library("c") or "libc.so.6"
    return ctypes.CDLL(name, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what} failed: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")
    return ret


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter(spec: SandboxSpec) -> str:
    """Confine this process (and what it forks) as ``spec`` says; what the report may claim.

    Must be called while the process has one thread. With ``spec.enabled`` it forks once (the
    worker proper is PID 1 of its own PID namespace); the parent of that fork only waits and exits
    as its child did, and never returns from here.
    """
    if not spec.enabled:
        return OFF
    try:
        return _enter(spec)
    except OSError as exc:
        raise SandboxError(f"{exc.filename or 'setting up the sandbox'}: {exc.strerror or exc}") from None


def _enter(spec: SandboxSpec) -> str:
    if sys.platform != "linux":
        raise SandboxError(f"the replay sandbox needs Linux namespaces; this is {sys.platform}")
    if platform.machine() not in ("x86_64", "AMD64"):
        raise SandboxError(f"the replay sandbox's seccomp filter is written for x86_64; this is {platform.machine()}")
    if threads() != 1:
        raise SandboxError(f"the worker has {threads()} threads; a new user namespace needs one")
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID),
           "unshare(user, mount, network, IPC and PID namespaces)")
    # Map only ourselves: root inside stands for this user outside, and nobody else exists.
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")
    # Nothing done to mounts here propagates back out, and nothing from outside comes in.
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making every mount private")
    _fork_into_pid_namespace(libc)
    # From here on: the worker, PID 1 of its PID namespace.
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    _private_dev(libc)
    _read_only(libc)
    _private_tmp(libc)
    # A /proc of this PID namespace: the machine's other processes (and their memory) are not in
    # it. Read-only: no write to /proc/sysrq-trigger or the like (root inside is root's uid outside).
    _check(libc.mount(b"proc", b"/proc", b"proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
           "mounting a private /proc")
    _drop_capabilities(libc)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _limits(spec)
    _seccomp(libc)
    verify_confined()
    return DESCRIPTION


def threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _fork_into_pid_namespace(libc: ctypes.CDLL) -> None:
    """Fork: the child is PID 1 of the new PID namespace and returns; this process waits and exits."""
    pid = os.fork()
    if pid == 0:
        return
    # The waiting parent keeps neither end of the worker's pipes, and exits as the worker did.
    os.close(0)
    os.close(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128)


def _private_dev(libc: ctypes.CDLL) -> None:
    """/dev replaced by a small tmpfs holding only null, zero, random and urandom (bind mounts of
    the machine's; torch reads /dev/urandom): no disk, terminal or other device is there to open."""
    fds = {name: os.open(f"/dev/{name}", os.O_PATH) for name in DEVICES}
    try:
        _check(libc.mount(b"tmpfs", b"/dev", b"tmpfs", MS_NOSUID | MS_NOEXEC, b"size=64k,nr_inodes=16,mode=755"),
               "mounting a private /dev")
        for name, fd in fds.items():
            os.close(os.open(f"/dev/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            _check(libc.mount(f"/proc/self/fd/{fd}".encode(), f"/dev/{name}".encode(), None, MS_BIND, None),
                   f"binding /dev/{name}")
        os.mkdir(PRIVATE_TMP, 0o700)  # the mount point of _private_tmp, made while /dev is writable
    finally:
        for fd in fds.values():
            os.close(fd)


def _private_tmp(libc: ctypes.CDLL) -> None:
    """PRIVATE_TMP: a small private tmpfs, the only writable place (torch's loader wants a
    temporary directory), gone with the worker; TMPDIR points there. Its size bounds what a
    worker can hold outside its address space. The machine's /tmp stays visible, read-only."""
    _check(libc.mount(b"tmpfs", PRIVATE_TMP.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      f"size={TMP_BYTES},nr_inodes=1024,mode=700".encode()), f"mounting a private {PRIVATE_TMP}")
    os.environ["TMPDIR"] = PRIVATE_TMP
    import tempfile

    tempfile.tempdir = None  # chosen afresh, from TMPDIR


def _read_only(libc: ctypes.CDLL) -> None:
    """Every mount read-only, nosuid and nodev, recursively (mount_setattr, Linux 5.12+), but for
    the four devices of ``_private_dev``, which stay devices.

    nodev: a read-only mount still lets a process write to a device node (a disk, say); with
    nodev no device node can be opened at all."""
    everything = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
    if _setattr(libc, "/", AT_RECURSIVE, everything, 0):
        for name in DEVICES:
            if not _setattr(libc, f"/dev/{name}", 0, 0, MOUNT_ATTR_NODEV):
                raise SandboxError(f"letting /dev/{name} be opened failed: {os.strerror(ctypes.get_errno())}")
        return
    err = ctypes.get_errno()
    why = "Linux 5.12 or later has it" if err == errno.ENOSYS else os.strerror(err)
    raise SandboxError(f"mount_setattr (making every mount read-only) failed: {why}")


def _setattr(libc: ctypes.CDLL, path: str, flags: int, attr_set: int, attr_clr: int) -> bool:
    attr = struct.pack("=QQQQ", attr_set, attr_clr, 0, 0)  # struct mount_attr (propagation, userns_fd: 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    return libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, buf, len(attr)) == 0


def _mountinfo() -> list[dict]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # \040 is a space
            fstype = fields[fields.index("-") + 1]
            out.append({"id": fields[0], "target": target, "options": set(fields[5].split(",")), "fstype": fstype})
    return out


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities(libc: ctypes.CDLL) -> None:
    """No capability, now or after an exec: the bounding set emptied, root given no special treatment."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap} from the bounding set")
    _check(libc.prctl(PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0), "prctl(PR_SET_SECUREBITS)")
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(libc.capset(ctypes.byref(header), data), "capset (dropping every capability)")


def _limits(spec: SandboxSpec) -> None:
    memory = spec.max_memory_mib * (1 << 20)
    for name, value in (("RLIMIT_AS", memory), ("RLIMIT_FSIZE", MAX_FILE_BYTES), ("RLIMIT_CORE", 0),
                        ("RLIMIT_NOFILE", MAX_OPEN_FILES), ("RLIMIT_NPROC", MAX_TASKS)):
        limit = getattr(resource, name)
        try:
            soft, hard = resource.getrlimit(limit)
            new = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(limit, (new, new))
        except (OSError, ValueError) as exc:
            raise SandboxError(f"setting {name} to {value} failed: {exc}") from None
    # A write past RLIMIT_FSIZE fails with EFBIG instead of killing the worker.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program() -> list[tuple[int, int, int, int]]:
    """The filter, as (code, jt, jf, k) BPF instructions over ``struct seccomp_data``."""
    ld, jeq, jge, and_, ret = 0x20, 0x15, 0x35, 0x54, 0x06
    allow, kill, eperm, enosys = 0x7FFF0000, 0x80000000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    table = _X86_64
    prog = [
        (ld, 0, 0, 4),  # arch
        (jeq, 1, 0, table["arch"]),
        (ret, 0, 0, kill),
        (ld, 0, 0, 0),  # nr
        (jge, 0, 1, 0x40000000),  # the x32 ABI: none of it
        (ret, 0, 0, eperm),
    ]
    for nr in sorted(table["deny"].values()):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    # clone3 passes its flags in memory, out of a filter's reach: ENOSYS makes libc fall back to
    # clone, whose flags are checked: threads and processes yes, new namespaces no.
    prog += [(jeq, 0, 1, table["clone3"]), (ret, 0, 0, enosys)]
    prog += [
        (jeq, 0, 4, table["clone"]),
        (ld, 0, 0, 16),  # args[0], low 32 bits: the flags
        (and_, 0, 0, CLONE_NAMESPACES),
        (jeq, 1, 0, 0),
        (ret, 0, 0, eperm),
        (ret, 0, 0, allow),
    ]
    return prog


def _seccomp(libc: ctypes.CDLL) -> None:
    prog = seccomp_program()
    filters = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), filters)
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "installing the seccomp filter")


def verify_confined() -> None:
    """Check each wall from inside; raise SandboxError naming the first one missing."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    if status.get("NoNewPrivs") != "1":
        raise SandboxError("no_new_privs is not set")
    if status.get("Seccomp") != "2":
        raise SandboxError("no seccomp filter is installed")
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        if int(status.get(cap, "1"), 16) != 0:
            raise SandboxError(f"capabilities remain ({cap} {status.get(cap)})")
    if os.getpid() != 1:
        raise SandboxError("the worker is not alone in its PID namespace")
    # "." is the working directory the worker was started in; the private tmpfs is not probed.
    for probe in ("/", "/tmp", "/var/tmp", "/dev", ".", os.path.expanduser("~")):
        if os.path.realpath(probe) == PRIVATE_TMP:
            continue
        path = os.path.join(probe, f".gradledger-sandbox-probe-{os.getpid()}")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError:
            continue
        os.unlink(path)
        raise SandboxError(f"{os.path.abspath(probe)} is writable")
    writable = []
    for mount in _mountinfo():
        devices_ok = mount["target"] in {f"/dev/{name}" for name in DEVICES}
        if "ro" not in mount["options"]:
            writable.append(mount)
        if not (devices_ok or "nodev" in mount["options"]):
            raise SandboxError(f"{mount['target']} is mounted without nodev")
    # One writable mount: the private tmpfs (of TMP_BYTES).
    tmp = os.statvfs(PRIVATE_TMP)
    if [(m["target"], m["fstype"]) for m in writable] != [(PRIVATE_TMP, "tmpfs")] or \
            tmp.f_blocks * tmp.f_frsize != TMP_BYTES:
        raise SandboxError(f"writable mounts: {[m['target'] for m in writable]}")
    if sorted(os.listdir("/dev")) != sorted([*DEVICES, os.path.basename(PRIVATE_TMP)]):
        raise SandboxError(f"/dev holds {sorted(os.listdir('/dev'))}")
    import socket

    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except OSError:
        pass
    else:
        raise SandboxError("a socket can be opened")
    if resource.getrlimit(resource.RLIMIT_CORE)[1] != 0:
        raise SandboxError("core dumps are allowed")


# -------------------------------------------------------------------------------------------------
# The parent's side.


def run_python(code: str, spec: SandboxSpec, *, stdin: bytes = b"", timeout: float | None = None,
               cwd: str | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``code`` with this machine's Python behind the same walls as a replay worker (for tests).

    The snippet runs after ``enter(spec)``, in the confined process; its result is the process's.
    """
    boot = ("import sys\n"
            "from gradledger.verify._internal import sandbox\n"
            "spec = sandbox.parse_args(sys.argv[1:])\n"
            "try:\n"
            "    sandbox.enter(spec)\n"
            "except sandbox.SandboxError as exc:\n"
            "    print(f'sandbox: {exc}', file=sys.stderr); sys.exit(sandbox.EXIT_NO_SANDBOX)\n"
            "del sandbox, spec\n")
    return subprocess.run([sys.executable, "-c", boot + code, *spec.worker_args()], input=stdin,
                          capture_output=True, timeout=timeout, env=worker_env(), cwd=cwd)


#: What a worker inherits of the verifier's environment: what Python, torch and its math
#: libraries read, nothing else (no credentials, tokens or proxies for a worker to see). TMPDIR
#: and its kin matter to a --no-sandbox worker only: a sandboxed one points TMPDIR at its own.
ENV_NAMES = ("PATH", "HOME", "LANG", "TZ", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "TMPDIR", "TEMP", "TMP")
ENV_PREFIXES = ("LC_", "PYTHON", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "DNNL_", "ONEDNN_", "TORCH_",
                "ATEN_", "PYTORCH_", "CUBLAS_", "CUDA_")


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ENV_NAMES or k.startswith(ENV_PREFIXES)}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env
