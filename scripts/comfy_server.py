"""Run the real ComfyUI server headless with this pack, and talk to its HTTP API.

    from comfy_server import ComfyServer, read_latent
    with ComfyServer(base_dir, extra_args=["--fp16-unet"]) as srv:
        entry = srv.queue(prompt)                      # API-format prompt dict -> history entry
        latent = read_latent(srv.output_files(entry, "latents")[0])

The server is `python main.py --cpu --listen 127.0.0.1 ...` started in the ComfyUI checkout
($COMFYUI_PATH or <repo>/.comfyui) with --base-directory BASE, so models, custom nodes, outputs, the user folder
and the database all live under BASE. The pack (repo root) is symlinked into BASE/custom_nodes.
BATCH_LORA_SERVER_DEVICE=gpu starts it without --cpu (ComfyUI picks the GPU and, on 0.3x hosts, DynamicVRAM), and
BATCH_LORA_SERVER_ARGS adds flags to every server (e.g. --disable-dynamic-vram): tests/gpu/dynamic_vram_gpu.py runs
the server tests and the main job that way.
Server output goes to BASE/server.log (appended, one header line per start).
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import requests
import safetensors.torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "comfyui-batch-lora"
BASE_SUBDIRS = ("custom_nodes", "models/checkpoints", "models/loras", "user", "output", "input", "temp")


class ComfyServerError(RuntimeError):
    """The server process failed to start, died, or did not answer in time (message ends with the log tail)."""


class PromptError(RuntimeError):
    """A prompt was rejected (validation) or failed while executing.

    Attributes: kind ("validation", "execution" or "interrupted"), prompt_id (None for validation errors),
    details (the POST /prompt error JSON, or the execution_error / execution_interrupted message data),
    node_errors (validation node_errors dict, else {}), entry (the history entry, None for validation errors).
    """

    def __init__(self, kind, message, prompt_id=None, details=None, node_errors=None, entry=None):
        super().__init__(message)
        self.kind = kind
        self.prompt_id = prompt_id
        self.details = details or {}
        self.node_errors = node_errors or {}
        self.entry = entry


def default_comfy_path() -> Path:
    """The ComfyUI checkout to run: $COMFYUI_PATH or <repo>/.comfyui."""
    return Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".comfyui")


def host_version(comfy_path=None) -> tuple:
    """The ComfyUI release of a tree (``comfyui_version.py``), e.g. ``(0, 3, 75)``; ``(0,)`` when it has none."""
    text = (Path(comfy_path or default_comfy_path()) / "comfyui_version.py")
    for line in text.read_text().splitlines() if text.is_file() else ():
        if line.startswith("__version__"):
            return tuple(int(x) for x in line.split("=")[1].strip().strip("\"'").split("."))
    return (0,)


def device_flags() -> list:
    """``--cpu`` (or nothing with BATCH_LORA_SERVER_DEVICE=gpu) plus the flags in BATCH_LORA_SERVER_ARGS."""
    device = [] if os.environ.get("BATCH_LORA_SERVER_DEVICE") == "gpu" else ["--cpu"]
    return device + os.environ.get("BATCH_LORA_SERVER_ARGS", "").split()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A headless ComfyUI server process with this pack installed; use as a context manager or start()/stop().

    ``extra_args`` are appended to the server command line; ``env`` adds environment variables for the server.
    """

    def __init__(self, base_dir, port=None, extra_args=(), python=sys.executable, comfy_path=None,
                 pack_dir=REPO_ROOT, startup_timeout=120.0, env=None):
        self.base_dir = Path(base_dir).resolve()
        self.port = port
        self.extra_args = list(extra_args)
        self.python = python
        self.comfy_path = (Path(comfy_path) if comfy_path else default_comfy_path()).resolve()
        self.pack_dir = Path(pack_dir).resolve()
        self.startup_timeout = startup_timeout
        self.env = dict(env or {})
        self.log_path = self.base_dir / "server.log"
        self.proc = None
        self.client_id = uuid.uuid4().hex
        self._log_offset = 0
        self._http = requests.Session()

    # ---- lifecycle

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT"""
        return "http://127.0.0.1:{}".format(self.port)

    def command(self) -> list:
        """The argv the server is started with."""
        base = str(self.base_dir)
        return [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", base, "--database-url", "sqlite:///{}/user/comfyui.db".format(base),
                "--disable-auto-launch", *self.extra_args, *device_flags()]

    def _prepare_base_dir(self):
        for d in BASE_SUBDIRS:
            (self.base_dir / d).mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / PACK_LINK_NAME
        if link.is_symlink():
            if Path(os.readlink(link)) != self.pack_dir:
                link.unlink()
        elif link.exists():
            raise ComfyServerError("{} exists and is not a symlink; not touching it".format(link))
        if not link.is_symlink():
            link.symlink_to(self.pack_dir, target_is_directory=True)

    def start(self) -> "ComfyServer":
        """Create the base dir layout, start the server and wait until GET /system_stats answers.

        Returns self. Raises ComfyServerError (with the log tail) if main.py is missing, the process exits, or
        it is not up within startup_timeout seconds (the process is then stopped).
        """
        if self.proc is not None:
            raise ComfyServerError("already started")
        if not (self.comfy_path / "main.py").is_file():
            raise ComfyServerError("no ComfyUI main.py under {} (set COMFYUI_PATH)".format(self.comfy_path))
        self._prepare_base_dir()
        if self.port is None:
            self.port = free_port()
        cmd = self.command()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        with open(self.log_path, "ab") as log:
            log.write("\n=== {} start: {}\n".format(time.strftime("%Y-%m-%d %H:%M:%S"), " ".join(cmd)).encode())
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(cmd, cwd=str(self.comfy_path), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise ComfyServerError("ComfyUI exited with code {} during start-up\n{}".format(code, self.log_tail()))
            try:
                if self._http.get(self.url + "/system_stats", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ComfyServerError("ComfyUI not up after {:.0f} s\n{}".format(self.startup_timeout, self.log_tail()))
            time.sleep(0.2)

    def stop(self, timeout=20.0):
        """Terminate the server (SIGTERM, then SIGKILL after `timeout` s) and wait. Returns the exit code or None."""
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n_chars=4000) -> str:
        """The last n_chars of this run's part of server.log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                start = max(self._log_offset, f.tell() - n_chars)
                f.seek(start)
                return f.read().decode(errors="replace")
        except OSError as e:
            return "(no log: {})".format(e)

    def rss_bytes(self) -> int:
        """Resident set size of the server process in bytes. Raises ComfyServerError if it is not running."""
        self._check_alive()
        return psutil.Process(self.proc.pid).memory_info().rss

    def _check_alive(self):
        if self.proc is None:
            raise ComfyServerError("server not started")
        if self.proc.poll() is not None:
            raise ComfyServerError("ComfyUI exited with code {}\n{}".format(self.proc.returncode, self.log_tail()))

    # ---- HTTP API

    def get(self, path, **kw) -> requests.Response:
        """GET url+path (default timeout 30 s)."""
        kw.setdefault("timeout", 30)
        return self._http.get(self.url + path, **kw)

    def post(self, path, **kw) -> requests.Response:
        """POST url+path (default timeout 30 s)."""
        kw.setdefault("timeout", 30)
        return self._http.post(self.url + path, **kw)

    def queue_raw(self, prompt: dict, **fields) -> requests.Response:
        """POST /prompt {"prompt": prompt, "client_id": ..., **fields}; returns the response without waiting.

        200: {"prompt_id", "number", "node_errors"}; 400: {"error": {...}, "node_errors": {...}}.
        """
        body = {"prompt": prompt, "client_id": self.client_id, **fields}
        # json.dumps, not requests' json=: NaN/Infinity are sent as Python's json writes them (and the server reads)
        return self.post("/prompt", data=json.dumps(body), headers={"Content-Type": "application/json"})

    def queue(self, prompt: dict, timeout=300.0, **fields) -> dict:
        """Queue an API-format prompt, wait until it finished, and return its history entry.

        The entry has "prompt", "outputs" ({node_id: {"images"|"latents": [...]}}), "status"
        ({"status_str", "completed", "messages"}) and "meta". Raises PromptError on a validation error
        (HTTP 400), an execution error or an interrupt; TimeoutError / ComfyServerError as wait() does.
        """
        r = self.queue_raw(prompt, **fields)
        try:
            body = r.json()
        except ValueError:
            raise PromptError("validation", "POST /prompt: HTTP {}: {}".format(r.status_code, r.text[:2000]))
        if r.status_code != 200:
            err = body.get("error", {})
            msg = "prompt rejected: {}: {}".format(err.get("message"), err.get("details"))
            for nid, ne in (body.get("node_errors") or {}).items():
                for e in ne.get("errors", []):
                    msg += "\n  node {} ({}): {}: {}".format(nid, ne.get("class_type"), e.get("message"),
                                                             e.get("details"))
            raise PromptError("validation", msg, details=err, node_errors=body.get("node_errors"))
        return self.wait(body["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout=300.0, poll=0.05) -> dict:
        """Poll GET /history/{prompt_id} until the prompt is done; return its history entry.

        Raises PromptError (kind "execution" or "interrupted") if it did not succeed, TimeoutError after
        `timeout` s, ComfyServerError if the server process died.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                h = self.get("/history/{}".format(prompt_id)).json()
            except requests.ConnectionError:
                self._check_alive()  # a dead server gives the clearer error
                raise
            entry = h.get(prompt_id)
            if entry is not None:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("prompt {} not done after {:.0f} s\n{}".format(prompt_id, timeout, self.log_tail()))
            time.sleep(poll)
        status = entry.get("status") or {}
        if status.get("status_str") == "success" and status.get("completed"):
            return entry
        for event, data in status.get("messages", []):
            if event == "execution_error":
                raise PromptError("execution", "node {} ({}) failed: {}: {}\n{}".format(
                    data.get("node_id"), data.get("node_type"), data.get("exception_type"),
                    data.get("exception_message"), "".join(data.get("traceback") or [])),
                    prompt_id=prompt_id, details=data, entry=entry)
            if event == "execution_interrupted":
                raise PromptError("interrupted", "interrupted at node {} ({})".format(
                    data.get("node_id"), data.get("node_type")), prompt_id=prompt_id, details=data, entry=entry)
        raise PromptError("execution", "prompt {} did not complete: {}".format(prompt_id, json.dumps(status)[:2000]),
                          prompt_id=prompt_id, details=status, entry=entry)

    def queue_with_events(self, prompt: dict, timeout=300.0, **fields) -> tuple:
        """Like queue(), while listening on the server's websocket (/ws?clientId=...) as the frontend does.

        Returns (history entry, events): events are the JSON messages received from just before the prompt was
        queued until it finished, as (type, data) pairs ("status", "executing", "progress", "progress_state",
        "executed", ...); binary preview frames are skipped.
        """
        import asyncio
        import aiohttp

        async def run():
            events, finals = [], ("execution_success", "execution_error", "execution_interrupted")
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect("{}/ws?clientId={}".format(self.url, self.client_id)) as ws:
                    task = asyncio.ensure_future(asyncio.to_thread(self.queue, prompt, timeout, **fields))
                    drain_until = None
                    while True:
                        if task.done():
                            if task.exception() is not None:
                                return await task
                            pid = task.result()["prompt"][1]
                            if any(t in finals and (d or {}).get("prompt_id") == pid for t, d in events):
                                break
                            drain_until = drain_until or time.monotonic() + 10.0  # the final message is in flight
                            if time.monotonic() > drain_until:
                                break
                        try:
                            msg = await ws.receive(timeout=0.1)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            data = json.loads(msg.data)
                            events.append((data.get("type"), data.get("data")))
                        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            break
                    return await task, events

        return asyncio.run(run())

    def interrupt(self, prompt_id=None) -> None:
        """POST /interrupt (global, or only if `prompt_id` is the running prompt). Raises on an HTTP error."""
        self.post("/interrupt", json={"prompt_id": prompt_id} if prompt_id else {}).raise_for_status()

    # ---- outputs

    def output_files(self, entry: dict, key="latents", node_id=None) -> list:
        """Paths of the files a history entry reports under outputs[node][key] ("latents", "images", ...).

        Only the node `node_id` if given, else all nodes in node-id order. Files of type output/temp/input are
        resolved under BASE/output, BASE/temp, BASE/input.
        """
        outputs = entry.get("outputs", {})
        ids = [str(node_id)] if node_id is not None else sorted(outputs, key=_node_sort_key)
        paths = []
        for nid in ids:
            for item in outputs.get(nid, {}).get(key, []):
                folder = self.base_dir / item.get("type", "output")
                paths.append(folder / item.get("subfolder", "") / item["filename"])
        return paths

    def read_output_latent(self, entry: dict, node_id=None):
        """The latent tensor of the single SaveLatent output in `entry` (or of node `node_id`).

        Raises ValueError unless exactly one latent file is reported.
        """
        paths = self.output_files(entry, "latents", node_id)
        if len(paths) != 1:
            raise ValueError("expected exactly one latent output, got {}".format([str(p) for p in paths]))
        return read_latent(paths[0])


def _node_sort_key(nid):
    return (0, int(nid), "") if str(nid).isdigit() else (1, 0, str(nid))


def read_latent(path):
    """The tensor a stock SaveLatent node wrote to `path` (safetensors key "latent_tensor"), as saved (no scaling)."""
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def _messages(entry):
    return (entry.get("status") or {}).get("messages", [])


def cached_nodes(entry: dict) -> set:
    """Ids of prompt nodes whose outputs came from ComfyUI's cache (the execution_cached message)."""
    for event, data in _messages(entry):
        if event == "execution_cached":
            return set(map(str, data.get("nodes", [])))
    return set()


def executed_nodes(entry: dict) -> set:
    """Ids of prompt nodes that really executed for this history entry.

    After an error or interrupt: the "executed" list ComfyUI reports. After success (the history holds no per-node
    list then): every node the prompt's output nodes depend on, minus cached_nodes(). Nodes skipped through lazy
    inputs and nodes created by node expansion are not reflected in the success case.
    """
    for event, data in _messages(entry):
        if event in ("execution_error", "execution_interrupted"):
            return set(map(str, data.get("executed", [])))
    prompt, outputs = entry["prompt"][2], entry["prompt"][4]
    needed, stack = set(), [str(o) for o in outputs]
    while stack:
        nid = stack.pop()
        if nid in needed or nid not in prompt:
            continue
        needed.add(nid)
        for v in prompt[nid].get("inputs", {}).values():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
                stack.append(str(v[0]))
    return needed - cached_nodes(entry)
