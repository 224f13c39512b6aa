"""``conveyor generate``: run prompts through the offline engine and print the completions."""

from __future__ import annotations

import json
import sys

from conveyor.cli.args import add_engine_args, engine_kwargs
from conveyor.errors import InvalidRequestError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate completions for prompts (offline, batched)")
    p.add_argument("prompts", nargs="*", help="prompts; with --prompts-file, read from there too")
    p.add_argument("--prompts-file", help="a text file with one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template (each prompt is a user message)")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_engine_args(p)
    p.set_defaults(func=run)


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        try:
            with open(args.prompts_file) as f:
                for line in f:
                    line = line.rstrip("\n")
                    if line.strip():
                        prompts.append(json.loads(line)["prompt"] if line.lstrip().startswith("{") else line)
        except OSError as e:
            raise InvalidRequestError(f"cannot read --prompts-file: {e}") from e
    if not prompts:
        raise InvalidRequestError("give at least one prompt (as an argument or with --prompts-file)")
    return prompts


def run(args) -> int:
    from conveyor import LLM, SamplingParams
    prompts = _read_prompts(args)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.sampling_seed,
        stop=args.stop, ignore_eos=args.ignore_eos)
    llm = LLM(**engine_kwargs(args))
    if args.chat:
        tok = llm.get_tokenizer()
        system = [{"role": "system", "content": args.system}] if args.system else []
        inputs = [tok.encode_chat(system + [{"role": "user", "content": p}]) for p in prompts]
    else:
        inputs = prompts
    outputs = llm.generate(inputs, params, use_tqdm=len(prompts) > 1)
    for prompt, out in zip(prompts, outputs):
        comp = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": prompt, "text": comp.text, "finish_reason": comp.finish_reason,
                              "num_tokens": len(comp.token_ids), "ttft_s": out.metrics.ttft,
                              "e2e_s": out.metrics.e2e_latency}))
        elif len(prompts) == 1:
            print(comp.text)
        else:
            print(f"--- {prompt!r} [{comp.finish_reason}]\n{comp.text}")
    sys.stdout.flush()
    return 0
