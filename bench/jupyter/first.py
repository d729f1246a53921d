"""Execute -> first output on a warm Jupyter kernel: the ceiling bench/run.py
compares the warm first output with, measured in the same run.

Runs under bench/jupyter/.venv (stock Jupyter packages, apart from the
project's). ``first.py kernel``: the kernel through jupyter_client over ZMQ,
as a notebook server talks to it. ``first.py gateway``: the kernel behind the
Jupyter kernel gateway (started here on a free loopback port), through a
stock WebSocket client, as a remote client of the gateway meets it.

Lines on stdin drive it: after ``ready`` (the kernel is up and warmed), each
``go`` runs one ``print('x')`` and answers with the seconds from the request's
send to the stream message's arrival, after the kernel went idle again.
End of input stops the kernel (and the gateway) and exits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

CODE = "print('x')"
WARMUP = 10
START_TIMEOUT_S = 60.0
EXECUTE_TIMEOUT_S = 30.0


def content() -> dict:
    return {"code": CODE, "silent": False, "store_history": False, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True}


class Kernel:
    """The kernel through jupyter_client: a shell request, its iopub stream."""

    def __init__(self) -> None:
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3", startup_timeout=START_TIMEOUT_S)
        self.session = self.kc.session
        self.shell = self.kc.shell_channel.socket
        self.iopub = self.kc.iopub_channel.socket

    def once(self) -> float:
        msg = self.session.msg("execute_request", content())
        mid = msg["header"]["msg_id"]
        t0 = time.perf_counter()
        self.session.send(self.shell, msg)
        first = None
        deadline = time.monotonic() + EXECUTE_TIMEOUT_S
        while True:
            if not self.iopub.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                raise TimeoutError(f"no idle status from the kernel within {EXECUTE_TIMEOUT_S} s")
            _idents, parts = self.session.feed_identities(self.iopub.recv_multipart(copy=False), copy=False)
            m = self.session.deserialize(parts, content=True, copy=False)
            if m["parent_header"].get("msg_id") != mid:
                continue
            if m["msg_type"] == "stream" and first is None:
                first = time.perf_counter() - t0
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                break
        self.session.recv(self.shell, mode=0)  # the execute_reply (sent before idle)
        if first is None:
            raise RuntimeError("the kernel went idle without printing")
        return first

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """The kernel behind ``jupyter kernelgateway``, through websocket-client."""

    def __init__(self) -> None:
        import websocket

        port = free_port()
        exe = os.path.join(os.path.dirname(sys.executable), "jupyter")
        self.proc = subprocess.Popen([exe, "kernelgateway", "--ip", "127.0.0.1", "--port", str(port)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}/api/kernels"
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"jupyter kernelgateway exited with {self.proc.returncode}")
                try:
                    with urllib.request.urlopen(urllib.request.Request(base, data=b"{}", method="POST"),
                                                timeout=START_TIMEOUT_S) as r:
                        kid = json.load(r)["id"]
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}/api/kernels/{kid}/channels",
                                                  timeout=EXECUTE_TIMEOUT_S)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def once(self) -> float:
        mid = uuid.uuid4().hex
        msg = {"header": {"msg_id": mid, "username": "bench", "session": "bench", "msg_type": "execute_request",
                          "version": "5.3"},
               "parent_header": {}, "metadata": {}, "channel": "shell", "content": content()}
        t0 = time.perf_counter()
        self.ws.send(json.dumps(msg))
        first = None
        idle = replied = False
        while not (idle and replied):
            m = json.loads(self.ws.recv())
            if m.get("parent_header", {}).get("msg_id") != mid:
                continue
            if m["msg_type"] == "stream" and first is None:
                first = time.perf_counter() - t0
            elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                idle = True
            elif m["msg_type"] == "execute_reply":
                replied = True
        if first is None:
            raise RuntimeError("the kernel went idle without printing")
        return first

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    mode = sys.argv[1]
    target = Kernel() if mode == "kernel" else Gateway() if mode == "gateway" else None
    if target is None:
        sys.exit(f"first.py: mode {mode!r}: use kernel or gateway")
    try:
        for _ in range(WARMUP):
            target.once()
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "go":
                sys.exit(f"first.py: unexpected line {line!r}")
            print(repr(target.once()), flush=True)
    finally:
        target.close()


if __name__ == "__main__":
    main()
