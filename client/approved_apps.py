"""A site runs only app bundles it approved: the site-side pin for Flower 1.41.

    fedrec client approve FAB --key KEY --approvals DIR              sign a reviewed bundle (offline)
    flower-supernode … --isolation process --clientappio-api-address 127.0.0.1:9094
    fedrec client superexec --runtime-api-address 127.0.0.1:9094 --insecure \\
        --approvals DIR --trusted-keys KEYS.yaml                     the site's own SuperExec
    fedrec client superexec --runtime-api-address 127.0.0.1:9094 --insecure --any-bundle
                                  the same, preloaded, running every bundle its SuperNode accepts

Flower's ``--trusted-entities`` accepts only signatures issued through Flower Hub (README,
"Which code a site runs"), so a site that reviews a bundle itself pins it here. With
``--isolation process`` a SuperNode starts no ClientApp itself: a SuperExec the site runs
launches each one. This is Flower's SuperExec with one check in front of its executor: a task
starts only if its bundle's SHA-256 carries an approval, an ed25519 signature over that hash by
a key in ``KEYS.yaml`` (``key-id: "ssh-ed25519 …"``, the format of Flower's trusted entities).
Anything else is refused: the task's process answers its message with an error (``app bundle
<sha256> is not approved by this site``) and ends, having installed and loaded nothing, so the
site releases nothing and the server records the refusal at once, as Flower's own
``--trusted-entities`` check does, instead of waiting out ``round-timeout``. Flower installs a
bundle under its content hash and loads the ClientApp from the folder of the hash the task
names, so what runs is the approved content or nothing.

Each ClientApp process is forked from a ``multiprocessing`` forkserver that has already
imported torch, Opacus, PEFT and transformers (Flower 1.41 starts one process per message, and
those imports cost about 7 s each on 2 cores). The forked child drops every module of this
installed copy of fedrec before Flower loads the app, so the app still comes from the bundle's
own folder. A site that wants the preloading without the pin says so, ``--any-bundle``: it then
runs what its SuperNode accepts (with ``--trusted-entities``, only Hub-signed bundles).

Approvals are files ``DIR/<sha256>.json`` (``{"fab-sha256", "key-id", "signature"}``): a
reviewer signs offline, the site copies the file in. The bundle is what ``flwr build`` writes
for the reviewed source (Flower builds the same bytes for ``flwr run``, with fixed file dates).
"""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import sys
import threading
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


def approve(fab: Path, key: Path, key_id: str, approvals: Path) -> Path:
    """Sign the bundle's SHA-256 with an ed25519 private key (OpenSSH or PEM); the approval file."""
    digest = hashlib.sha256(Path(fab).read_bytes()).hexdigest()
    raw = Path(key).read_bytes()
    private = (serialization.load_ssh_private_key if b"OPENSSH" in raw else serialization.load_pem_private_key)(raw, None)
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{key}: not an ed25519 private key (ssh-keygen -t ed25519)")
    approvals.mkdir(parents=True, exist_ok=True)
    out = approvals / f"{digest}.json"
    out.write_text(json.dumps({"fab-sha256": digest, "key-id": key_id,
                               "signature": base64.b64encode(private.sign(digest.encode())).decode()}) + "\n")
    return out


