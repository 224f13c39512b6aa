"""RSS growth vs the number of distinct GEMM row counts through prepacked bf16 linears (SmolLM2-135M's four linear shapes), then the same shapes again and after malloc_trim: how much of a server's RSS growth oneDNN's per-shape primitives and the heap keep. Run: OMP_NUM_THREADS=1 [ONEDNN_PRIMITIVE_CACHE_CAPACITY=N] [MALLOC_ARENA_MAX=N] python scripts/rss_gemm_shapes.py 600"""
import os, sys, torch, ctypes, json
from torch import nn
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conveyor.models.packed import pack_linears
torch.set_num_threads(1)
def rss():
    for l in open("/proc/self/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) / 1024
shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
m = nn.Sequential(*[nn.Linear(i, o, bias=False) for i, o in shapes]).bfloat16()
pack_linears(m)
xs = {}
out = []
N = int(sys.argv[1]) if len(sys.argv) > 1 else 600
with torch.no_grad():
    for rows in (1, 2, 3): m[0](torch.randn(rows, 576).bfloat16())
    r0 = rss()
    for rows in range(1, N + 1):
        x = torch.randn(rows, 576).bfloat16()
        for lin, (i, o) in zip(m, shapes):
            lin(torch.randn(rows, i).bfloat16())
        if rows % 100 == 0:
            out.append((rows, round(rss() - r0, 1)))
    # second pass: same shapes again (cache hits or, over capacity, misses)
    for rows in range(1, N + 1):
        for lin, (i, o) in zip(m, shapes):
            lin(torch.randn(rows, i).bfloat16())
    out.append(("again", round(rss() - r0, 1)))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    out.append(("trim", round(rss() - r0, 1)))
print(json.dumps({"cap": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"), "lru": os.environ.get("LRU_CACHE_CAPACITY"), "arena": os.environ.get("MALLOC_ARENA_MAX"), "growth_mib": out}))
