# Sourced by the GGUF golden-data scripts (make_gguf_golden.sh, make_gguf_adapter_golden.sh): builds ggml's
# ggml-base library (gguf.cpp, ggml.c, ggml-quants.c; no CPU backend) into WORK/build, from SOURCE or, when SOURCE
# is empty, from a clone of github.com/ggml-org/ggml at GGML_COMMIT. Sets `ggml` to the source folder used.
#
#   build_ggml_base SOURCE WORK
readonly GGML_COMMIT=d99724f2b141fed9e1a9f402213506c081433465

build_ggml_base() {
  ggml=$1
  local work=$2
  if [ -z "$ggml" ]; then
    git clone --quiet https://github.com/ggml-org/ggml "$work/ggml"
    git -C "$work/ggml" checkout --quiet "$GGML_COMMIT"
    ggml="$work/ggml"
  fi
  cmake -S "$ggml" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_CPU=OFF \
    -DGGML_OPENMP=OFF -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF >"$work/cmake.log"
  cmake --build "$work/build" --target ggml-base >"$work/build.log"
}
