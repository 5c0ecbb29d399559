"""Run in FastChat's virtual environment: answer one query the way `python -m fastchat.serve.cli`
does (FastChat's load_model, its conversation template for the folder, the stream function it picks
for the model), and with this package's `model.chat`, both greedy. Prints JSON.

Usage: python fastchat_chat.py MODEL_FOLDER QUERY MAX_NEW_TOKENS
"""

import json
import sys
from importlib.metadata import version

from fastchat.model.model_adapter import get_conversation_template, get_generate_stream_function, load_model

path, query, max_new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])

model, tokenizer = load_model(path, device="cpu")
conversation = get_conversation_template(path)
conversation.append_message(conversation.roles[0], query)
conversation.append_message(conversation.roles[1], None)
prompt = conversation.get_prompt()
generate_stream = get_generate_stream_function(model, path)
params = {"prompt": prompt, "temperature": 0.0, "max_new_tokens": max_new_tokens, "echo": False}
outputs = list(generate_stream(model, tokenizer, params, "cpu"))

prompt_length = outputs[-1]["usage"]["prompt_tokens"]
ours, _ = model.chat(tokenizer, query, history=[], do_sample=False, max_length=prompt_length + max_new_tokens)
print(json.dumps({
    "versions": {name: version(name) for name in ("fschat", "transformers", "torch")},
    "template": conversation.name,
    "stream_function": generate_stream.__name__,
    "fastchat": outputs[-1]["text"],
    "finish_reason": outputs[-1]["finish_reason"],
    "usage": outputs[-1]["usage"],
    "ours": ours,
}, ensure_ascii=False))
