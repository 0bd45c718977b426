"""A gRPC client that knows none of breakwater's .proto files: it learns the API from the agent's
server reflection and checks the standard health service, as grpcurl or a Kubernetes probe would.

    grpc_probe.py TARGET [--health-only]

TARGET is a gRPC target: unix:///run/breakwater/agent.sock or 127.0.0.1:9978. Prints one JSON
object on stdout (tests/tests/observability.rs reads it):

    services       the services reflection lists
    agent_methods  the methods of breakwater.v1.Agent, from its descriptor
    list_services  ListServices called through descriptors fetched by reflection, as JSON
    health         status per service name ("" and "breakwater.v1.Agent"), or the error code
    reflection     with --health-only: the error code a reflection call gets

Installed by `cargo xtask setup` into ~/.cache/breakwater/venv (grpcio, grpcio-reflection,
grpcio-health-checking).
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

TIMEOUT = 10


def list_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT)
    names = []
    for response in responses:
        if response.HasField("error_response"):
            raise RuntimeError(response.error_response.error_message)
        names.extend(s.name for s in response.list_services_response.service)
    return sorted(names)


def call_list_services(channel, pool):
    """ListServices with message classes built from the reflected descriptors."""
    method = pool.FindServiceByName("breakwater.v1.Agent").FindMethodByName("ListServices")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        "/breakwater.v1.Agent/ListServices",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    response = call(request_class(), timeout=TIMEOUT)
    return json_format.MessageToDict(response, preserving_proto_field_name=True)


def health(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    out = {}
    for name in ["", "breakwater.v1.Agent", "no.such.Service"]:
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
            out[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        except grpc.RpcError as e:
            out[name] = e.code().name
    return out


def main():
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        sys.exit(__doc__)
    target = args[0]
    health_only = "--health-only" in args[1:]
    # grpcio's defaults: over a unix socket it sends the socket's percent-encoded path as
    # :authority, which the agent must take.
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        out = {"health": health(channel)}
        if health_only:
            try:
                list_services(channel)
                out["reflection"] = "OK"
            except grpc.RpcError as e:
                out["reflection"] = e.code().name
        else:
            out["services"] = list_services(channel)
            pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
            agent = pool.FindServiceByName("breakwater.v1.Agent")
            out["agent_methods"] = sorted(m.name for m in agent.methods)
            out["list_services"] = call_list_services(channel, pool)
    json.dump(out, sys.stdout, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
