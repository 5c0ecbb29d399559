"""python -m serve: an OpenAI-compatible HTTP server and web chat for a ChatGLM2 (or ChatGLM3) model folder.

    python -m serve                                   # the bundled demo model on http://127.0.0.1:8000
    python -m serve --model-path PATH --quantize 4    # a folder made by tools/upgrade_checkpoint.py
    SERVE_API_KEY=... python -m serve --host 0.0.0.0  # reachable from other machines: set a key

Endpoints: GET /v1/models, POST /v1/chat/completions (with tool calls on ChatGLM3), POST /v1/completions,
POST /v1/embeddings, GET /health, GET /metrics (Prometheus), and the web chat at /. See serve/README.md.
"""

import argparse
import ipaddress
import logging
import os
import sys

from tools.model_folder import USAGE_ERROR, ModelFolderError, OneLineErrorParser, add_loading_arguments, load_chat_model, positive_int, probability


def non_negative_float(text):
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def build_parser():
    parser = OneLineErrorParser(prog="python -m serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loading_arguments(parser)
    parser.add_argument("--served-model-name", help="the model id clients send (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--allowed-hosts",
        type=lambda text: [name for name in text.split(",") if name.strip()],
        default=[],
        help="comma-separated Host names to answer besides the loopback ones (default: bound to loopback, only "
        "127.0.0.1, localhost, [::1]: no DNS rebinding; bound elsewhere, any); '*' answers any Host",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $SERVE_API_KEY, which keeps the key out of the process list; unset: no key)",
    )
    parser.add_argument("--max-batch-size", type=positive_int, default=16, help="sequences decoded together in one batch (default: 16)")
    parser.add_argument("--max-waiting", type=positive_int, default=64, help="requests that may wait for a batch; more get 429 (default: 64)")
    parser.add_argument("--batch-wait-ms", type=non_negative_float, default=10.0, help="how long a request that finds the server idle waits for others to start with it (default: 10)")
    parser.add_argument("--prefill-chunk", type=positive_int, default=128, help="prompt tokens read per step while other rows decode: a newcomer adds at most this to their time per token (default: 128)")
    parser.add_argument("--max-tokens-default", type=positive_int, default=512, help="answer length when a request gives no max_tokens (default: 512)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.8, help="temperature when a request gives none (default: 0.8, as model.chat)")
    parser.add_argument("--top-p", type=probability, default=0.8, help="top_p when a request gives none (default: 0.8, as model.chat)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=4 * 1024 * 1024, help="largest request body accepted (default: 4 MiB)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice; 1 can be faster on a busy machine)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return parser


def chat_postprocess(tokenizer):
    """The tokenizer's answer post-processing (ChatGLM2: strip, "[[训练时间]]" -> "2023年"), as `chat` applies
    it; None for ChatGLM3, whose replies (text or a tool call) the app reads as they finish."""
    if getattr(tokenizer, "chat_format", "chatglm2") == "chatglm3":
        return None
    return lambda text: tokenizer.process_chat_response(text, "", [])[0]


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def allowed_hosts(bind_host, extra=()):
    """The Host names a server bound to `bind_host` answers: bound to loopback, only loopback names
    (a page whose name rebinds to 127.0.0.1 must not reach the model) plus `extra`; `*` in `extra`,
    or a non-loopback bind without `extra`, accepts any (None). Names are compared as the Host check
    reads a header: lower case, without brackets or a port."""
    from .app import host_name

    extra = {host_name(name) for name in extra if name.strip()}
    if "*" in extra or (not extra and not is_loopback(bind_host)):
        return None
    # The address bound is a name clients may use too (http://192.168.1.5:8000/).
    return frozenset(extra | LOOPBACK_HOSTS | {bind_host.lower().strip("[]")})


def is_loopback(host):
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s" if args.log_level != "debug" else "%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log = logging.getLogger("serve")
    if not is_loopback(args.host) and args.api_key is None:
        log.warning("warning: binding %s without --api-key: anyone who can reach this port can use the model", args.host)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        tokenizer, model = load_chat_model(args)
    except ModelFolderError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130

    import uvicorn
    from uvicorn.main import STARTUP_FAILURE

    from .app import Server, Settings, create_app
    from .engine import Engine

    engine = Engine(
        model,
        tokenizer,
        max_batch_size=args.max_batch_size,
        max_waiting=args.max_waiting,
        batch_wait=args.batch_wait_ms / 1000,
        prefill_chunk=args.prefill_chunk,
    )
    settings = Settings(
        model_name=args.served_model_name or args.model_path.resolve().name,
        context_length=model.config.seq_length,
        max_tokens_default=args.max_tokens_default,
        temperature=args.temperature,
        top_p=args.top_p,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        allowed_hosts=allowed_hosts(args.host, args.allowed_hosts),
    )
    app = create_app(engine, tokenizer, settings, chat_postprocess=chat_postprocess(tokenizer))
    log.info("serving %s (context %d tokens) on http://%s:%d", settings.model_name, settings.context_length, args.host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False, log_level=args.log_level, timeout_graceful_shutdown=5)
    server = Server(config, engine)
    try:
        server.run()
    except KeyboardInterrupt:  # a second Ctrl-C during the graceful shutdown, as uvicorn.run takes it
        pass
    finally:
        engine.close()
    return 0 if server.started else STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
