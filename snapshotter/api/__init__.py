"""The gRPC APIs lazypull speaks: .proto sources (containerd's and CRI's package names
and field numbers) and the modules generated from them by
`python tools/generate-protos.py`. The service and its containerd client use the
`*_wire.py` modules with wire.py's codec; protobuf's own modules (`*_pb2.py`) serve
the tests as an independent client."""
