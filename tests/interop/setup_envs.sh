#!/usr/bin/env bash
# Builds what tests/interop runs: the client tools, each at its released version from PyPI, in
# virtual environments of their own under DIR (their pins are not ours), and llama.cpp's converter
# from the llama-cpp-python source distribution. Usage: tests/interop/setup_envs.sh DIR
# then: CHATGLM_INTEROP_DIR=DIR python -m pytest tests/interop
#
# DIR/tools-4.57, DIR/tools-5   FastChat, lm-eval, the converter's Python packages; transformers 4.57.6 / newest 5.x
# DIR/llamafactory              LLaMA-Factory at the newest transformers it allows
# DIR/llama.cpp                 convert_hf_to_gguf.py with its conversion/ and gguf-py/ folders
#
# torch is pinned in every command (an unpinned one pulls a CUDA build of several GB).
set -euo pipefail
dir=${1:?usage: setup_envs.sh DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
source "$here/versions.sh"

# pip's output without this machine's notes about local index folders; pip's exit status.
pip_quiet() {
    local status=0 log
    log=$(mktemp)
    "$@" > "$log" 2>&1 || status=$?
    grep -v "^WARNING: Location" "$log" || true
    rm -f "$log"
    return $status
}

make_venv() {  # NAME PACKAGE...
    local venv="$dir/$1"
    shift
    rm -rf "$venv"
    python3 -m venv "$venv"
    local start=$SECONDS
    pip_quiet "$venv/bin/pip" install -q --disable-pip-version-check "torch==$TORCH" "$@"
    echo "setup_envs: $(basename "$venv") built in $((SECONDS - start)) s"
}

build_llamafactory() {
    make_venv llamafactory "llamafactory==$LLAMAFACTORY"
    # LLaMA-Factory requires torchvision and torchaudio; PyPI has no build of either for torch 2.13,
    # and the ones pip takes do not load beside it (torchvision: "operator torchvision::nms does not
    # exist", torchaudio 2.11: "Could not load this library: _torchaudio.so"). LLaMA-Factory never
    # imports torchvision, and transformers would import the broken one: it is removed.
    # LLaMA-Factory imports torchaudio at start-up (for audio data only): its compiled libraries are
    # removed, and torchaudio loads as it does where they are absent (Python only, no C++ extension).
    pip_quiet "$dir/llamafactory/bin/pip" uninstall -q -y torchvision
    rm -f "$dir"/llamafactory/lib/python3*/site-packages/torchaudio/lib/*.so
    "$dir/llamafactory/bin/python" -c "import torchaudio, llamafactory.data"
}

fetch_converter() {  # llama.cpp's converter: its released source, from the llama-cpp-python sdist
    rm -rf "$dir/sdist" "$dir/llama.cpp"
    pip_quiet python3 -m pip download -q --disable-pip-version-check --no-deps \
        --no-binary llama-cpp-python -d "$dir/sdist" "llama-cpp-python==$LLAMA_CPP_PYTHON"
    mkdir -p "$dir/llama.cpp"
    local top="llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
    tar -xzf "$dir/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$dir/llama.cpp" --strip-components=3 \
        "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py"
    echo "setup_envs: llama.cpp converter extracted"
}

# lm_eval[api]: lm-eval with its local-completions client (test_lm_eval_server.py). The converter
# needs numpy, sentencepiece, protobuf (its requirements file) and gguf-py's own dependencies (tqdm,
# pyyaml, requests).
tools=("fschat==$FASTCHAT" "lm_eval[api]==$LM_EVAL" accelerate peft sentencepiece protobuf numpy tqdm pyyaml requests)

# The four jobs wait mostly on downloads and disk: they run side by side.
make_venv tools-4.57 "transformers==4.57.6" "${tools[@]}" & jobs_started=("$!:tools-4.57")
make_venv tools-5 "transformers>=5,<6" "${tools[@]}" & jobs_started+=("$!:tools-5")
build_llamafactory & jobs_started+=("$!:llamafactory")
fetch_converter & jobs_started+=("$!:llama.cpp")
failed=0
for job in "${jobs_started[@]}"; do
    if ! wait "${job%%:*}"; then
        echo "setup_envs: building ${job#*:} failed"
        failed=1
    fi
done
[ "$failed" -eq 0 ] || exit 1
echo "setup_envs: done in $SECONDS s ($dir)"