def trusted_keys(path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    import yaml

    keys = {}
    for key_id, text in (yaml.safe_load(Path(path).read_text()) or {}).items():
        key = serialization.load_ssh_public_key(str(text).encode())
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ValueError(f"{path}: key {key_id!r} is not ed25519")
        keys[str(key_id)] = key
    return keys


def approved(fab_sha256: str | None, approvals: Path, keys: dict[str, ed25519.Ed25519PublicKey]) -> bool:
    """Whether a trusted key signed this bundle hash."""
    if not fab_sha256:
        return False
    path = Path(approvals) / f"{fab_sha256}.json"
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    key = keys.get(record.get("key-id"))
    if key is None or record.get("fab-sha256") != fab_sha256:
        return False
    try:
        key.verify(base64.b64decode(record["signature"]), fab_sha256.encode())
    except (InvalidSignature, ValueError, KeyError):
        return False
    return True


# What the forkserver imports once, so that each message's ClientApp process is forked ready
# (importing these costs about 7 s a process on 2 cores). Third-party code only: the app's own
# modules must be imported from the bundle in every child. Importing torch does not initialise
# CUDA, so a forked child can still use the GPU (CUDA cannot be initialised before a fork).
PRELOAD = ["torch", "opacus", "peft", "transformers", "flwr.supernode.cli", "flwr.clientapp", "flwr.app"]
FEDREC_PACKAGES = {p.parent.name for p in Path(__file__).resolve().parents[1].glob("*/__init__.py")}


def clientapp_argv(spec) -> list[str]:
    """The command line Flower's subprocess executor gives ``flwr-clientapp`` for this task."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND

    argv = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        argv.append("--insecure")
    elif spec.root_certificates_path is not None:
        argv += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        argv += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        argv.append("--allow-runtime-dependency-installation")
    return argv


def run_clientapp(argv: list[str], quiet: bool, refusal: str | None = None) -> None:
    """``flwr-clientapp`` in a child of the preloaded forkserver. Flower imports the app module
    from the bundle's folder unless ``sys.modules`` already holds that name, so every module of
    this installed copy of fedrec (this function's own package among them) is dropped first.

    With ``refusal`` (a bundle this site did not approve) it is still Flower's task process,
    which pulls the message and pushes the reply, but its first step with the bundle,
    installing it, raises ``refusal``: Flower answers the message with that error and ends the
    task, and nothing of the bundle is unpacked, imported or run."""
    for name in list(sys.modules):
        if name.split(".")[0] in FEDREC_PACKAGES:
            del sys.modules[name]
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    from flwr.supernode.cli import flwr_clientapp

    if refusal is not None:
        from flwr.supernode.runtime import run_clientapp as runtime

        def refuse(*_args, **_kwargs):
            raise PermissionError(refusal)

        runtime.install_from_fab = refuse
    sys.argv = argv
    try:
        flwr_clientapp()
    finally:
        if refusal is None:
            app = sys.modules.get("client.client_app")
            print(f"fedrec superexec: the ClientApp ran from {getattr(app, '__file__', None)}", flush=True)


class Preloaded:
    """Flower's subprocess executor, but each ClientApp process is forked from a server that
    already imported torch, Opacus, PEFT and transformers."""

    def __init__(self, inner):
        from multiprocessing import forkserver

        self.inner = inner
        self.forkserver = multiprocessing.get_context("forkserver")
        self.forkserver.set_forkserver_preload(PRELOAD)
        # Importing PRELOAD takes seconds: start now, while the SuperNode waits for its first
        # message, not when that message arrives.
        threading.Thread(target=forkserver.ensure_running, daemon=True).start()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self.inner.launch(spec)
        multiprocessing.active_children()  # reaps the children that finished
        self.forkserver.Process(target=run_clientapp, args=(clientapp_argv(spec), spec.suppress_output)).start()
        return LaunchResult.accepted()


def run_superexec(runtime_api_address: str, insecure: bool, approvals: Path | None, keys_file: Path | None) -> None:
    """Flower's SuperExec with preloaded ClientApp processes, launching only approved bundles
    when given ``approvals`` and ``keys_file`` (else every bundle its SuperNode accepted). Where
    this site reaches into Flower's internals: the SuperExec's executor factory, and in a refused
    task's process the runtime's ``install_from_fab``."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec import run_superexec as flower
    from flwr.supercore.superexec.executor.types import LaunchResult

    keys = trusted_keys(keys_file) if approvals is not None else None
    make_executor = flower.get_executor

    class ApprovedOnly:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def launch(self, spec):
            if approved(spec.fab_hash, approvals, keys):
                return self.inner.launch(spec)
            if spec.task_type != TaskType.CLIENT_APP:  # another kind of task: refused before it starts
                return LaunchResult.failed(f"app bundle {spec.fab_hash} is not approved by this site")
            refusal = f"app bundle {spec.fab_hash} is not approved by this site"
            print(f"fedrec superexec: {refusal}; its task answers with that error", flush=True)
            multiprocessing.active_children()  # reaps the children that finished
            multiprocessing.get_context("forkserver").Process(
                target=run_clientapp, args=(clientapp_argv(spec), spec.suppress_output, refusal)).start()
            return LaunchResult.accepted()

    def executor(*args, **kwargs):
        from flwr.supercore.superexec.executor import SubprocessExecutor

        inner = make_executor(*args, **kwargs)
        inner = Preloaded(inner) if isinstance(inner, SubprocessExecutor) else inner
        return ApprovedOnly(inner) if keys is not None else inner

    flower.get_executor = executor
    flower.run_superexec(runtime_api_address=runtime_api_address, insecure=insecure)
