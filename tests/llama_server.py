"""llama.cpp's HTTP server on 127.0.0.1, from the prebuilt `xllamacpp` wheel (no compiler, no download).

    python tests/llama_server.py MODEL.gguf PORT

xllamacpp runs llama.cpp's own C++ server (its OpenAI-compatible routes, slots and sampling) inside this
process; the process only keeps it alive until it is signalled.
"""

from __future__ import annotations

import signal
import sys

import xllamacpp


def main(gguf: str, port: int) -> None:
    params = xllamacpp.CommonParams()
    params.model.path = gguf
    params.hostnames = ["127.0.0.1"]
    params.port = port
    params.n_ctx = 8192
    params.n_parallel = 4  # llama-server's own default: 4 slots sharing one 8192-token cache
    params.kv_unified = True
    server = xllamacpp.Server(params)
    print(f"listening on {server.listening_address}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main(sys.argv[1], int(sys.argv[2]))
