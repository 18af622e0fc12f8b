"""A real Flower deployment on this machine: one SuperLink and one SuperNode per site, TLS and
SuperNode authentication on, each site with its own data directory and budget.

    fedrec localhost SITE_DIR [SITE_DIR ...] --rounds 2 --set local-steps=10

runs the same ServerApp/ClientApp as ``fedrec simulate`` through Flower's Deployment Engine,
one SuperNode per site folder (``fedrec client prepare`` writes one from a site's export;
``python -m simulations.partition`` writes simulated ones):
``fedrec credentials`` makes a CA, the SuperLink's certificate and one key pair per site;
``flower-superlink --enable-supernode-auth`` starts;
each site's public key is registered with ``flwr supernode register``; ``flower-supernode``
starts per site with ``--node-config data-dir=...``; ``flwr run . <connection>`` submits the
run. The README's "Deploy on premise" section gives the same steps as shell commands. Every
process started here is stopped on exit, also on failure (they detach into their own sessions,
so their whole process trees are tracked, not just their groups).

Each site runs as ``fedrec client superexec`` documents: its SuperNode with ``--isolation
process`` and its own SuperExec, which forks each ClientApp from preloaded imports (Flower
starts one ClientApp process per message).

Each SuperNode reaches the SuperLink through a byte-counting TCP relay, so the bytes each site
sent and received (TLS records included) are measured on the wire, not estimated.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from common.config import PROJECT_DIR
from deployment.credentials import make_node_key, make_tls

BIN = Path(sys.executable).parent  # flower-superlink etc. live beside this interpreter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (Flower detaches its SuperExec processes into their
    own sessions, so process groups miss them); [] if it is gone."""
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def signal_all(processes: list[psutil.Process], sig: int) -> None:
    for p in processes:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


class ByteCounter:
    """A TCP relay 127.0.0.1:<port> → target that counts bytes in each direction."""

    def __init__(self, target_port: int):
        self.target_port, self.up, self.down = target_port, 0, 0
        self.port = 0
        self.lock = threading.Lock()
        self.listen()

    def listen(self):
        """Accept connections (again, on the same port after ``close``)."""
        self.server = socket.create_server(("127.0.0.1", self.port))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def _accept(self, server: socket.socket):
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the SuperLink is down (stopping): the node sees a refused connection
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, "down"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self.lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread, which then ends
        except OSError:
            pass
        self.server.close()


