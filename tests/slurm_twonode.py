"""A real two-node SLURM cluster on one machine, for the multi-node sbatch tests (tests/scripts/slurm/test_slurm_twonode.py).

Each node is a set of fresh Linux namespaces held open by a small init process (PID 1 of its own PID namespace):
- network: the two nodes are joined by one veth pair on a private subnet that exists only inside these
  namespaces (nothing is added to the machine's own network, and the namespaces reach no other address);
- UTS: the node's host name is its SLURM node name (slurmd -N name, and what `hostname` says in a task);
- mount: /etc/hosts is bind-mounted with the nodes' addresses, so that the tasks resolve the first node's name
  (MASTER_ADDR) and their own (gloo binds to the address of its host name); the machine's file is not touched;
- PID: when the init process ends, the kernel kills every process left in the node (daemons, job steps, tasks),
  and the namespaces, the veth pair and the mounts go with the last of them.
slurmctld runs on the first node (the head node). Each node runs its own munged with the cluster's key, its folder
mounted on the one slurm.conf names (the test's clients use the first node's). Client commands (sbatch, scontrol,
...) run in the first node's network, from the caller's folder.
If the test process is killed, the inits read EOF on their stdin and end: nothing is left behind.
The shared settings (authentication, plugins, scheduling, credential lifetime) are tests/slurm_cluster.py's.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.slurm_cluster import KILL_WAIT, SlurmCluster, _which

NODES = ("hmsa-node1", "hmsa-node2")
# A private subnet that only exists on the veth pair between the two namespaces (any machine-wide use of it is
# invisible from inside them, and theirs from outside).
SUBNET = "10.213.7"
CTLD_PORT, SLURMD_PORT = 6817, 6818  # free by construction: nothing else listens in these network namespaces
# slurm.conf keys of the one-node cluster that name its single node, address or per-node files: replaced here.
NODE_KEYS = ("SlurmctldHost", "SlurmctldPort", "SlurmdPort", "SlurmdSpoolDir", "SlurmdPidFile", "SlurmdLogFile",
             "NodeName", "PartitionName")

NS_FILE = {"mount": "mnt"}  # nsenter's option -> the file in /proc/PID/ns

# PID 1 of a node: name the host, make the bind mounts (SOURCE TARGET pairs), bring up loopback, say "ready", then
# reap the processes the namespace adopts (slurmstepd daemonizes) until its stdin closes: the owner ended or died.
_INIT = r"""
import os, signal, socket, subprocess, sys
name, mount, ip, *binds = sys.argv[1:]
socket.sethostname(name)
for source, target in zip(binds[::2], binds[1::2]):
    subprocess.run([mount, "--bind", source, target], check=True)
subprocess.run([ip, "link", "set", "lo", "up"], check=True)
def reap(*_):
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
signal.signal(signal.SIGCHLD, reap)
print("ready", flush=True)
while os.read(0, 1):
    pass
"""


class NamespaceError(RuntimeError):
    """Creating the nodes' namespaces or their network failed (the message names the command and its error)."""


