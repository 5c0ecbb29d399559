"""Run in LLaMA-Factory's virtual environment: answer one query greedily with LLaMA-Factory's own
`ChatModel` (template chatglm3, optionally a LoRA adapter), and with this package's chat ids
(`build_chat_input`) and `generate` on the same weights (the adapter merged by peft, as
LLaMA-Factory does). LLaMA-Factory returns the generated text as decoded, without ChatGLM3's
metadata-line split that `model.chat` applies, so the text compared is `generate`'s, decoded with
special tokens skipped. Prints JSON.

Usage: python llamafactory_chat.py MODEL_FOLDER ADAPTER_FOLDER|- QUERY MAX_NEW_TOKENS
"""

import json
import sys
from importlib.metadata import version

from llamafactory.chat import ChatModel
from transformers import AutoModel, AutoTokenizer

path, adapter, query, max_new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

arguments = {
    "model_name_or_path": path, "template": "chatglm3", "trust_remote_code": True,
    "infer_backend": "huggingface", "do_sample": False, "max_new_tokens": max_new_tokens,
}
if adapter != "-":
    arguments.update(adapter_name_or_path=adapter, finetuning_type="lora")
(response,) = ChatModel(arguments).chat([{"role": "user", "content": query}])

tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
if adapter != "-":
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
inputs = tokenizer.build_chat_input(query)
prompt_length = inputs["input_ids"].shape[1]
generated = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)[0, prompt_length:]
ours = tokenizer.decode(generated, skip_special_tokens=True)
print(json.dumps({
    "versions": {name: version(name) for name in ("llamafactory", "transformers", "torch", "peft")},
    "llamafactory": response.response_text,
    "prompt_length": response.prompt_length,
    "finish_reason": response.finish_reason,
    "ours_prompt_length": prompt_length,
    "ours": ours,
}, ensure_ascii=False))
