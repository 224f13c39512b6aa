"""``conveyor generate``: run prompts through the offline engine and print the completions."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from conveyor.cli.args import add_engine_args, engine_kwargs
from conveyor.config_flags import add_config_flags, config_from_args, opt
from conveyor.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class GenerateOptions:
    """``conveyor generate``'s own flags (the engine's come from ``conveyor.config``); the
    sampling values are checked where they land, by ``SamplingParams``."""

    prompts_file: str | None = opt(None, "a text file with one prompt per line, or JSONL with a "
                                         "'prompt' field")
    chat: bool = opt(False, "apply the model's chat template (each prompt is a user message)")
    system: str | None = opt(None, "system message for --chat")
    max_tokens: int = opt(256, "tokens to generate at most per prompt")
    temperature: float = opt(0.0, "sampling temperature; 0 is greedy")
    top_p: float = opt(1.0, "nucleus sampling mass")
    top_k: int = opt(0, "sample among the k likeliest tokens; 0: all")
    min_p: float = opt(0.0, "drop tokens below this fraction of the likeliest's probability")
    repetition_penalty: float = opt(1.0, "penalty on tokens already in the prompt or output")
    sampling_seed: int | None = opt(None, "per-request seed")
    stop: tuple[str, ...] = opt((), "stop string (repeatable)", parse=str, repeat=True,
                                show_default="none")
    ignore_eos: bool = opt(False, "keep generating past EOS")
    json: bool = opt(False, "print one JSON object per prompt")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate completions for prompts (offline, batched)")
    p.add_argument("prompts", nargs="*", help="prompts; with --prompts-file, read from there too")
    add_config_flags(p, GenerateOptions)
    add_engine_args(p)
    p.set_defaults(func=run)


def _read_prompts(given: list[str], path: str | None) -> list[str]:
    prompts = list(given)
    if path:
        try:
            with open(path) as f:
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
    opts = config_from_args(GenerateOptions, args)
    prompts = _read_prompts(args.prompts, opts.prompts_file)
    params = SamplingParams(
        max_tokens=opts.max_tokens, temperature=opts.temperature, top_p=opts.top_p,
        top_k=opts.top_k, min_p=opts.min_p, repetition_penalty=opts.repetition_penalty,
        seed=opts.sampling_seed, stop=opts.stop or None, ignore_eos=opts.ignore_eos)
    llm = LLM(**engine_kwargs(args))
    if opts.chat:
        tok = llm.get_tokenizer()
        system = [{"role": "system", "content": opts.system}] if opts.system else []
        inputs = [tok.encode_chat(system + [{"role": "user", "content": p}]) for p in prompts]
    else:
        inputs = prompts
    try:
        outputs = llm.generate(inputs, params, use_tqdm=len(prompts) > 1)
    finally:
        llm.close()                  # sends the KV events still queued, if any are published
    for prompt, out in zip(prompts, outputs):
        comp = out.outputs[0]
        if opts.json:
            print(json.dumps({"prompt": prompt, "text": comp.text, "finish_reason": comp.finish_reason,
                              "num_tokens": len(comp.token_ids), "ttft_s": out.metrics.ttft,
                              "e2e_s": out.metrics.e2e_latency}))
        elif len(prompts) == 1:
            print(comp.text)
        else:
            print(f"--- {prompt!r} [{comp.finish_reason}]\n{comp.text}")
    sys.stdout.flush()
    return 0