def _checked(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NamespaceError(f"`{' '.join(argv)}` failed ({proc.returncode}): "
                             + (proc.stderr.strip().splitlines() or ["no message"])[-1])


def namespace_problem() -> str | None:
    """None where this process can create the namespaces and the veth pair the cluster needs; else one line
    naming the command that failed and its error (e.g. in a container without CAP_SYS_ADMIN)."""
    for tool in ("unshare", "nsenter", "ip", "mount"):
        try:
            _which(tool)
        except FileNotFoundError as e:
            return str(e)
    argv = [_which("unshare"), "--net", "--uts", "--mount", "--pid", "--fork", "--mount-proc",
            _which("ip"), "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"]
    try:
        _checked(argv)
    except (NamespaceError, subprocess.SubprocessError) as e:
        return str(e)
    return None


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (read from /proc: the machine's ids)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # ended meanwhile
            continue
        # the command name may hold spaces and parentheses: the parent id is the second field after the last ')'
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


class Node:
    """One node's namespaces, held by an init process started through `unshare`."""

    def __init__(self, name: str, addr: str, binds: list[tuple[Path, Path]], log: Path) -> None:
        """`binds`: (source, target) bind mounts made in the node's own mount namespace."""
        self.name, self.addr = name, addr
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [_which("unshare"), "--net", "--uts", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
                 sys.executable, "-c", _INIT, name, _which("mount"), _which("ip"),
                 *[str(p) for pair in binds for p in pair]],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        line = self.proc.stdout.readline()  # blocks until the init is ready, or ends (EOF) when it failed
        if line.strip() != b"ready":
            self.close()
            raise NamespaceError(f"node {name}: the namespaces' init failed: {log.read_text(errors='replace')}")
        kids = _children(self.proc.pid)  # unshare forked the init (PID 1 inside): the namespaces are the child's
        if len(kids) != 1:
            self.close()
            raise NamespaceError(f"node {name}: expected one child of unshare ({self.proc.pid}), found {kids}")
        self.init = kids[0]

    def enter(self, *kinds: str) -> list[str]:
        """An nsenter prefix entering this node's namespaces of `kinds` (net, uts, mount, pid)."""
        return [_which("nsenter"), *[f"--{k}=/proc/{self.init}/ns/{NS_FILE.get(k, k)}" for k in kinds]]

    def close(self, timeout: float = 30.0) -> None:
        """End the init (EOF on its stdin), so that the kernel kills what is left in the node; the namespaces,
        the veth end and the mounts go with their last process. unshare --kill-child covers an init that hangs."""
        self.proc.stdin.close()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc.stdout.close()


class TwoNodeCluster(SlurmCluster):
    """hmsa-node1 (slurmctld + slurmd) and hmsa-node2 (slurmd), each with `cpus` CPUs and `gpus` count-only GPUs."""

    def __init__(self, root: str | os.PathLike, cpus: int = 1, gpus: int = 1) -> None:
        super().__init__(root, cpus, gpus)
        self.nodes = list(NODES)
        self.node = self.nodes[0]
        self.addrs = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(self.nodes)}
        self.hosts = self.root / "hosts"
        self.ns: dict[str, Node] = {}

    @property
    def head(self) -> Node:
        return self.ns[self.nodes[0]]

    # ------------------------------------------------------------------------------------------- set-up

    def _write_conf(self) -> None:
        """The one-node cluster's slurm.conf with its node-specific lines replaced by the two nodes'."""
        super()._write_conf()
        r = self.root
        kept = [line for line in self.conf.read_text().splitlines() if line.split("=", 1)[0] not in NODE_KEYS]
        head = self.nodes[0]
        self.ctld_port, self.slurmd_port = CTLD_PORT, SLURMD_PORT
        kept += [
            f"SlurmctldHost={head}({self.addrs[head]})",
            f"SlurmctldPort={CTLD_PORT}",
            f"SlurmdPort={SLURMD_PORT}",
            # %n: the node's name, so that the two slurmd keep their state, pid and log apart
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            *[f"NodeName={n} NodeAddr={a} CPUs={self.cpus} Gres=gpu:{self.gpus} State=UNKNOWN"
              for n, a in self.addrs.items()],
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(kept) + "\n")
        files = f"{r / 'dev'}/gpu[0-{self.gpus - 1}]" if self.gpus > 1 else f"{r / 'dev'}/gpu0"
        (r / "gres.conf").write_text(
            "AutoDetect=off\n" + "".join(f"NodeName={n} Name=gpu File={files}\n" for n in self.nodes))
        self.hosts.write_text("127.0.0.1 localhost\n::1 localhost\n"
                              + "".join(f"{a} {n}\n" for n, a in self.addrs.items()))

    def _network(self) -> None:
        """One veth pair, created in the first node's namespace with its peer placed straight into the second's
        (it never exists in the machine's own namespace); addresses on the private subnet; links up."""
        first, second = (self.ns[n] for n in self.nodes)
        _checked([*first.enter("net"), _which("ip"), "link", "add", "hmsa0", "type", "veth", "peer", "name",
                  "hmsa1", "netns", str(second.init)])
        for node, dev in ((first, "hmsa0"), (second, "hmsa1")):
            _checked([*node.enter("net"), _which("ip"), "addr", "add", f"{node.addr}/24", "dev", dev])
            _checked([*node.enter("net"), _which("ip"), "link", "set", dev, "up"])

    def munge_dir(self, name: str) -> Path:
        """The folder of the node's own munged, as this process sees it. Inside the node it is mounted on the
        cluster's munge folder, whose socket slurm.conf names: each node has its own munged (with the cluster's
        key), as on a real cluster, so no credential is decoded twice by one munged (a replay, which upstream SLURM
        22.05 refuses unless built with --enable-multiple-slurmd)."""
        return self.root / "munge" if name == self.nodes[0] else self.root / f"munge-{name}"

    def start(self, timeout: float = 60.0) -> None:
        """Namespaces and network (NamespaceError on failure), then a munged on each node, slurmctld on the first
        and a slurmd on each; waits until both nodes are idle. On failure, everything started is stopped."""
        self._write_munge()
        self._write_conf()
        m = self.root / "munge"
        for name in self.nodes[1:]:
            self.munge_dir(name).mkdir(mode=0o700)
            shutil.copy2(m / "munge.key", self.munge_dir(name) / "munge.key")
        try:
            for name in self.nodes:
                binds = [(self.hosts, Path("/etc/hosts"))]
                if self.munge_dir(name) != m:
                    binds.append((self.munge_dir(name), m))
                self.ns[name] = Node(name, self.addrs[name], binds, self.root / "log" / f"init-{name}.log")
            self._network()
            # Every daemon runs in its node's PID namespace: it ends with the node, even if this process is killed.
            inside = ("net", "uts", "mount", "pid")
            for name in self.nodes:
                self._spawn(f"munged-{name}", [
                    *self.ns[name].enter(*inside), _which("munged"), "--foreground", "--force",
                    f"--socket={self.socket}", f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                    f"--seed-file={m / 'munged.seed'}",
                ])
                socket_file = self.munge_dir(name) / self.socket.name
                self._wait(socket_file.exists, 10, f"the munged of {name} to open its socket")
            self._spawn("slurmctld", [*self.head.enter(*inside), _which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: "UP" in self.run("scontrol", "ping", check=False).stdout, timeout,
                       "slurmctld to answer")
            for name in self.nodes:
                # -N: the node's name in slurm.conf (also its host name inside the namespace)
                self._spawn(f"slurmd-{name}", [*self.ns[name].enter(*inside), _which("slurmd"), "-D", "-f",
                                               str(self.conf), "-N", name])
            self._wait(lambda: self.node_states() == {n: "idle" for n in self.nodes}, timeout,
                       "both nodes to be idle")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel what is left and wait until the slurmds have ended it; stop the daemons (SIGTERM to the process
        group each was started in: nsenter does not forward signals to the daemon it forked); end the nodes'
        inits, which takes the namespaces, the veth pair, the mounts and any stray process with them."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            self.run("scancel", "--full", "--user", os.environ.get("USER") or "root", check=False)
            end = time.time() + getattr(self, "kill_wait", KILL_WAIT) + 30
            while self.unfinished_jobs() and time.time() < end:
                time.sleep(0.5)
        for name in [*(f"slurmd-{n}" for n in self.nodes), "slurmctld", *(f"munged-{n}" for n in self.nodes)]:
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        for name in list(self.ns):
            self.ns.pop(name).close()

    # ------------------------------------------------------------------------------------------- clients

    def run(self, *argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A client command in the first node's network and host name; the caller's folder and files stay (no
        mount namespace is entered)."""
        return super().run(*self.head.enter("net", "uts"), _which(argv[0]), *argv[1:], check=check, **kwargs)

    def node_states(self) -> dict[str, str]:
        proc = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return {n: s.rstrip("*~#").lower() for n, s in re.findall(r"(\S+) (\S+)", proc.stdout)}

    def node_state(self) -> str:
        return self.node_states().get(self.node, "")


def _signal_group(pgid: int, sig: int) -> None:
    """`sig` to the process group `pgid` (a daemon started with start_new_session: its nsenter and the daemon)."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
