"""The head's view of its RPC workers (`serve --rpc`), without loading llama.cpp.

A worker is ggml's RPC server (`sovereign worker`): it serves one head at a time, and ggml aborts the
head's process when a worker cannot be reached or speaks another protocol. So the head checks each
worker here first, with its own connect and read timeouts: a TCP connect, then ggml-rpc's HELLO, whose
answer is the worker's protocol version. While a model is loaded its process holds the worker's one
connection, and a probe would only queue behind it: its state is then read from that process's own
socket (Linux /proc), which turns CLOSE_WAIT when the worker has gone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from sovereign.errors import SovereignError, WorkerUnavailable
from sovereign.gpu_detect import llama_cpp_lib_dir

DEFAULT_PORT = 50052  # llama.cpp's rpc-server default
CONNECT_TIMEOUT = 3.0  # seconds to open a worker's TCP connection
HELLO_TIMEOUT = 5.0  # seconds for its HELLO answer
# The pinned llama.cpp's ggml-rpc.h, for when its header is not installed beside the package.
FALLBACK_PROTOCOL = (7, 0, 0)
_HELLO = 14  # RPC_CMD_HELLO, fixed in every protocol version
_CAPS = 24  # RPC_CONN_CAPS_SIZE: the HELLO request's transport capabilities (zeros: plain TCP)
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class Endpoint:
    """A worker's address as ggml's RPC client takes it: host:port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoints(text: str) -> tuple[Endpoint, ...]:
    """`HOST:PORT[,HOST:PORT...]` (a bare HOST means port 50052); one clear error for anything else."""
    endpoints = []
    for part in (p.strip() for p in text.split(",")):
        host, _, port = part.rpartition(":") if ":" in part else (part, "", str(DEFAULT_PORT))
        if not host or ":" in host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SovereignError(
                f"--rpc {part!r} is not HOST:PORT",
                "give each worker as host:port, comma-separated, e.g. 192.168.1.20:50052 (IPv6 is not supported)",
            )
        endpoints.append(Endpoint(host, int(port)))
    if len(set(endpoints)) != len(endpoints):
        raise SovereignError(f"--rpc {text!r} names a worker twice", None)
    return tuple(endpoints)


# --- this build -------------------------------------------------------------------------------


def build_supports_rpc() -> bool:
    """Whether the installed llama.cpp was built with its RPC backend (its library is there), without loading it."""
    lib = llama_cpp_lib_dir()
    return lib is not None and any(lib.glob("libggml-rpc.*"))


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def rebuild_command() -> str:
    """The command that reinstalls this llama-cpp-python with RPC (past pip's cache of the CPU-only build)."""
    return (
        'CMAKE_ARGS="-DGGML_RPC=on" pip install --no-cache-dir --force-reinstall --no-deps '
        f"llama-cpp-python=={llama_cpp_version()}"
    )


def no_rpc_error() -> SovereignError:
    """The one line for a build without RPC."""
    return SovereignError("this llama.cpp build has no RPC support", f"rebuild it: {rebuild_command()}")


def protocol_version() -> tuple[int, int, int]:
    """The RPC protocol this build speaks, from its installed ggml-rpc.h."""
    lib = llama_cpp_lib_dir()  # site-packages/llama_cpp/lib; the headers are in site-packages/include
    try:
        header = (lib.parent.parent / "include" / "ggml-rpc.h").read_text() if lib else ""
    except OSError:
        header = ""
    found = [re.search(rf"#define\s+RPC_PROTO_{part}_VERSION\s+(\d+)", header) for part in ("MAJOR", "MINOR", "PATCH")]
    if not all(found):
        return FALLBACK_PROTOCOL
    major, minor, patch = (int(m.group(1)) for m in found if m)
    return major, minor, patch


def build_name() -> str:
    """This head's build, as a mismatch names it."""
    return f"llama-cpp-python {llama_cpp_version()}, RPC protocol {'.'.join(map(str, protocol_version()))}"


# --- probing a worker -------------------------------------------------------------------------


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (chunk := sock.recv(n - len(data))):
        data += chunk
    return data


def hello(endpoint: Endpoint, *, connect_timeout: float = CONNECT_TIMEOUT, timeout: float = HELLO_TIMEOUT) -> None:
    """Check that a worker answers and speaks this build's protocol; WorkerUnavailable says why not."""
    ours = protocol_version()
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=connect_timeout)
    except TimeoutError:
        raise WorkerUnavailable(str(endpoint), f"did not accept a connection within {connect_timeout:g} s") from None
    except OSError as exc:
        raise WorkerUnavailable(str(endpoint), f"cannot be reached ({exc.strerror or exc})") from None
    with sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(bytes([_HELLO]) + _U64.pack(_CAPS) + bytes(_CAPS))
            header = _recv_exactly(sock, _U64.size)
            size = _U64.unpack(header)[0] if len(header) == _U64.size else 0
            answer = _recv_exactly(sock, size) if 3 <= size <= 64 else b""
        except TimeoutError:
            raise WorkerUnavailable(
                str(endpoint),
                f"accepted a connection but did not answer within {timeout:g} s",
                "a worker serves one head at a time: is another server using it?",
            ) from None
        except OSError as exc:
            raise WorkerUnavailable(str(endpoint), f"dropped the connection ({exc.strerror or exc})") from None
    if len(answer) < 3:
        # An older or newer server refuses a HELLO of another size by closing the connection.
        raise _mismatch(endpoint, "another RPC protocol (it refused this build's handshake)")
    theirs = (answer[0], answer[1], answer[2])
    if theirs[0] != ours[0] or theirs[1] > ours[1]:  # ggml-rpc's own rule
        raise _mismatch(endpoint, f"RPC protocol {'.'.join(map(str, theirs))}")


