"""A gRPC service and client for tests/tests/grpc.rs, on Debian's python3-grpcio, without protoc:
generic handlers whose messages are plain bytes (identity serializers), the protobuf messages
encoded by hand.

  grpc_app.py server HOST PORT LOG [ANSWERS]
      serves shop.Orders (GetOrder, ListOrders, CancelOrder) and appends a JSON line per call to
      LOG: method, metadata, request (hex). GetOrder and ListOrders answer an `Order` (field 1
      the id, from the request's field 1 or the whole request; field 2 the status, a varint;
      field 3 a random request id: noise). ANSWERS is `live` (the default), `regressed` (the
      same, but ListOrders answers status 2 where live answers 1) or `unavailable` (ListOrders
      fails with UNAVAILABLE, a trailers-only answer).
  grpc_app.py client HOST PORT N
      on one channel: N GetOrder calls, then two CancelOrder calls, each with a traceparent and
      a baggage; prints one JSON line per call: method, status code, reply (hex)
  grpc_app.py calls HOST PORT N CHANNELS METHOD...
      N rounds of one call of each METHOD, an `OrderRequest` for `o-0`, `o-1`, `o-2` in turn
      (identical requests repeat, so noise can be learned), round i on channel i % CHANNELS;
      prints as `client` does
  grpc_app.py descriptors PATH
      writes the service's FileDescriptorSet (what `protoc --include_imports
      --descriptor_set_out` writes for it) to PATH
"""
import json
import sys
import threading
import uuid
from concurrent import futures

SERVICE = "shop.Orders"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
# Order.status: what live answers, and what a regressed ListOrders answers.
PLACED = 1
SHIPPED = 2


def identity(b):
    return b


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(field, data):
    return varint(field << 3 | 2) + varint(len(data)) + data


def order(order_id, status):
    # "req-" + 32 hex digits: `r` starts a field whose length (`e`, 101) runs past the end, so
    # the id never reads as a nested message and its path stays `3`.
    request_id = ("req-" + uuid.uuid4().hex).encode()
    return (length_delimited(1, order_id) + varint(2 << 3 | 0) + varint(status)
            + length_delimited(3, request_id))


def order_id(request):
    """Field 1 of an `OrderRequest`, or the whole request when it is not one."""
    if len(request) >= 2 and request[0] == 0x0A and request[1] == len(request) - 2:
        return request[2:]
    return request


def serve(host, port, log_path, answers):
    import grpc

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
        return order(order_id(request), PLACED)

    def list_orders(request, context):
        record("ListOrders", request, context)
        if answers == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "orders database down")
        return order(order_id(request), SHIPPED if answers == "regressed" else PLACED)

    def cancel_order(request, context):
        record("CancelOrder", request, context)
        return b"cancelled:" + request

    def unary(f):
        return grpc.unary_unary_rpc_method_handler(
            f, request_deserializer=identity, response_serializer=identity)

    handlers = {
        "GetOrder": unary(get_order),
        "ListOrders": unary(list_orders),
        "CancelOrder": unary(cancel_order),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if server.add_insecure_port(f"{host}:{port}") == 0:
        sys.exit(f"cannot listen on {host}:{port}")
    server.start()
    print("serving", flush=True)
    server.wait_for_termination()


def call_all(host, port, calls, channels):
    """Makes `calls` ((method, request, channel index)...) in order; one JSON line per call."""
    import grpc

    metadata = (("traceparent", TRACEPARENT), ("baggage", "tenant=t1"))
    opened = [grpc.insecure_channel(f"{host}:{port}") for _ in range(channels)]
    try:
        for channel in opened:
            grpc.channel_ready_future(channel).result(timeout=20)
        for method, request, index in calls:
            stub = opened[index].unary_unary(f"/{SERVICE}/{method}",
                                             request_serializer=identity,
                                             response_deserializer=identity)
            try:
                reply, call = stub.with_call(request, metadata=metadata, timeout=10)
                out = {"method": method, "code": call.code().name, "reply": reply.hex()}
            except grpc.RpcError as e:
                out = {"method": method, "code": e.code().name, "reply": ""}
            print(json.dumps(out), flush=True)
    finally:
        for channel in opened:
            channel.close()


def client(host, port, n):
    calls = [("GetOrder", f"o-{i}".encode(), 0) for i in range(n)]
    calls += [("CancelOrder", b"o-0", 0), ("CancelOrder", b"o-1", 0)]
    call_all(host, port, calls, 1)


def rounds(host, port, n, channels, methods):
    calls = [(method, length_delimited(1, f"o-{i % 3}".encode()), i % channels)
             for i in range(n) for method in methods]
    call_all(host, port, calls, channels)


def descriptors(path):
    from google.protobuf import descriptor_pb2 as d

    field = d.FieldDescriptorProto
    files = d.FileDescriptorSet()
    f = files.file.add(name="shop/orders.proto", package="shop", syntax="proto3")
    request = f.message_type.add(name="OrderRequest")
    request.field.add(name="id", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    reply = f.message_type.add(name="Order")
    for name, number, kind in [("id", 1, field.TYPE_STRING), ("status", 2, field.TYPE_UINT32),
                               ("request_id", 3, field.TYPE_STRING)]:
        reply.field.add(name=name, number=number, type=kind, label=field.LABEL_OPTIONAL)
    service = f.service.add(name="Orders")
    for method in ["GetOrder", "ListOrders", "CancelOrder"]:
        service.method.add(name=method, input_type=".shop.OrderRequest", output_type=".shop.Order")
    with open(path, "wb") as out:
        out.write(files.SerializeToString())


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "descriptors":
        descriptors(sys.argv[2])
        sys.exit(0)
    host, port = sys.argv[2], int(sys.argv[3])
    if mode == "server":
        serve(host, port, sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else "live")
    elif mode == "client":
        client(host, port, int(sys.argv[4]))
    elif mode == "calls":
        rounds(host, port, int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:])
    else:
        sys.exit(f"unknown mode {mode}")
