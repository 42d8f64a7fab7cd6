#!/usr/bin/env bash
# Regenerate meshfl/wire/meshfl_pb2.py and meshfl_pb2_grpc.py from meshfl.proto.
# The generated files are committed so users need no protoc; run this after editing the proto
# (needs grpcio-tools of the same version as grpcio, e.g. pip install --target /tmp/gt grpcio-tools==1.85.1
# and PYTHONPATH=/tmp/gt).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=meshfl/wire
python -m grpc_tools.protoc -I "$dir" --python_out="$dir" --grpc_python_out="$dir" "$dir/meshfl.proto"
# protoc emits a top-level import that only works with $dir on sys.path; make it package-relative.
sed -i 's/^import meshfl_pb2 as meshfl__pb2$/from meshfl.wire import meshfl_pb2 as meshfl__pb2/' "$dir/meshfl_pb2_grpc.py"
# Generated code is not ours to lint.
for f in "$dir/meshfl_pb2.py" "$dir/meshfl_pb2_grpc.py"; do
  sed -i '1i # ruff: noqa' "$f"
done
grep -q '^from meshfl.wire import meshfl_pb2 as meshfl__pb2$' "$dir/meshfl_pb2_grpc.py" || { echo "import patch failed" >&2; exit 1; }
echo "regenerated $dir/meshfl_pb2.py and $dir/meshfl_pb2_grpc.py"
