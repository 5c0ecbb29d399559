"""Chat with a ChatGLM2 model in the terminal: the bundled tiny demo model, or the released weights.

    python demo/cli_demo.py                                    # interactive chat with demo/tiny-chatglm2
    python demo/cli_demo.py --greedy --query "你好"             # answer once, print, exit (for scripts)
    python demo/cli_demo.py --model-path PATH --quantize 4     # a folder made by tools/upgrade_checkpoint.py
    python demo/cli_demo.py --model-path CHATGLM3 --tools tools.json   # ChatGLM3 function calling

Interactive commands: `clear` forgets the conversation, `stop` (or `exit`) quits. Ctrl-C while an
answer is being written stops that answer (what was written stays in the history); Ctrl-C or Ctrl-D
at the prompt quits. Each turn re-encodes the whole history with the chat prompt, as `chat` does.

ChatGLM3 models: `--system` sets the system message and `--tools FILE` (a JSON list of tool schemas)
offers tools. When the model calls one, the call is shown (it is never run) and the next line you type
is the tool's result, sent back as the `observation` turn.
"""

import argparse
import json
import re
import sys
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DEMO_DIR.parent))

from tools.model_folder import (  # noqa: E402
    CONFIG_FILE,
    INTERRUPTED,
    MODEL_MODULES,
    TOKENIZER_FILE,
    USAGE_ERROR,
    ModelFolderError,
    check_weights,
    first_line,
)

BUNDLED_MODEL = DEMO_DIR / "tiny-chatglm2"
CLEAR_COMMANDS = ("clear",)
STOP_COMMANDS = ("stop", "exit", "quit")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_KERNEL_HELP = (
    "the quantized layers' CPU kernel: auto (default: chatglm_cpu where it is installed, else torch), "
    "torch (exact weight-only), chatglm_cpu (pip install ./cpu_kernels: int8 activations, 1.5-2.6x faster "
    "int4 decoding) or onnxruntime; also for a quantized checkpoint as stored"
)
BANNER = (
    "ChatGLM2 terminal chat. Type a message and press Enter.\n"
    "Commands: 'clear' forgets the conversation, 'stop' quits. "
    "Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt quits."
)
BUNDLED_NOTE = (
    "The bundled tiny model only knows the few hundred dialogs it was trained on (demo/data/dialogs.jsonl).\n"
    "Try: 你好 / 你是谁？ / 中国的首都是哪里？ / Hello / What can you do? / My name is Alice."
)


class UsageError(Exception):
    """A problem with the arguments or the model folder, reported as one line without a traceback."""


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def probability(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def device_name(text):
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def build_parser():
    parser = OneLineErrorParser(
        prog="cli_demo.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model-path",
        type=Path,
        default=BUNDLED_MODEL,
        help="model folder with this package's code files, config, tokenizer.model and weights (default: the bundled demo model)",
    )
    parser.add_argument("--query", action="append", metavar="TEXT", help="answer TEXT and exit; repeat for a multi-turn conversation")
    parser.add_argument("--quantize", type=int, choices=(0, 4, 8), default=0, help="quantize the weights to 4 or 8 bits after loading (0: no)")
    parser.add_argument("--cpu-kernel", help=CPU_KERNEL_HELP)
    parser.add_argument("--device", type=device_name, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float32 on cpu, bfloat16 (or float16) on cuda, float16 on mps")
    parser.add_argument("--max-new-tokens", type=positive_int, default=512, help="longest answer, in tokens (default: 512)")
    parser.add_argument("--temperature", type=positive_float, default=0.8, help="sampling temperature (default: 0.8)")
    parser.add_argument("--top-p", type=probability, default=0.8, help="nucleus sampling threshold (default: 0.8)")
    parser.add_argument("--greedy", action="store_true", help="always pick the most likely token (ignores --temperature/--top-p)")
    parser.add_argument("--seed", type=int, help="seed the sampler, for repeatable answers")
    parser.add_argument("--system", metavar="TEXT", help="ChatGLM3: the system message")
    parser.add_argument("--tools", type=Path, metavar="FILE", help="ChatGLM3: a JSON file with the list of tool schemas to offer")
    return parser


def first_history(args, tokenizer):
    """The conversation's opening: empty, or ChatGLM3's system message with its tools."""
    if args.system is None and args.tools is None:
        return []
    if getattr(tokenizer, "chat_format", "chatglm2") != "chatglm3":
        raise UsageError("--system and --tools need a ChatGLM3 model; this one chats in the ChatGLM2 format")
    system = {"role": "system", "content": args.system or ""}
    if args.tools is not None:
        try:
            tools = json.loads(args.tools.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"{args.tools}: cannot read the tools ({error})") from None
        if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
            raise UsageError(f"{args.tools}: expected a JSON list of tool schemas (objects)")
        system["tools"] = tools
    return [system]


def is_tool_call(response):
    return isinstance(response, dict) and "parameters" in response


def check_model_folder(folder):
    """Raise UsageError naming what is missing, before transformers fails with a long traceback."""
    if not folder.exists():
        raise UsageError(f"--model-path {folder}: no such folder")
    if not folder.is_dir():
        raise UsageError(f"--model-path {folder}: not a folder")
    if not (folder / CONFIG_FILE).is_file():
        raise UsageError(f"{folder / CONFIG_FILE} is missing: not a model folder")
    if not (folder / TOKENIZER_FILE).is_file():
        raise UsageError(f"{folder / TOKENIZER_FILE} is missing: the tokenizer needs it")
    for name in MODEL_MODULES:
        code = folder / name
        if not code.is_file():
            raise UsageError(f"{code} is missing: make the folder with tools/upgrade_checkpoint.py")
        text = code.read_text(encoding="utf-8", errors="replace").strip()
        if text.endswith(".py") and "\n" not in text:
            # git writes a symlink it could not create as a one-line file holding the target path.
            raise UsageError(
                f"{code} is a placeholder for a symlink to {text}: clone with symlinks enabled "
                "(on Windows: git clone -c core.symlinks=true)"
            )
    try:
        check_weights(folder)  # a truncated or corrupt file is named here, not in a long traceback
    except ModelFolderError as error:
        raise UsageError(str(error)) from None


def pick_device(name):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine (or this torch build) has no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: Apple's MPS backend is not available here")
    return name


def pick_dtype(name, device):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    # Half precision on CPUs is slow or unsupported in places; float32 is the safe choice.
    return torch.float32


def load(args):
    check_model_folder(args.model_path)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    # Imported here so that --help and argument errors answer at once.
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_path, trust_remote_code=True)
        model = AutoModel.from_pretrained(args.model_path, trust_remote_code=True, dtype=dtype)
        if args.quantize or args.cpu_kernel:
            # Layer by layer onto the device: the float model never has to fit there whole. The
            # model checks the kernel's name (a bad one is a ValueError naming the choices).
            model = model.quantize(args.quantize, device=device, cpu_kernel=args.cpu_kernel)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load {args.model_path}: {first_line(error)}") from None
    return tokenizer, model.to(device).eval()


def generation_options(args):
    if args.greedy:
        return {"do_sample": False, "max_new_tokens": args.max_new_tokens}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}


