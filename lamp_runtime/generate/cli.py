"""`lamp generate`: one completion from the command line, printed alone (for scripting)."""

from __future__ import annotations

import asyncio
import sys


def register(subparsers) -> None:
    from ..backbone.cli_args import add_backbone_arguments
    from ..requests import DEFAULT_MAX_NEW_TOKENS

    p = subparsers.add_parser("generate", help="generate one completion with an adapter")
    p.add_argument("--adapter", help="LAMP / soft-prompt .safetensors file or PEFT prompt-tuning folder")
    p.add_argument("--pool", type=int, default=None, help="override the adapter's pooling block p")
    p.add_argument("--input", required=True, help="input text ('-' reads standard input)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the input in the backbone's chat template")
    add_backbone_arguments(p)
    p.set_defaults(func=run)


def chat_input(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def run(args) -> int:
    from ..adapters import load_adapter
    from ..backbone.cli_args import backbone_options
    from ..engine.streams import complete
    from ..engines import build_engine
    from ..requests import GenerationRequest, SamplingParams

    text = sys.stdin.read() if args.input == "-" else args.input
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, stop=tuple(args.stop), seed=args.seed)
    engine = build_engine("hf", backbone_options(args))  # decoder-only or T5, by the backbone
    task_id = None
    if args.adapter:
        engine.registry.register("cli", load_adapter(args.adapter, engine.backbone.hidden_size, pool=args.pool))
        task_id = "cli"
    if args.chat:
        text = chat_input(engine.backbone.tokenizer, text)
    try:
        result = asyncio.run(complete(engine, GenerationRequest(text, task_id, params)))
    finally:
        engine.shutdown()
    sys.stdout.write(result.text + "\n")
    return 0
