"""A gRPC server and a client of it in one script: `server PORT`, or `client|stream PORT TIMEOUT_S SLEEP_MS,...`.

Generic handlers with raw bytes, so no generated code is needed. The client prints each call's status
code: `client` calls the unary Charge, `stream` the server-streaming Settle (three messages, each
after SLEEP_MS).
"""

import sys
import time
from concurrent import futures

import grpc

METHOD = "/payments.Bank/Charge"
STREAM_METHOD = "/payments.Bank/Settle"


def charge(request: bytes, context: grpc.ServicerContext) -> bytes:
    time.sleep(int(request.decode() or "0") / 1000)
    return b"charged"


def settle(request: bytes, context: grpc.ServicerContext):
    for part in range(3):
        time.sleep(int(request.decode() or "0") / 1000)
        yield f"part {part}".encode()


if sys.argv[1] == "server":
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler("payments.Bank", {
        "Charge": grpc.unary_unary_rpc_method_handler(charge),
        "Settle": grpc.unary_stream_rpc_method_handler(settle)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{sys.argv[2]}")
    server.start()
    server.wait_for_termination()
else:
    channel = grpc.insecure_channel(f"127.0.0.1:{sys.argv[2]}")
    streaming = sys.argv[1] == "stream"
    call = channel.unary_stream(STREAM_METHOD) if streaming else channel.unary_unary(METHOD)
    for sleep_ms in sys.argv[4].split(","):
        try:
            answer = call(sleep_ms.encode(), timeout=float(sys.argv[3]))
            if streaming:
                list(answer)
            print("OK")
        except grpc.RpcError as exc:
            print(exc.code().name)
    channel.close()