def shown_text(response):
    """A reply as the terminal shows it: text, or a tool call as JSON (ChatGLM3; it is never run)."""
    if isinstance(response, str):
        return response
    return "[tool call] " + json.dumps(response, ensure_ascii=False)


def stream_answer(model, tokenizer, query, history, options, out, role="user"):
    """Write the answer to `out` as it grows; return (reply, history with this turn, whether Ctrl-C stopped it).

    A stopped answer stays in the history as far as it was written: it is what the user saw. The
    history is the tokenizer's (pairs for ChatGLM2, messages for ChatGLM3).
    """
    shown = ""
    response, new_history = tokenizer.process_chat_response("", query, history, role=role)
    turns = model.stream_chat(tokenizer, query, history=history, role=role, **options)
    try:
        for response, new_history in turns:
            text = shown_text(response)
            out.write(text[len(shown) :] if text.startswith(shown) else "\n" + text)
            out.flush()
            shown = text
    except KeyboardInterrupt:
        turns.close()
        return response, new_history, True
    return response, new_history, False


def run_queries(model, tokenizer, queries, options, history):
    """Answer each query after the previous ones, one answer per line on stdout. After a tool call
    (ChatGLM3), the next query is the tool's result."""
    role = "user"
    for query in queries:
        response, history, stopped = stream_answer(model, tokenizer, query, history, options, sys.stdout, role)
        role = "observation" if is_tool_call(response) else "user"
        print()
        if stopped:
            return INTERRUPTED
    return 0


def read_query(prompt="You / 用户"):
    """The next line typed, or None when the user quits (stop, Ctrl-D, Ctrl-C)."""
    try:
        line = input(f"\n{prompt}: ")
    except (EOFError, KeyboardInterrupt):
        print()
        return None
    return None if line.strip().lower() in STOP_COMMANDS else line.strip()


def chat_loop(model, tokenizer, options, bundled, opening):
    print(BANNER)
    if bundled:
        print(BUNDLED_NOTE)
    history, role = list(opening), "user"
    while (query := read_query("Tool result / 工具结果" if role == "observation" else "You / 用户")) is not None:
        if not query:
            continue
        if query.lower() in CLEAR_COMMANDS:
            history, role = list(opening), "user"
            print("(conversation cleared)")
            continue
        print("\nChatGLM: ", end="", flush=True)
        try:
            response, history, stopped = stream_answer(model, tokenizer, query, history, options, sys.stdout, role)
        except ValueError as error:  # the conversation outgrew the model's context
            print(f"\nerror: {error} (type 'clear' to start over)")
            continue
        print(" [stopped]" if stopped else "")
        role = "observation" if is_tool_call(response) and not stopped else "user"
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        tokenizer, model = load(args)
        opening = first_history(args, tokenizer)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:  # loading 12 GB takes a while; giving up on it is not an error
        return INTERRUPTED
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    options = generation_options(args)
    if args.query:
        try:
            return run_queries(model, tokenizer, args.query, options, opening)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return USAGE_ERROR
    bundled = args.model_path.resolve() == BUNDLED_MODEL
    return chat_loop(model, tokenizer, options, bundled, opening)


if __name__ == "__main__":
    sys.exit(main())
