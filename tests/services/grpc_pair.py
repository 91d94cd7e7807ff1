"""A gRPC server and a client of it in one script: `server PORT` or `client PORT TIMEOUT_S SLEEP_MS`.

Generic handlers with raw bytes, so no generated code is needed. The client prints the status code.
"""

import sys
import time
from concurrent import futures

import grpc

METHOD = "/payments.Bank/Charge"


def charge(request: bytes, context: grpc.ServicerContext) -> bytes:
    time.sleep(int(request.decode() or "0") / 1000)
    return b"charged"


if sys.argv[1] == "server":
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler("payments.Bank", {
        "Charge": grpc.unary_unary_rpc_method_handler(charge)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{sys.argv[2]}")
    server.start()
    server.wait_for_termination()
else:
    channel = grpc.insecure_channel(f"127.0.0.1:{sys.argv[2]}")
    call = channel.unary_unary(METHOD)
    for sleep_ms in sys.argv[4].split(","):
        try:
            call(sleep_ms.encode(), timeout=float(sys.argv[3]))
            print("OK")
        except grpc.RpcError as exc:
            print(exc.code().name)
    channel.close()
