"""Generate the Python modules for lazypull's .proto files (grpcio-tools' protoc).

Four kinds: `*_wire.py` for containerd's APIs (messages, service base and stub for
snapshotter/api/wire.py: what the service and its containerd client use), and
protobuf's own `*_pb2.py` (messages), `*_grpc.py` (grpclib stubs) and `*_pb2_grpc.py`
(grpcio stubs), which the tests use as an independent client.

Usage: python tools/generate-protos.py [OUTPUT_ROOT]
Without OUTPUT_ROOT the modules are written beside their .proto files; a test
generates into a temporary root and compares, so the committed modules never
drift from their sources.
"""

import os
import pathlib
import shutil
import sys
import tempfile

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_DIRS = ["snapshotter/api"]
WIRE_DIRS = ["snapshotter/api/containerd"]


def proto_files() -> list[str]:
    found: list[str] = []
    for directory in PROTO_DIRS:
        found += sorted(str(p.relative_to(ROOT)) for p in (ROOT / directory).rglob("*.proto"))
    return found


def generate(output_root: pathlib.Path) -> None:
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    # grpclib's protoc plugin is installed beside this interpreter.
    plugin = shutil.which("protoc-gen-grpclib_python",
                          path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if plugin is None:
        raise SystemExit("protoc-gen-grpclib_python not found (pip install grpclib)")
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={output_root}",
            f"--pyi_out={output_root}", f"--grpc_python_out={output_root}",
            f"--plugin=protoc-gen-grpclib_python={plugin}",
            f"--grpclib_python_out={output_root}", *proto_files()]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generate_wire(output_root, well_known)


def generate_wire(output_root: pathlib.Path, well_known: pathlib.Path) -> None:
    from google.protobuf import descriptor_pb2

    sources = [p for p in proto_files() if any(p.startswith(d + "/") for d in WIRE_DIRS)]
    with tempfile.TemporaryDirectory() as scratch:
        descriptors = pathlib.Path(scratch) / "set.pb"
        args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{well_known}",
                f"--descriptor_set_out={descriptors}", "--include_imports", *sources]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes()).file
    classes = _class_names(files)
    for file in files:
        if file.name in sources:
            target = output_root / file.name.replace(".proto", "_wire.py")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_wire_module(file, classes))


# descriptor.proto's FieldDescriptorProto.Type numbers and the wire codec's kinds
_KINDS = {9: "STRING", 12: "BYTES", 8: "BOOL", 5: "INT32", 3: "INT64", 13: "UINT32",
          4: "UINT64", 14: "ENUM", 11: "MESSAGE"}
_HINTS = {"STRING": "str", "BYTES": "bytes", "BOOL": "bool", "INT32": "int", "INT64": "int",
          "UINT32": "int", "UINT64": "int", "ENUM": "int"}
_REPEATED = 3
_WELL_KNOWN = "google.protobuf."


def _module_of(proto_name: str) -> str:
    return proto_name.removesuffix(".proto").replace("/", ".") + "_wire"


def _class_names(files) -> dict[str, tuple[str, str]]:
    """Full message name (".pkg.Name") -> (module, class) of every top-level message
    (map entries, the only nested messages allowed, are written as MAP fields)."""
    found: dict[str, tuple[str, str]] = {}
    for file in files:
        module = ("snapshotter.api.wellknown" if file.package + "." == _WELL_KNOWN
                  else _module_of(file.name))
        for message in file.message_type:
            found[f".{file.package}.{message.name}"] = (module, message.name)
    return found


