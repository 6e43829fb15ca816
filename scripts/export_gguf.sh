#!/usr/bin/env bash
# Export a merged checkpoint (qlora-lite merge) to GGUF with llama.cpp's own converter (docs/data.md).
#   scripts/export_gguf.sh --fetch                      put llama.cpp's converter in .llama.cpp/ (once; needs PyPI)
#   scripts/export_gguf.sh MERGED_DIR OUT.gguf [TYPE]  convert; TYPE: f16 (default), bf16, f32, q8_0
#   scripts/export_gguf.sh --fetch VERSION              another llama-cpp-python's converter, in .llama.cpp-VERSION/
#                                                       (tests/test_gguf.py checks an early-2025 one: 0.3.7)
# llama.cpp's convert_hf_to_gguf.py is not in the `gguf` package: it lives in the llama.cpp repository, which the
# llama-cpp-python sdist vendors, so --fetch takes it (the script, its conversion/ package and gguf-py/, MIT)
# from that sdist with pip: no compiler, nothing installed. The conversion itself needs no network.
# QLORA_LITE_GGUF_CONVERTER names another convert_hf_to_gguf.py (e.g. a llama.cpp checkout).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python3}
LLAMA_CPP_PYTHON_VERSION=0.3.36  # vendors llama.cpp with the converter whose output docs/data.md measured
DEST="$ROOT/.llama.cpp"

if [[ ${1:-} == --fetch ]]; then
  if [[ -n ${2:-} ]]; then
    LLAMA_CPP_PYTHON_VERSION=$2 DEST="$ROOT/.llama.cpp-$2"
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # --no-binary for this one package only: the sdist (the wheels carry no converter); its build
  # requirements come as wheels, and nothing is built (pip only reads the sdist's metadata)
  "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" \
    -d "$tmp"
  src="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  members=("$src/convert_hf_to_gguf.py" "$src/gguf-py" "$src/LICENSE")
  # newer converters are a package (conversion/) beside the script; older sdists have the one script
  tar -tzf "$tmp"/llama_cpp_python-*.tar.gz "$src/conversion/__init__.py" > /dev/null 2>&1 && members+=("$src/conversion")
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp" "${members[@]}"
  rm -rf "$DEST.new" && mv "$tmp/$src" "$DEST.new"
  echo "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" > "$DEST.new/VERSION"
  rm -rf "$DEST" && mv "$DEST.new" "$DEST"  # whole or not at all
  echo "$DEST/convert_hf_to_gguf.py"
  exit 0
fi

if [[ $# -lt 2 || $# -gt 3 ]]; then
  sed -n '2,6p' "$0" | sed 's/^# //' >&2
  exit 2
fi
MERGED=$1 OUTFILE=$2 TYPE=${3:-f16}
CONVERTER=${QLORA_LITE_GGUF_CONVERTER:-$DEST/convert_hf_to_gguf.py}
if [[ ! -f $CONVERTER ]]; then
  echo "export_gguf: no converter at $CONVERTER; run scripts/export_gguf.sh --fetch" \
    "(or set QLORA_LITE_GGUF_CONVERTER)" >&2
  exit 2
fi
if [[ ! -f $MERGED/config.json ]]; then
  echo "export_gguf: $MERGED has no config.json; pass the folder qlora-lite merge wrote" >&2
  exit 2
fi
if [[ -e $OUTFILE ]]; then
  echo "export_gguf: $OUTFILE exists; remove it or pass another path" >&2
  exit 2
fi
# written beside the target and renamed: an interrupted conversion leaves no half GGUF under its name
partial="$OUTFILE.partial"
"$PY" "$CONVERTER" "$MERGED" --outfile "$partial" --outtype "$TYPE"
mv "$partial" "$OUTFILE"
echo "$OUTFILE"
