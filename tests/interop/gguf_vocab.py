"""Run in a tools virtual environment: read a GGUF file with gguf-py (the copy that ships beside
llama.cpp's converter) and print its vocabulary and metadata as JSON.

Usage: python gguf_vocab.py LLAMA_CPP_FOLDER FILE.gguf
"""

import json
import sys

sys.path.insert(0, f"{sys.argv[1]}/gguf-py")
from gguf import GGUFReader  # noqa: E402

reader = GGUFReader(sys.argv[2])
fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
print(json.dumps({
    "metadata": {name: value for name, value in fields.items() if not name.startswith("tokenizer.ggml.token")},
    "tokens": fields["tokenizer.ggml.tokens"],
    "token_types": fields["tokenizer.ggml.token_type"],
    "tensors": sorted(tensor.name for tensor in reader.tensors),
}, ensure_ascii=False))