def _wire_module(file, classes: dict[str, tuple[str, str]]) -> str:
    """The source of `file`'s wire module."""
    own = _module_of(file.name)
    imports: set[str] = set()
    entries = {f".{file.package}.{m.name}.{n.name}": n
               for m in file.message_type for n in m.nested_type}

    def ref(type_name: str) -> str:
        module, name = classes[type_name]
        if module == own:
            return name
        imports.add(module)
        return f"{module.rsplit('.', 1)[1]}.{name}"

    def field_line(field) -> tuple[str, str]:
        entry = entries.get(field.type_name)
        if entry is not None:  # map<string, V>
            key, value = entry.field
            if _KINDS.get(key.type) != "STRING":
                raise SystemExit(f"{file.name}: {field.name}: only string map keys")
            kind = _KINDS[value.type]
            if kind == "MESSAGE":
                cls = ref(value.type_name)
                return (f'wire.Field({field.number}, "{field.name}", wire.MAP, '
                        f"value=wire.MESSAGE, message={cls})", f"dict[str, {cls}]")
            return (f'wire.Field({field.number}, "{field.name}", wire.MAP, value=wire.{kind})',
                    f"dict[str, {_HINTS[kind]}]")
        kind = _KINDS.get(field.type)
        if kind is None:
            raise SystemExit(f"{file.name}: {field.name}: type {field.type} not supported")
        repeated = field.label == _REPEATED
        extra = ", repeated=True" if repeated else ""
        hint = _HINTS.get(kind, "")
        if kind == "MESSAGE":
            hint = ref(field.type_name)
            extra += f", message={hint}"
        return (f'wire.Field({field.number}, "{field.name}", wire.{kind}{extra})',
                f"list[{hint}]" if repeated else hint)

    blocks: list[list[str]] = []
    for enum in file.enum_type:
        blocks.append([f"# enum {enum.name}"] +
                      [f"{value.name} = {value.number}" for value in enum.value])
    for message in _in_dependency_order(file):
        for nested in message.nested_type:
            if not nested.options.map_entry:
                raise SystemExit(f"{file.name}: {message.name}: nested messages not supported")
        lines = [field_line(field) for field in message.field]
        block = [f"class {message.name}(wire.Message):"]
        if lines:
            block += ["    FIELDS = ("] + [f"        {spec}," for spec, _ in lines] + ["    )"]
            block += [f"    {field.name}: {hint}" for field, (_, hint) in zip(message.field, lines,
                                                                         strict=True)]
        else:
            block.append("    pass")
        blocks.append(block)
    for service in file.service:
        block = [f"class {service.name}Base(wire.Service):",
                 f'    NAME = "{file.package}.{service.name}"', "    METHODS = ("]
        for method in service.method:
            cardinality = {(False, False): "UNARY_UNARY", (False, True): "UNARY_STREAM",
                           (True, False): "STREAM_UNARY", (True, True): "STREAM_STREAM"}[
                               (method.client_streaming, method.server_streaming)]
            block.append(f'        wire.Method("{method.name}", Cardinality.{cardinality},')
            block.append(f"                    {ref(method.input_type)}, "
                         f"{ref(method.output_type)}),")
        blocks.append([*block, "    )"])
        blocks.append([f"class {service.name}Stub(wire.Stub):",
                       f"    NAME = {service.name}Base.NAME",
                       f"    METHODS = {service.name}Base.METHODS"])
    head = [f'"""{file.package} for the wire codec (snapshotter/api/wire.py).', "",
            f"Generated by tools/generate-protos.py from {pathlib.PurePath(file.name).name}: "
            'edit that and run it again."""', ""]
    if file.service:
        head += ["from grpclib.const import Cardinality", ""]
    names: dict[str, set[str]] = {"snapshotter.api": {"wire"}}
    for module in imports:
        package, name = module.rsplit(".", 1)
        names.setdefault(package, set()).add(name)
    head += [f"from {package} import {', '.join(sorted(names[package]))}"
             for package in sorted(names)]
    # isort's spacing: one blank line before a statement, two before a class
    after_imports = "\n\n" if file.enum_type else "\n\n\n"
    return ("\n".join(head) + after_imports + "\n\n\n".join("\n".join(b) for b in blocks)
            + "\n")


def _in_dependency_order(file) -> list:
    """The file's messages, each after the messages of this file its fields name."""
    own = {f".{file.package}.{m.name}": m for m in file.message_type}
    placed: list = []
    seen: set[str] = set()

    def place(name: str, path: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in path:
            raise SystemExit(f"{file.name}: recursive messages not supported ({name})")
        message = own[name]
        nested = {f"{name}.{n.name}": n for n in message.nested_type}
        for field in message.field:
            targets = [field.type_name]
            if field.type_name in nested:
                targets = [f.type_name for f in nested[field.type_name].field]
            for target in targets:
                if target in own:
                    place(target, (*path, name))
        seen.add(name)
        placed.append(message)

    for name in own:
        place(name, ())
    return placed


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
