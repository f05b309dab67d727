"""The cross-node pre-flight: what every node sees (node-info), compared on the head node.

The head node listens on the rendezvous port while ``srun`` runs ``node-info`` on every
node, so the check also proves the port is free and reachable from every node.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from megasmoe.launch.allocation import LaunchError, rendezvous_port
from megasmoe.launch.plan import LaunchPlan, srun_extra_args


def code_hash(package_dir: Optional[Path] = None) -> str:
    """SHA-256 over the megasmoe package's .py files (relative path + bytes), sorted."""
    root = Path(package_dir) if package_dir else Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def _file_hash(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def node_info(config: Optional[str], data_paths: Sequence[str] = (),
              token_file: Optional[str] = None, head: Optional[str] = None,
              port: Optional[int] = None) -> dict:
    """What this node sees: code hash, config hash, paths, torch and its backends, GPUs.

    Run on every node by ``check_nodes`` (``srun --ntasks-per-node=1``); with
    ``head``/``port`` it also tries a TCP connection to the head's rendezvous port.
    """
    info: dict = {
        "host": socket.gethostname().split(".")[0],
        "python": sys.executable,
        "python_exists": Path(sys.executable).exists(),
        "cwd": os.getcwd(),
        "code": code_hash(),
        "config": str(config) if config else None,
        "config_hash": _file_hash(Path(config)) if config else None,
        "missing_paths": [p for p in data_paths if not Path(p).exists()],
        "megatron_core": _version("megatron-core"),
    }
    if token_file:
        try:
            info["token"] = Path(token_file).read_text().strip()
        except OSError:
            info["token"] = None
    try:
        import torch
        import torch.distributed as dist

        info["torch"] = torch.__version__
        info["distributed"] = dist.is_available()
        info["gloo"] = bool(dist.is_available() and dist.is_gloo_available())
        info["nccl"] = bool(dist.is_available() and dist.is_nccl_available())
        info["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as e:  # noqa: BLE001 - reported, not raised
        info["torch"] = None
        info["torch_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    if head and port:
        try:
            socket.getaddrinfo(head, port)
            with socket.create_connection((head, port), timeout=10) as s:
                s.sendall(info["host"].encode() + b"\n")
            info["rendezvous"] = "ok"
        except OSError as e:
            info["rendezvous"] = f"{type(e).__name__}: {e}"
    return info


class _Listener:
    """A TCP listener on the rendezvous port for the duration of the node check."""

    def __init__(self, port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("", port))
        self.sock.listen(128)
        self.sock.settimeout(0.5)
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    data = b""
                    while True:  # read to EOF: the client closes first (no TIME_WAIT here)
                        chunk = conn.recv(256)
                        if not chunk:
                            break
                        data += chunk
                    self.seen.append(data.decode(errors="replace").strip())
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def check_nodes(lp: LaunchPlan, config: Optional[str], data_paths: Sequence[str],
                run_path: Path, timeout_s: int = 180) -> None:
    """Compare what every node of the allocation sees; LaunchError on the first mismatch.

    Inside SLURM: ``srun --ntasks-per-node=1 python -m megasmoe.launch node-info`` on
    every node, while this process (on the head node) listens on the rendezvous port;
    outside SLURM: this node only. Checks: same megasmoe code and config, data paths
    present, the run directory shared (a token written here is read there), torch with
    the backend it will use (nccl with CUDA, else gloo), enough GPUs for the processes,
    the head's rendezvous port reachable.
    """
    a = lp.allocation
    run_path.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    token_file = run_path / f".preflight-{a.job_id or os.getpid()}"
    token_file.write_text(token + "\n")
    head_port = rendezvous_port(a.job_id)
    listener = None
    local = socket.gethostname().split(".")[0]
    code_before = code_hash()
    try:
        if a.in_slurm and not shutil.which("srun"):
            # e.g. pre-flight itself runs in a container step (MEGASMOE_PYTHON=srun ...).
            lp.notes.append("srun is not available where pre-flight runs: only this node "
                            "was checked")
        if a.in_slurm and shutil.which("srun"):
            if local == a.head.split(".")[0]:
                try:
                    listener = _Listener(head_port)
                except OSError as e:
                    raise LaunchError(
                        f"rendezvous port {head_port} on head node {a.head} is not free ({e}); "
                        f"another job or process uses it") from None
            # --overlap: pre-flight may itself run in a step (MEGASMOE_PYTHON=srun ...).
            cmd = ["srun", f"--nodes={a.nodes}", f"--ntasks={a.nodes}", "--ntasks-per-node=1",
                   "--overlap", "--kill-on-bad-exit=1", *srun_extra_args(os.environ),
                   sys.executable, "-m", "megasmoe.launch", "node-info",
                   f"--token-file={token_file}",
                   *([f"--head={a.head}", f"--port={head_port}"] if listener else []),
                   *[f"--data-path={p}" for p in data_paths], *([config] if config else [])]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise LaunchError(f"the node check (srun node-info on {a.nodes} nodes) did not "
                                  f"finish in {timeout_s} s; are the nodes healthy?") from None
            # One JSON object per node; tolerate prefixes (srun --label) and other output.
            infos = [json.loads(line[line.index('{"host"'):]) for line in proc.stdout.splitlines()
                     if '{"host"' in line]
            if proc.returncode != 0 or len(infos) != a.nodes:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise LaunchError(f"the node check (srun node-info) failed on the allocation "
                                  f"(rc={proc.returncode}, {len(infos)}/{a.nodes} nodes answered): "
                                  f"{err}")
        else:
            infos = [node_info(config, data_paths, str(token_file))]
        mine = node_info(config, data_paths, str(token_file))
        # Code edited while the check ran (same filesystem, another moment): either is fine.
        mine["codes"] = {code_before, mine["code"]}
        _compare_nodes(mine, infos, token, lp, str(run_path))
    finally:
        if listener is not None:
            listener.close()
        token_file.unlink(missing_ok=True)


def _compare_nodes(mine: dict, infos: list[dict], token: str, lp: LaunchPlan,
                   run_path: str) -> None:
    a = lp.allocation
    for info in infos:
        host = info.get("host", "?")
        if not info.get("python_exists", True):
            raise LaunchError(f"node {host}: python {info['python']} does not exist there; "
                              f"put the venv on a filesystem every node mounts")
        if info.get("code") not in mine.get("codes", {mine["code"]}):
            raise LaunchError(f"node {host} sees different megasmoe code (hash "
                              f"{str(info.get('code'))[:12]} vs {mine['code'][:12]} here); use "
                              f"one checkout on a shared filesystem")
        if info.get("config_hash") != mine["config_hash"]:
            raise LaunchError(f"node {host}: config {info.get('config')} is missing or differs "
                              f"there; put it on a shared filesystem")
        if info.get("missing_paths"):
            raise LaunchError(f"node {host}: data path(s) missing there: "
                              f"{', '.join(info['missing_paths'])}")
        if info.get("token") != token:
            raise LaunchError(f"node {host} does not see the run directory {run_path} that this "
                              f"node writes (not a shared filesystem?); set run.dir to a shared path")
        if info.get("torch") is None:
            raise LaunchError(f"node {host}: torch does not import "
                              f"({info.get('torch_error', 'not installed')})")
        if info.get("torch") != mine.get("torch") or \
                info.get("megatron_core") != mine.get("megatron_core"):
            raise LaunchError(f"node {host} has torch {info.get('torch')} / megatron-core "
                              f"{info.get('megatron_core')}, this node {mine.get('torch')} / "
                              f"{mine.get('megatron_core')}; use one environment")
        cuda = info.get("cuda_devices", 0)
        backend = "nccl" if cuda else "gloo"
        if not info.get(backend):
            raise LaunchError(f"node {host}: torch.distributed backend {backend} is not "
                              f"available in torch {info.get('torch')}")
        if cuda and cuda < a.nproc_per_node:
            raise LaunchError(f"node {host} has {cuda} GPUs but {a.nproc_per_node} processes per "
                              f"node were asked for; lower --ntasks-per-node or add --gpus-per-node")
        rdzv = info.get("rendezvous")
        if rdzv is not None and rdzv != "ok":
            raise LaunchError(f"node {host} cannot reach the rendezvous endpoint {lp.endpoint} "
                              f"({rdzv}); check the network / firewall between nodes")
