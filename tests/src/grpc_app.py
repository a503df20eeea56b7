"""A gRPC service and client for tests/tests/grpc.rs, on Debian's python3-grpcio, without protoc:
generic handlers whose messages are plain bytes (identity serializers).

  grpc_app.py server HOST PORT LOG   serves shop.Orders (GetOrder, CancelOrder) and appends a
                                     JSON line per call to LOG: method, metadata, request (hex)
  grpc_app.py client HOST PORT N     on one channel: N GetOrder calls, then two CancelOrder calls,
                                     each with a traceparent and a baggage; prints one JSON line
                                     per call: method, status code, reply (hex)
"""
import json
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "shop.Orders"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def identity(b):
    return b


def serve(host, port, log_path):
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1)

    def record(method, request, context):
        line = json.dumps({
            "method": method,
            "metadata": [[k, v if isinstance(v, str) else v.hex()]
                         for k, v in context.invocation_metadata()],
            "request": request.hex(),
        })
        with lock:
            log.write(line + "\n")
            log.flush()

    def get_order(request, context):
        record("GetOrder", request, context)
        return b"order:" + request

    def cancel_order(request, context):
        record("CancelOrder", request, context)
        return b"cancelled:" + request

    handlers = {
        "GetOrder": grpc.unary_unary_rpc_method_handler(
            get_order, request_deserializer=identity, response_serializer=identity),
        "CancelOrder": grpc.unary_unary_rpc_method_handler(
            cancel_order, request_deserializer=identity, response_serializer=identity),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if server.add_insecure_port(f"{host}:{port}") == 0:
        sys.exit(f"cannot listen on {host}:{port}")
    server.start()
    print("serving", flush=True)
    server.wait_for_termination()


def client(host, port, n):
    metadata = (("traceparent", TRACEPARENT), ("baggage", "tenant=t1"))
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
        calls = [("GetOrder", f"o-{i}".encode()) for i in range(n)]
        calls += [("CancelOrder", b"o-0"), ("CancelOrder", b"o-1")]
        for method, request in calls:
            stub = channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=identity,
                                       response_deserializer=identity)
            try:
                reply, call = stub.with_call(request, metadata=metadata, timeout=10)
                out = {"method": method, "code": call.code().name, "reply": reply.hex()}
            except grpc.RpcError as e:
                out = {"method": method, "code": e.code().name, "reply": ""}
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "server":
        serve(host, port, sys.argv[4])
    else:
        client(host, port, int(sys.argv[4]))