def _mismatch(endpoint: Endpoint, theirs: str) -> WorkerUnavailable:
    return WorkerUnavailable(
        str(endpoint),
        f"runs another llama.cpp build ({theirs}) than this head ({build_name()})",
        "install the same sovereign and llama-cpp-python on the head and every worker",
    )


def check_workers(endpoints: tuple[Endpoint, ...] | list[str]) -> None:
    """Probe every worker before a load, so that a missing one fails in one line instead of aborting llama.cpp."""
    for endpoint in endpoints:
        hello(endpoint if isinstance(endpoint, Endpoint) else parse_endpoints(endpoint)[0])


def first_unreachable(endpoints: list[str]) -> WorkerUnavailable | None:
    """After a crash: the first worker that is gone, hangs or changed build, if any (the crash was its doing)."""
    for text in endpoints:
        try:
            hello(parse_endpoints(text)[0], connect_timeout=1.0, timeout=3.0)
        except WorkerUnavailable as exc:
            return WorkerUnavailable(text, exc.reason)  # with the default hint: restart it, the model reloads
    return None


# --- a loaded model's connections -------------------------------------------------------------

_TCP_STATES = {"01": "connected", "08": "lost"}  # ESTABLISHED; CLOSE_WAIT: the worker closed its end


def _socket_inodes(pid: int) -> dict[str, int]:
    """The process's sockets: inode -> file descriptor."""
    inodes = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes[target[8:-1]] = int(fd.name)
    return inodes


def _peer(hex_address: str) -> tuple[str, int]:
    address, port = hex_address.split(":")
    if len(address) == 8:  # IPv4, little-endian
        return socket.inet_ntoa(bytes.fromhex(address)[::-1]), int(port, 16)
    return "", int(port, 16)


def _address(endpoint: Endpoint) -> tuple[str, int]:
    try:
        return socket.gethostbyname(endpoint.host), endpoint.port
    except OSError:
        return endpoint.host, endpoint.port


def _worker_connections(pid: int, endpoints: list[str]) -> dict[str, list[tuple[int, str]]] | None:
    """Each worker's TCP connections from a process: (file descriptor, state); None where /proc cannot say."""
    try:
        inodes = _socket_inodes(pid)
        rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    wanted = {_address(parse_endpoints(text)[0]): text for text in endpoints}
    found: dict[str, list[tuple[int, str]]] = {text: [] for text in endpoints}
    for row in rows:
        fields = row.split()
        if len(fields) > 9 and fields[9] in inodes and (text := wanted.get(_peer(fields[2]))) is not None:
            found[text].append((inodes[fields[9]], _TCP_STATES.get(fields[3], "lost")))
    return found


def connection_states(pid: int, endpoints: list[str]) -> dict[str, str] | None:
    """Each worker's connection from a model's process: connected, lost, or absent; None where /proc cannot say."""
    found = _worker_connections(pid, endpoints)
    if found is None:
        return None
    return {
        text: "connected" if any(s == "connected" for _, s in held) else "lost" if held else "absent"
        for text, held in found.items()
    }


def worker_sockets(endpoints: list[str]) -> list[int]:
    """This process's open connections to its workers, as file descriptors (to give them timeouts)."""
    found = _worker_connections(os.getpid(), endpoints) or {}
    return [fd for held in found.values() for fd, state in held if state == "connected"]


def health(endpoints: list[str], held: dict[str, str] | None) -> list[dict[str, str]]:
    """Each worker's state for /health: its connection from the loaded model when there is one, else a probe."""
    states = []
    for text in endpoints:
        connection = (held or {}).get(text)
        if connection == "connected":
            states.append({"worker": text, "state": "connected"})
        elif connection == "lost":
            states.append({"worker": text, "state": "lost", "detail": "it closed the loaded model's connection"})
        else:
            try:
                hello(parse_endpoints(text)[0], connect_timeout=1.0, timeout=2.0)
            except WorkerUnavailable as exc:
                states.append({"worker": text, "state": "unavailable", "detail": exc.reason})
            else:
                states.append({"worker": text, "state": "reachable"})
    return states