class LocalDeployment:
    """Start with ``with LocalDeployment(root, sites) as d:``; ``d.run(overrides)`` submits a run."""

    def __init__(self, root: Path, data_dirs: list[Path], register: int | None = None,
                 budgets: list[tuple[float, float]] | None = None, trusted_entities: dict[int, Path] | None = None):
        # Absolute: the processes started here run in ``root``, and read these paths from there.
        self.root, self.data_dirs = Path(root).resolve(), [Path(d).resolve() for d in data_dirs]
        self.trusted_entities = trusted_entities or {}  # site → its --trusted-entities YAML (keys it trusts)
        self.budgets = budgets  # each site's (ε_max, δ), given through --node-config (else its budget.json)
        self.register = len(data_dirs) if register is None else register
        self.certs, self.logs = root / "certs", root / "logs"
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []
        self.counters: dict[str, ByteCounter] = {}
        self.runtime_ports: dict[str, int] = {}
        self.env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    # -- processes ---------------------------------------------------------------------------

    def start(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                env={**self.env, **(env or {})}, cwd=self.root, start_new_session=True)
        log.close()
        self.processes.append(proc)
        return proc

    def stop(self) -> None:
        """SIGTERM every process started here and all their descendants, then SIGKILL stragglers."""
        tree = [p for proc in self.processes for p in process_tree(proc.pid)]
        signal_all(tree, signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=10)
        signal_all(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
        for proc in self.processes:
            proc.poll()  # reap
        for counter in self.counters.values():
            counter.close()

    def __enter__(self):
        try:
            self.up()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- the deployment ----------------------------------------------------------------------

    def up(self) -> None:
        make_tls(self.certs, ["localhost", "127.0.0.1"])
        (self.root / "flwr-home").mkdir(parents=True, exist_ok=True)
        (self.root / "flwr-home" / "config.toml").write_text(
            '[superlink]\ndefault = "onprem"\n\n[superlink.onprem]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n')
        self.start_superlink()
        for k, data_dir in enumerate(self.data_dirs):
            name = f"site-{k}"
            public = make_node_key(self.certs / "nodes", name)
            if k < self.register:
                self.flwr("supernode", "register", str(public), "onprem")
            self.start_site(name, data_dir, budget=self.budgets[k] if self.budgets else None,
                            trusted_entities=self.trusted_entities.get(k))

    def start_superlink(self) -> None:
        self.superlink = self.start(
            "superlink", "flower-superlink", "--ssl-ca-certfile", str(self.certs / "ca.crt"),
            "--ssl-certfile", str(self.certs / "server.pem"), "--ssl-keyfile", str(self.certs / "server.key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--port", str(self.port), "--database", str(self.root / "superlink.db"))
        self.wait_for_port(self.port, "superlink")

    def crash_superlink(self) -> None:
        """SIGKILL the SuperLink and the ServerApp it runs (the server machine dies), then start
        it again on its database: registered node keys and the SuperNodes' sessions come back.

        While it is down the relays stop listening too, so the SuperNodes see what they would
        see without them, a refused connection (which they retry), not a TLS stream cut short."""
        for counter in self.counters.values():
            counter.close()
        tree = process_tree(self.superlink.pid)
        signal_all(tree, signal.SIGKILL)
        psutil.wait_procs(tree, timeout=30)
        self.superlink.wait()
        self.start_superlink()
        for counter in self.counters.values():
            counter.listen()

    def start_site(self, name: str, data_dir: Path, *, approvals: tuple[Path, Path] | None = None,
                   **supernode) -> None:
        """A site as a site runs it: its SuperNode with ``--isolation process`` and its own
        SuperExec (``fedrec client superexec``), which forks each message's ClientApp from a
        process that already imported torch, Opacus, PEFT and transformers. With ``approvals``
        (a folder of approvals, a trusted-keys YAML) it runs only bundles those keys signed."""
        self.start_supernode(name, data_dir, isolation="process", **supernode)
        pin = ["--approvals", str(approvals[0]), "--trusted-keys", str(approvals[1])] if approvals else ["--any-bundle"]
        # The sites share this machine's cores, as simulated clients do (one core each in Ray):
        # a site's torch threads get its share, not all of them (oversubscribed, they spin).
        threads = str(max(1, (os.cpu_count() or 1) // max(1, len(self.data_dirs))))
        self.start(f"{name}-superexec", "fedrec", "client", "superexec", "--insecure",
                   "--runtime-api-address", f"127.0.0.1:{self.runtime_ports[name]}", *pin,
                   env={"OMP_NUM_THREADS": threads})

    def start_supernode(self, name: str, data_dir: Path, *, ca: bool = True, key: str | None = None,
                        max_retries: int | None = None, budget: tuple[float, float] | None = None,
                        trusted_entities: Path | None = None, isolation: str = "subprocess") -> subprocess.Popen:
        """``flower-supernode`` for one site, reaching the SuperLink through a byte counter (with
        ``isolation="subprocess"`` it starts each ClientApp itself, importing everything anew)."""
        counter = self.counters[name] = ByteCounter(self.port)
        node_config = f'data-dir="{Path(data_dir).resolve()}"' + (f" epsilon-max={budget[0]} delta={budget[1]}" if budget else "")
        self.runtime_ports[name] = free_port()  # where its ClientApps (or the site's SuperExec) reach it
        args = ["flower-supernode", "--superlink", f"127.0.0.1:{counter.port}",
                "--auth-supernode-private-key", str(self.certs / "nodes" / (key or name)),
                "--port", str(self.runtime_ports[name]), "--node-config", node_config, "--isolation", isolation]
        if ca:
            args += ["--root-certificates", str(self.certs / "ca.crt")]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries), "--max-wait-time", "30"]
        if trusted_entities is not None:  # run only app bundles signed by one of these keys
            args += ["--trusted-entities", str(trusted_entities)]
        return self.start(name, *args)

    def wait_for_port(self, port: int, name: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if self.processes[-1].poll() is not None:
                raise RuntimeError(f"{name} exited: {self.log(name)[-2000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"{name} did not listen on {port} within {timeout:.0f} s")

    def flwr(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=PROJECT_DIR, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    def online_nodes(self) -> int:
        out = json.loads(self.flwr("supernode", "list", "onprem", "--format", "json"))
        return sum(n.get("status") == "online" for n in out.get("nodes", []))

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while (online := self.online_nodes()) < count:
            if time.time() > deadline:
                raise TimeoutError(f"{online} of {count} SuperNodes online after {timeout:.0f} s")
            time.sleep(1)

    def run(self, overrides: dict, timeout: float = 3600, app: str = ".") -> str:
        """``flwr run APP onprem --stream`` with these run-config overrides; returns its output.
        The byte counters restart here, so they hold what this run sent and received."""
        for counter in self.counters.values():
            counter.up = counter.down = 0
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
        done = threading.Event()
        watcher = threading.Thread(target=self._snapshot_rounds, args=(Path(overrides["run-dir"]), done), daemon=True)
        watcher.start()
        try:
            out = self.flwr("run", app, "onprem", "--stream", "--run-config", config, timeout=timeout)
        finally:
            done.set()
            watcher.join()
        (self.logs / "flwr-run.log").write_text(out)
        return out

    def _snapshot_rounds(self, run_dir: Path, done: threading.Event) -> None:
        """Each site's byte counts when each round's metrics row appears: per-round traffic."""
        self.round_bytes: list[dict] = []
        metrics = run_dir / "metrics.jsonl"
        while not done.wait(0.2):
            rows = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
            while len(self.round_bytes) < rows:
                self.round_bytes.append({n: (c.up, c.down) for n, c in self.counters.items()})

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""


def deploy(root: Path, data_dirs: list[Path], overrides: dict) -> dict:
    """Deploy one SuperNode per site folder under ``root``, run once; the figures of that run."""
    from common.data import read_catalog
    from common.config import Settings, defaults
    from common.model import adapter_config, adapter_state, build_model, load_encoder, sequence_options

    with LocalDeployment(root, data_dirs) as d:
        d.wait_for_nodes(len(data_dirs))
        started = time.time()
        d.run(overrides)
        wall = time.time() - started
        wire = {name: {"sent": c.up, "received": c.down} for name, c in d.counters.items()}
        marks = d.round_bytes
    # Rounds 2..R: one train and one evaluate exchange each (round 1 also carries the app
    # bundle download and the popularity-prior query).
    per_round = {name: {"sent": [b[name][0] - a[name][0] for a, b in zip(marks, marks[1:])],
                        "received": [b[name][1] - a[name][1] for a, b in zip(marks, marks[1:])]} for name in wire}
    run_dir = Path(overrides["run-dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed-s"] for r in rows]
    s = Settings.from_run_config({**defaults(), **overrides})
    encoder, _ = load_encoder(s.model, s.model_layers)
    model = build_model(encoder, len(read_catalog(run_dir / "catalog.csv")), adapter_config(s, encoder), **sequence_options(s))
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter_state(model).values())
    return {"sites": len(data_dirs), "rounds": len(rows), "wall-s": round(wall, 1),
            "round-s": [round(b - a, 1) for a, b in zip(elapsed, elapsed[1:])], "first-round-s": elapsed[0],
            "wire-bytes": wire, "wire-bytes-per-round": per_round, "adapter-bytes": adapter_bytes,
            "final": {k: rows[-1].get(k) for k in ("val-ndcg@10", "val-hr@10", "epsilon-max")}}
