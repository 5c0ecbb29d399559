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
import sys
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DEMO_DIR.parent))

from tools.model_folder import (  # noqa: E402
    BUNDLED_MODEL,
    INTERRUPTED,
    USAGE_ERROR,
    ModelFolderError,
    OneLineErrorParser,
    add_loading_arguments,
    load_chat_model,
    positive_int,
    probability,
)

CLEAR_COMMANDS = ("clear",)
STOP_COMMANDS = ("stop", "exit", "quit")
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
    """A problem with the arguments (--system, --tools), reported as one line without a traceback."""


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def build_parser():
    parser = OneLineErrorParser(
        prog="cli_demo.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_loading_arguments(parser)
    parser.add_argument("--query", action="append", metavar="TEXT", help="answer TEXT and exit; repeat for a multi-turn conversation")
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
        tokenizer, model = load_chat_model(args)
        opening = first_history(args, tokenizer)
    except (UsageError, ModelFolderError) as error:
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
