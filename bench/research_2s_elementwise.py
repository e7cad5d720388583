"""natural_edits.md 2s: a vocabulary-wide log-softmax into a new tensor against a kept one, and an in-place exp_ (190 x 49,152 float32, both cores): .venv/bin/python bench/research_2s_elementwise.py"""
import torch, time
x = torch.randn(190, 49152)
def t(fn, n=20):
    for _ in range(2): fn()
    s = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - s) / n * 1e3
y = x.clone()
print("threads", torch.get_num_threads())
print("exp_ in place %.1f ms" % t(lambda: y.copy_(x).exp_()), "copy_ only %.1f" % t(lambda: y.copy_(x)))
print("sub_ in place %.1f ms" % t(lambda: y.sub_(1.0)))
print("amax %.1f ms" % t(lambda: x.amax(-1)), "sum %.1f" % t(lambda: x.sum(-1)))
print("log_softmax %.1f ms" % t(lambda: x.log_softmax(-1)), "softmax %.1f" % t(lambda: x.softmax(-1)))
out = torch.empty_like(x)
print("log_softmax out= %.1f ms" % t(lambda: torch.log_softmax(x, -1, out=out) if hasattr(torch, 'log_softmax') else None))
