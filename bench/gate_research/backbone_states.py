"""Does the backbone's own last-token state (layers 6-24, mean-centred cosine) separate real
paraphrases from same-subject locality prompts, alone or added to MiniLM? Dev items 200-599."""
import json, sys, time, torch, numpy as np
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__import__('os').path.abspath(__file__)), '..', '..'))
from server.settings import Settings
from server.model.loading import load_backbone
from server.lks.gate import SentenceEncoder, mask_subject
torch.set_num_threads(2)
bb = load_backbone(Settings())
tok = bb.tokenizer
enc = SentenceEncoder()
def auc(pos, neg):
    pos = np.asarray(pos); neg = np.asarray(neg)
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())
LAYERS = [6, 10, 14, 18, 24]
@torch.inference_mode()
def last_states(texts, bs=32):
    out = {l: [] for l in LAYERS}
    tok.padding_side = 'left'
    for i in range(0, len(texts), bs):
        b = tok(texts[i:i+bs], return_tensors='pt', padding=True)
        hs = bb.model(**b, output_hidden_states=True).hidden_states
        for l in LAYERS:
            out[l].append(hs[l+1][:, -1].float())
    return {l: torch.cat(v) for l, v in out.items()}
res = {}
for ds in ['zsre', 'counterfact']:
    d = json.load(open(f'{Settings().data_dir}/{ds}.json'))[200:600]
    P = [x['prompt'] for x in d]; G = [x['generality'] for x in d]; L = [x['locality']['prompt'] for x in d]
    t = time.time()
    SP, SG, SL = last_states(P), last_states(G), last_states(L)
    print(ds, 'backbone', time.time() - t, flush=True)
    m = lambda xs: enc.encode([mask_subject(x['prompt' if k=='P' else 'generality'] if k!='L' else x['locality']['prompt'], [x['subject']]) for x in d])
    EP = enc.encode([mask_subject(x['prompt'], [x['subject']]) for x in d])
    EG = enc.encode([mask_subject(x['generality'], [x['subject']]) for x in d])
    EL = enc.encode([mask_subject(x['locality']['prompt'], [x['subject']]) for x in d])
    mg, ml = (EP*EG).sum(1), (EP*EL).sum(1)
    print(ds, 'minilm AUC', auc(mg, ml))
    res[ds] = dict(mg=mg, ml=ml)
    for l in LAYERS:
        mu = torch.cat([SP[l], SG[l], SL[l]]).mean(0)
        f = lambda s: torch.nn.functional.normalize(s - mu, dim=-1)
        bg, bl = (f(SP[l])*f(SG[l])).sum(1), (f(SP[l])*f(SL[l])).sum(1)
        a = auc(bg, bl)
        best = max((auc(mg + w*bg, ml + w*bl), w) for w in [0.1,0.2,0.3,0.5,0.7,1.0,1.5])
        print(f'{ds} layer {l}: backbone AUC {a:.3f}  combined best {best[0]:.3f} (w={best[1]})', flush=True)
