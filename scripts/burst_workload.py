"""Write the prefill-burst workload of issue 20 as a JSONL replay file for `conveyor bench`.

N long documents (~WORDS words each, "summarize this") arrive at the same moment as N short
chats, interleaved; every request runs to its max_tokens (ignore_eos), so every server does the
same work. usage: python scripts/burst_workload.py OUT.jsonl [--num 16] [--words 1200]
"""

from __future__ import annotations

import argparse
import json
import random

WORDS = ("bridge history careful garden story teacher answer window cloud machine engine shadow "
         "village orchard stone travel summer paper letter quiet city island journey silver "
         "mountain light blanket morning winter promise forest kitchen signal river market "
         "lantern harbor meadow candle station ladder").split()
CHATS = ["What is the capital of France?", "Give me three tips for sleeping better.",
         "How do I boil an egg?", "Write a haiku about autumn.", "What is 17 times 23?",
         "Name a good book for a long flight.", "Why is the sky blue?",
         "Suggest a name for a black cat."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--num", type=int, default=16, help="long documents, and as many short chats")
    p.add_argument("--words", type=int, default=1200)
    p.add_argument("--doc-tokens", type=int, default=64, help="max_tokens of a document's answer")
    p.add_argument("--chat-tokens", type=int, default=128, help="max_tokens of a chat's answer")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w") as f:
        for i in range(args.num):
            doc = " ".join(rng.choice(WORDS) for _ in range(args.words))
            rows = [{"prompt": f"Summarize this document.\n\n{doc}\n\nSummary:",
                     "max_tokens": args.doc_tokens},
                    {"prompt": f"User: {CHATS[i % len(CHATS)]}\nAssistant:",
                     "max_tokens": args.chat_tokens}]
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
