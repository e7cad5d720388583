"""Compare gate encoders on dev items: CSLS score of the masked paraphrase vs the masked locality prompt.
Run: .venv/bin/python bench/gate_research/compare_encoders.py minilm|DIR START END (DIR: a sentence-transformers folder)"""
import json, os, sys, time, torch, numpy as np
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
import server.lks.gate as G
from server.lks.gate import SentenceEncoder, mask_subject, is_question, _top_k_mean
from pathlib import Path
torch.set_num_threads(int(os.environ.get('THREADS', '2')))
DATA = os.environ.get('LKS_DATA_DIR', os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'data'))
enc_dir = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != 'minilm' else None
lo, hi = int(sys.argv[2]), int(sys.argv[3])
enc = SentenceEncoder(Path(enc_dir) if enc_dir else None)
QP, SP = enc.encode(G.QUESTION_PROBES), enc.encode(G.STATEMENT_PROBES)
def auc(p, n): return float((np.asarray(p)[:, None] > np.asarray(n)[None]).mean())
out = {}
for ds in ['zsre', 'counterfact']:
    d = json.load(open(f'{DATA}/{ds}.json'))[lo:hi] if os.path.exists(f'{DATA}/{ds}.json') else None
    mp = [mask_subject(x['prompt'], [x['subject']]) for x in d]
    mg = [mask_subject(x['generality'], [x['subject']]) for x in d]
    ml = [mask_subject(x['locality']['prompt'], [x['subject']]) for x in d]
    t0 = time.time(); P, Gq, L = enc.encode(mp), enc.encode(mg), enc.encode(ml); dt = time.time() - t0
    pq = torch.tensor([is_question(t) for t in mp]); gq = torch.tensor([is_question(t) for t in mg]); lq = torch.tensor([is_question(t) for t in ml])
    rp = torch.where(pq, _top_k_mean(P @ QP.T), _top_k_mean(P @ SP.T))
    def sc(Q, qq, shift):
        rq = torch.where(qq, _top_k_mean(Q @ QP.T), _top_k_mean(Q @ SP.T))
        return ((P * Q).sum(1) - 0.5 * (rp + rq) + shift * (~pq).float()).numpy()
    for shift in [0.0, 0.055]:
        cg, cl = sc(Gq, gq, shift), sc(L, lq, shift)
        line = f'{ds:12s} shift {shift}: AUC {auc(cg, cl):.3f} ({dt/(3*len(d))*1000:.1f} ms/text)'
        for fo in [0.05, 0.075, 0.1]:
            thr = np.quantile(cl, 1 - fo)
            line += f' | loc {fo}: para {np.mean(cg > thr):.3f} (t {thr:.3f})'
        print(line, flush=True)
        out[(ds, shift)] = (cg, cl)
# one threshold for both datasets
for shift in [0.0, 0.055]:
    for thr in np.arange(-0.02, 0.12, 0.01):
        s = f'shift {shift} thr {thr:.2f}:'
        for ds in ['zsre', 'counterfact']:
            cg, cl = out[(ds, shift)]
            s += f' {ds[:2]} {np.mean(cg >= thr):.3f}/{np.mean(cl >= thr):.3f}'
        print(s)
